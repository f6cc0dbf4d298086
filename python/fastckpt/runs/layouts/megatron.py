"""Megatron-LM: ``iter_NNNNNNN/`` (or ``release/``) with ``latest_checkpointed_iteration.txt``.

A step is a torch_dist (DCP) folder or legacy ``mp_rank_*`` files; the tracker file is written
after every rank saved, so without it (or past it) a step is incomplete.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fastckpt.runs.layouts import Layout
from fastckpt.runs.metrics import read_metrics
from fastckpt.runs.model import Run, Step
from fastckpt.runs.steps import (
    TRACKER,
    _apply_tracker,
    _children,
    _dcp_state,
    _finish,
    _is_dcp,
    _read_int,
)

_ITER = re.compile(r"^iter_(\d{7,})$")


def _detect(root: Path, names: set[str]) -> Path | None:
    if any(_ITER.match(n) for n in names) or ("release" in names and (root / TRACKER).is_file()):
        return root
    return None


def _scan_megatron(root: Path, sub: str) -> Run:
    del sub
    tracker = _read_int(root / TRACKER)
    steps = []
    for d in _children(root):
        m = _ITER.match(d.name)
        if not m and d.name != "release":
            continue
        n = int(m.group(1)) if m else 0
        if _is_dcp(d):
            ok, why = _dcp_state(d)
        elif any(x.startswith("mp_rank_") for x in os.listdir(d)):
            ok, why = True, None
        else:
            ok, why = False, f"no .metadata or mp_rank_* in {d.name}/"
        s = Step(n, d, d, "-", ok, why)
        if ok and tracker is None:
            s.complete, s.reason = False, f"no {TRACKER} (save in progress or interrupted)"
        s.metrics = read_metrics(d)
        steps.append(_finish(s))
    run = Run(root, "", "", steps, tracker=tracker)
    _apply_tracker(run, TRACKER)
    return run


LAYOUT = Layout("megatron", _detect, _scan_megatron, {"policy": ""}, (_ITER,))
