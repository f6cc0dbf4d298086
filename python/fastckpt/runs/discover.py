"""Which trainer layout a run directory has, and its steps: the layouts, tried in order.

:data:`LAYOUTS` is the table of every layout :mod:`fastckpt.runs.layouts` knows; the first whose
``detect`` claims a folder wins. A run may also be pointed at through its ``checkpoints/`` folder's
parent, or torchtitan's dump folder (its steps are in ``checkpoint/``).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastckpt._core import FastckptError, FormatError
from fastckpt.runs.layouts import Layout, megatron, nemo, openrlhf, prime, torchtitan, trainer, verl
from fastckpt.runs.metrics import _default_metric
from fastckpt.runs.model import PathLike, Run, Step
from fastckpt.runs.steps import _children, _is_dcp

#: every run layout, in the order they are tried. OpenRLHF first (its ``_actor/`` holds DeepSpeed
#: tags), Megatron's ``iter_*`` next; veRL/RLinf before NeMo RL/prime-rl, so a folder with both
#: ``global_step_N/`` and ``step_N/`` is veRL's; RLinf and prime-rl name their steps like veRL and
#: NeMo RL and are told apart by what the first step holds, so each goes before its twin.
LAYOUTS: tuple[Layout, ...] = (
    openrlhf.LAYOUT,
    megatron.LAYOUT,
    verl.RLINF,
    verl.LAYOUT,
    prime.LAYOUT,
    nemo.LAYOUT,
    trainer.LAYOUT,
    torchtitan.LAYOUT,
)
_BY_NAME = {layout.name: layout for layout in LAYOUTS}


def _find_layout(root: Path) -> tuple[str, Path] | None:
    """``(layout, steps_root)`` for a run directory, or ``None``."""
    if not root.is_dir():
        return None
    names = {p.name for p in _children(root)}
    for layout in LAYOUTS:
        base = layout.detect(root, names)
        if base is not None:
            return layout.name, base
    if "checkpoint" in names:  # torchtitan's dump folder
        found = _find_layout(root / "checkpoint")
        if found is not None and found[0] == "torchtitan":
            return found
    if "checkpoints" in names:
        return _find_layout(root / "checkpoints")
    return None


def is_run_dir(path: PathLike) -> bool:
    """True if ``path`` is a run (or a ``checkpoints/`` folder of one), not a checkpoint."""
    p = Path(path)
    if not p.is_dir() or _is_dcp(p) or any(p.glob("*.safetensors")):
        return False
    if any(n.startswith("mp_rank_") for n in os.listdir(p)):
        return False
    return _find_layout(p) is not None


def _role_key(role: str | None) -> str:
    if role is None:
        return "policy"
    r = role.lower().lstrip("_")
    if r in ("actor", "policy", "trainer"):
        return "policy"
    if r in ("critic", "value"):
        return "critic"
    raise FastckptError(f"unknown role {role!r} (use actor, policy or critic)")


def scan_run(path: PathLike, *, role: str | None = None) -> Run:
    """Find the steps of a run directory for ``role`` (default: the policy / actor).

    Args:
        path: the run directory (or its ``checkpoints/`` folder; for OpenRLHF also ``_actor/``).
        role: ``"actor"``/``"policy"`` (the same thing) or ``"critic"``.

    Returns:
        A :class:`Run` with every step found, complete or not, oldest first.
    """
    root = Path(path)
    found = _find_layout(root)
    if found is None:
        raise FormatError(
            f"{root}: not a training run fastckpt recognises (no step_N/, global_step_N/, "
            "iter_NNNNNNN/, checkpoint-N/, step-N/ or _actor/ folders)"
        )
    layout, base = found
    key = _role_key(role)
    dirs = _BY_NAME[layout].roles
    if key not in dirs:
        raise FastckptError(f"{root}: a {layout} run has no {key} role (roles: {', '.join(dirs)})")
    sub = dirs[key]
    run = _BY_NAME[layout].scan(base, sub)
    run.layout, run.role = layout, sub or "model"
    run.steps.sort(key=lambda s: (s.step, s.complete))
    # one entry per step number: a complete one wins over a leftover temporary one
    uniq: dict[int, Step] = {}
    for s in run.steps:
        uniq[s.step] = s
    run.steps = list(uniq.values())
    if run.best_step is None:  # else the framework's own choice stands for --step best
        run.default_metric = _default_metric(run)
    return run


def looks_like_step(name: str) -> bool:
    """A folder name that a run's layout would list as a step (``step_9``, ``global_step_9``,
    ``global_step9``, ``iter_0000009``, ``checkpoint-9``, ``step-9``)."""
    pats = tuple(p for layout in LAYOUTS for p in layout.steps)
    return any(p.match(name) for p in pats)
