"""torchtitan: ``dump_folder/checkpoint/step-N/``, each a DCP (complete with its ``.metadata``)."""

from __future__ import annotations

import re
from pathlib import Path

from fastckpt.runs.layouts import Layout
from fastckpt.runs.model import Run, Step
from fastckpt.runs.steps import _children, _dcp_state, _finish, _is_dcp

#: torchtitan: dump_folder/checkpoint/step-N/ (a DCP)
_TITAN_STEP = re.compile(r"^step-(\d+)$")


def _detect(root: Path, names: set[str]) -> Path | None:
    if any(_TITAN_STEP.match(n) and _is_dcp(root / n) for n in names):
        return root
    return None


def _scan_torchtitan(root: Path, sub: str) -> Run:
    """torchtitan ``checkpoint/step-N/``: each a DCP, complete with its ``.metadata``."""
    del sub
    steps = []
    for d in _children(root):
        m = _TITAN_STEP.match(d.name)
        if not m:
            continue
        ok, why = _dcp_state(d)
        steps.append(_finish(Step(int(m.group(1)), d, d, "-", ok, why)))
    return Run(root, "", "", steps)


LAYOUT = Layout("torchtitan", _detect, _scan_torchtitan, {"policy": ""}, (_TITAN_STEP,))
