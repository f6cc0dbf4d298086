"""veRL and RLinf: ``[checkpoints/]global_step_N/``, roles ``actor/`` and ``critic/``.

veRL keeps per-rank ``.pt`` files in the role folder, or Megatron ``model/dist_ckpt/`` (schema v2,
complete once ``ckpt_contents.json`` is written) / ``dist_ckpt/`` (v1), and writes
``latest_checkpointed_iteration.txt`` after every rank saved. RLinf's ``actor/`` holds
``dcp_checkpoint/``, ``model_state_dict/full_weights.pt`` or ``local_shard_checkpoint/``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fastckpt.runs.layouts import Layout
from fastckpt.runs.layouts.megatron import _ITER
from fastckpt.runs.metrics import read_metrics
from fastckpt.runs.model import Run, Step
from fastckpt.runs.steps import (
    _VERL_MODEL,
    TRACKER,
    _apply_tracker,
    _children,
    _finish,
    _is_dcp,
    _missing,
    _read_int,
    _state,
)

_GLOBAL_STEP = re.compile(r"^global_step_(\d+)$")


def _detect_verl(root: Path, names: set[str]) -> Path | None:
    if any(_GLOBAL_STEP.match(n) for n in names):
        return root
    return None


def _detect_rlinf(root: Path, names: set[str]) -> Path | None:
    """``global_step_N/`` folders, the first with RLinf's own folders in ``actor/``."""
    first = next((n for n in sorted(names) if _GLOBAL_STEP.match(n)), None)
    if first is None:
        return None
    actor = root / first / "actor"
    if any((actor / s).exists() for s in ("dcp_checkpoint", "local_shard_checkpoint",
                                           "model_state_dict")):  # fmt: skip
        return root
    return None


def _verl_weights(role_dir: Path) -> tuple[Path | None, str | None]:
    """(weights, manifest reason) for a veRL / RLinf role directory."""
    if (role_dir / "model" / "dist_ckpt").is_dir():  # veRL Megatron, schema v2
        if not (role_dir / "ckpt_contents.json").is_file():
            return (
                role_dir / "model" / "dist_ckpt",
                "no ckpt_contents.json (Megatron save in progress)",
            )
        return role_dir / "model" / "dist_ckpt", None
    if (role_dir / "dist_ckpt").is_dir():  # veRL Megatron, schema v1
        return role_dir / "dist_ckpt", None
    for sub in ("dcp_checkpoint", "model_state_dict/full_weights.pt", "local_shard_checkpoint"):
        if (role_dir / sub).exists():  # RLinf
            return role_dir / sub, None
    iters = sorted(p for p in role_dir.iterdir() if _ITER.match(p.name) or p.name == "release")
    if iters:
        return iters[-1], None  # RLinf Megatron
    if any(_VERL_MODEL.match(n) for n in os.listdir(role_dir)) or _is_dcp(role_dir):
        return role_dir, None
    return None, None


def _scan_verl(root: Path, sub: str) -> Run:
    steps = []
    for d in _children(root):
        m = _GLOBAL_STEP.match(d.name)
        if not m:
            continue
        n = int(m.group(1))
        role_dir = d / sub
        weights, why = _verl_weights(role_dir) if role_dir.is_dir() else (None, None)
        if weights is None:
            s = _missing(n, d, f"{d.name}/{sub}/")
        elif why is not None:
            s = Step(n, d, weights, "-", False, why)
        else:
            ok, why = _state(weights)
            s = Step(n, d, weights, "-", ok, why)
        s.metrics = read_metrics(d)
        if not s.metrics:
            s.metrics = read_metrics(role_dir)
        steps.append(_finish(s))
    run = Run(root, "", "", steps, tracker=_read_int(root / TRACKER))
    _apply_tracker(run, TRACKER)
    return run


_ROLES = {"policy": "actor", "critic": "critic"}
LAYOUT = Layout("verl", _detect_verl, _scan_verl, _ROLES, (_GLOBAL_STEP,))
RLINF = Layout("rlinf", _detect_rlinf, _scan_verl, _ROLES, (_GLOBAL_STEP,))
