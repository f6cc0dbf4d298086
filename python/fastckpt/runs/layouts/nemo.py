"""NeMo RL: ``step_N/`` (``tmp_step_N/`` while writing), roles ``policy/`` and ``value/``.

Weights in ``<role>/weights/`` (DCP v1) or ``<role>/weights/model/`` (v2) or ``iter_*``
(Megatron Bridge); NeMo RL renames ``tmp_step_N`` to ``step_N`` when the save is complete.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastckpt.runs.layouts import Layout
from fastckpt.runs.layouts.megatron import _ITER
from fastckpt.runs.metrics import read_metrics
from fastckpt.runs.model import Run, Step
from fastckpt.runs.steps import _children, _finish, _is_dcp, _missing, _state

_NEMO_STEP = re.compile(r"^(tmp_)?step_(\d+)$")


def _detect(root: Path, names: set[str]) -> Path | None:
    if any(_NEMO_STEP.match(n) for n in names):
        return root
    return None


def _nemo_weights(role_dir: Path) -> Path | None:
    w = role_dir / "weights"
    if not w.is_dir():
        return None
    if _is_dcp(w):
        return w  # DTensor v1
    model = w / "model"
    if model.is_dir():
        return model  # DTensor v2 (DCP or safetensors)
    iters = sorted(p for p in w.iterdir() if _ITER.match(p.name) or p.name == "release")
    if iters:
        return iters[-1]  # Megatron (Bridge)
    if any(w.glob("*.safetensors")):
        return w  # LoRA adapter / HF folder
    return w


def _scan_nemo(root: Path, sub: str) -> Run:
    steps = []
    for d in _children(root):
        m = _NEMO_STEP.match(d.name)
        if not m:
            continue
        n = int(m.group(2))
        role_dir = d / sub
        weights = _nemo_weights(role_dir) if role_dir.is_dir() else None
        if weights is None:
            s = _missing(n, d, f"{d.name}/{sub}/weights")
        else:
            ok, why = _state(weights)
            s = Step(n, d, weights, "-", ok, why)
        if m.group(1):
            s.complete = False
            s.reason = f"temporary save {d.name}/ (not yet renamed to step_{n}/)"
        s.metrics = read_metrics(d)
        steps.append(_finish(s))
    return Run(root, "", "", steps)


LAYOUT = Layout(
    "nemo-rl", _detect, _scan_nemo, {"policy": "policy", "critic": "value"}, (_NEMO_STEP,)
)
