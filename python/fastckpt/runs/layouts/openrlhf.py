"""OpenRLHF: ``_actor/global_stepN/`` (and ``_critic/``) DeepSpeed tags beside ``latest``.

Each tag may hold a ``metric.json``. DeepSpeed writes ``latest`` after the tag, so a tag past it
is a save in progress; a ``best_`` tag copies a step that may still exist under its own name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fastckpt._core import FastckptError
from fastckpt.runs.layouts import Layout
from fastckpt.runs.metrics import read_metrics
from fastckpt.runs.model import Run, Step
from fastckpt.runs.steps import _apply_tracker, _children, _finish, _read_int

_DS_TAG = re.compile(r"^(best_)?global_step(\d+)$")


def _detect(root: Path, names: set[str]) -> Path | None:
    if "_actor" in names or "_critic" in names:
        return root
    if (root / "latest").is_file() and any(_DS_TAG.match(n) for n in names):
        return root.parent  # pointed at _actor/ itself
    return None


def _scan_openrlhf(root: Path, sub: str) -> Run:
    role_dir = root / sub
    if not role_dir.is_dir():
        raise FastckptError(f"{root}: no {sub}/ folder")
    others = [root / r for r in ("_actor", "_critic") if r != sub and (root / r).is_dir()]
    steps = []
    for d in _children(role_dir):
        m = _DS_TAG.match(d.name)
        if not m:
            continue
        n = int(m.group(2))
        if m.group(1) and (role_dir / f"global_step{n}").is_dir():
            continue  # the best_ copy of a step that still exists under its own name
        names = os.listdir(d)
        if not any(x.endswith("model_states.pt") for x in names):
            s = Step(n, d, d, "-", False, f"no *model_states.pt in {d.name}/")
        else:
            s = Step(n, d, d, "-", True)
        s.extra_paths = [o / d.name for o in others if (o / d.name).is_dir()]
        s.metrics = read_metrics(d)
        steps.append(_finish(s))
    run = Run(root, "", "", steps, tracker=_read_int(role_dir / "latest"))
    _apply_tracker(run, f"{sub}/latest")
    return run


LAYOUT = Layout(
    "openrlhf", _detect, _scan_openrlhf, {"policy": "_actor", "critic": "_critic"}, (_DS_TAG,)
)
