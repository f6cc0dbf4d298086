"""Value heads of critics and reward models: ``score.*`` (veRL critic, OpenRLHF) and ``v_head.*``.

A critic saved by veRL is an ``AutoModelForTokenClassification`` (``num_labels=1``): the policy's
``model.*`` tensors plus ``score.weight [1, hidden]`` and no ``lm_head``. trl's value-head model
adds ``v_head.summary.*``. :func:`split_value_head` drops them on request (to export the policy
trunk) or keeps them and says which config the output needs.
"""

from __future__ import annotations

import re
from typing import Any

#: output names of value-head tensors
VALUE_HEAD = re.compile(r"^(score|v_head)\.")

_HEAD_ARCHS = ("ForTokenClassification", "ForSequenceClassification")


def _base_arch(config: dict[str, Any] | None) -> tuple[str, str | None]:
    """``("Llama", "LlamaForCausalLM")`` from ``architectures``; ``("<Model>", None)`` if none."""
    archs = (config or {}).get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if arch is None:
        return "<Model>", None
    m = re.match(r"^(.*?)(For[A-Z]\w*|Model|LMHeadModel)$", arch)
    return (m.group(1) if m and m.group(1) else arch), arch


def split_value_head(
    names: list[str], *, drop: bool, config: dict[str, Any] | None
) -> tuple[list[str], list[str]]:
    """Apply ``drop_value_head`` to the selected output names.

    Args:
        names: output tensor names chosen for conversion.
        drop: leave ``score.*`` / ``v_head.*`` out.
        config: the ``config.json`` that will be copied next to the weights, if any.

    Returns:
        ``(names, warnings)``.
    """
    heads = [n for n in names if VALUE_HEAD.match(n)]
    if not heads:
        return names, []
    base, arch = _base_arch(config)
    if drop:
        kept = [n for n in names if not VALUE_HEAD.match(n)]
        if arch is not None and arch.endswith(_HEAD_ARCHS):
            return kept, [
                f"dropped the value head ({', '.join(heads)}), but config.json names {arch}: "
                f"transformers will add a fresh head on load; use a {base}ForCausalLM config "
                "(--config-from the base model) to load the policy"
            ]
        return kept, []
    if arch is not None and arch.endswith(_HEAD_ARCHS):
        return names, []
    shown = ", ".join(heads)
    if any(n.startswith("score.") for n in heads):
        need = (
            f"a {base}ForTokenClassification config with num_labels=1 (a veRL critic) or "
            f"{base}ForSequenceClassification (a reward model)"
        )
    else:
        need = "trl's AutoModelForCausalLMWithValueHead (v_head.summary.*)"
    if arch:
        have = f"config.json names {arch}"
    else:
        have = "config.json names no architecture" if config else "no config.json was found"
    return names, [
        f"kept the value head ({shown}): the output needs {need}, but {have}; pass "
        "--drop-value-head (drop_value_head=True) to export the policy weights only"
    ]
