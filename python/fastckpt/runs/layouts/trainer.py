"""transformers Trainer: ``output_dir/checkpoint-N/``, each complete with ``trainer_state.json``.

Metrics come from the state's ``log_history``; the best step from ``best_global_step`` (or
``best_model_checkpoint``), which ``--step best`` uses when no metric is named.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastckpt.runs.layouts import Layout
from fastckpt.runs.metrics import _load_json, _numeric
from fastckpt.runs.model import Run, Step
from fastckpt.runs.steps import _children, _finish, _missing

#: transformers Trainer: output_dir/checkpoint-N/ with trainer_state.json
_TRAINER_CKPT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
#: what a Trainer checkpoint holds its weights as (any one of them)
_TRAINER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json", "pytorch_model_fsdp_0")  # fmt: skip


def _detect(root: Path, names: set[str]) -> Path | None:
    if any(_TRAINER_CKPT.match(n) for n in names):
        return root
    return None


def _scan_trainer(root: Path, sub: str) -> Run:
    """transformers Trainer ``output_dir``: ``checkpoint-N/`` folders, each complete with its
    ``trainer_state.json`` (written after the weights); metrics from its ``log_history``; best
    from the latest state's ``best_global_step`` (or ``best_model_checkpoint``)."""
    del sub
    steps = []
    best: int | None = None
    found = [(int(m.group(1)), d) for d in _children(root) if (m := _TRAINER_CKPT.match(d.name))]
    for n, d in sorted(found):  # by step: the latest state's best is the one that stands
        state = _load_json(d / TRAINER_STATE)
        if not any((d / w).exists() for w in _TRAINER_WEIGHTS):
            s = _missing(n, d, f"{d.name}/ ({' or '.join(_TRAINER_WEIGHTS[:3])})")
        elif not isinstance(state, dict):
            s = Step(n, d, d, "-", False, f"no {TRAINER_STATE} in {d.name}/ (save in progress)")
        else:
            s = Step(n, d, d, "-", True)
        if isinstance(state, dict):
            for entry in state.get("log_history") or []:
                if isinstance(entry, dict) and entry.get("step") == n:
                    s.metrics.update(_numeric(entry))
            best = _trainer_best(state, best)
        steps.append(_finish(s))
    return Run(root, "", "", steps, best_step=best)


def _trainer_best(state: dict[str, Any], before: int | None) -> int | None:
    step = state.get("best_global_step")
    if isinstance(step, int) and not isinstance(step, bool):
        return step
    path = state.get("best_model_checkpoint")
    m = _TRAINER_CKPT.match(Path(path).name) if isinstance(path, str) else None
    return int(m.group(1)) if m else before


LAYOUT = Layout("trainer", _detect, _scan_trainer, {"policy": ""}, (_TRAINER_CKPT,))
