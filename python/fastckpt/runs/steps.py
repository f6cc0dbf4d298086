"""What a step folder holds: its weights' format, size and completeness, and a tracker file.

Shared by every layout in :mod:`fastckpt.runs.layouts`: ``_state`` and ``_dcp_state`` read a
framework's completion markers from the weights' own files; ``_finish``, ``_missing`` and
``_apply_tracker`` are the scanners' common steps.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fastckpt._core import FastckptError
from fastckpt.runs.model import Run, Step

TRACKER = "latest_checkpointed_iteration.txt"

_RANK_METADATA = re.compile(r"^__(\d+)\.metadata$")
_DISTCP = re.compile(r"^__(\d+)_\d+\.distcp$")
_VERL_MODEL = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")


def _read_int(path: Path) -> int | None:
    """A tracker file: an int, or Megatron's ``release`` (step 0)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    if text == "release":
        return 0
    m = re.search(r"(\d+)\s*$", text)  # "123", or a DeepSpeed tag "global_step123"
    return int(m.group(1)) if m else None


def _size(path: Path | None) -> int:
    if path is None:
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


# ---------------------------------------------------------------- weights inside a step


def _dcp_state(path: Path) -> tuple[bool, str | None]:
    """(complete, reason) for a DCP directory."""
    names = os.listdir(path)
    if (path / ".metadata").is_file():
        # .metadata is written last, but a folder removed in place (by fastckpt < 0.2 or another
        # tool) can keep it after its data files are gone
        if any(n.endswith(".distcp") for n in names):
            return True, None
        return False, f"DCP .metadata without .distcp data files in {path.name}/ (half deleted?)"
    ranks = {int(m.group(1)) for n in names if (m := _DISTCP.match(n))}
    metas = {int(m.group(1)) for n in names if (m := _RANK_METADATA.match(n))}
    if metas and ranks <= metas:
        return True, None
    return False, f"DCP save without .metadata in {path.name}/ (interrupted or in progress)"


def _is_dcp(path: Path) -> bool:
    if not path.is_dir():
        return False
    return any(
        n == ".metadata" or _DISTCP.match(n) or _RANK_METADATA.match(n) for n in os.listdir(path)
    )


def weights_format(path: Path) -> str:
    """Name the format of a weights path; :mod:`fastckpt.formats.registry` decides where it can."""
    from fastckpt.formats.registry import detect

    try:
        fmt = detect(path)
        if fmt == "dcp" and (path / "metadata.json").is_file():
            return "megatron-dist"
        return fmt
    except (FastckptError, OSError):
        pass
    if path.is_dir():
        names = os.listdir(path)
        if any(n.startswith("mp_rank_") for n in names):
            return "megatron"
        if any(n.endswith("model_states.pt") for n in names):
            return "deepspeed"
        if any(n.endswith(".pt") or n.endswith(".bin") for n in names):
            return "torch"
    elif path.suffix in (".pt", ".bin", ".pth"):
        return "torch"
    return "unknown"


def _state(path: Path) -> tuple[bool, str | None]:
    """(complete, reason) for a weights path from its own files."""
    if path.is_file():
        return True, None
    if _is_dcp(path):
        return _dcp_state(path)
    names = os.listdir(path)
    ranks = [(int(m.group(1)), int(m.group(2))) for n in names if (m := _VERL_MODEL.match(n))]
    if ranks:
        world = ranks[0][0]
        missing = sorted(set(range(world)) - {r for w, r in ranks if w == world})
        if missing:
            return False, f"missing model files for ranks {missing} of {world}"
    if not names:
        return False, f"{path.name}/ is empty"
    return True, None


# ---------------------------------------------------------------- shared by the layout scanners


def _children(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return []


def _finish(step: Step) -> Step:
    if step.weights is not None and step.weights.exists():
        step.format = weights_format(step.weights)
        step.size = _size(step.weights)
    return step


def _missing(number: int, path: Path, where: str) -> Step:
    return Step(number, path, None, "-", False, f"no weights found in {where}")


def _apply_tracker(run: Run, what: str) -> None:
    if run.tracker is None:
        return
    for s in run.steps:
        if s.complete and s.step > run.tracker:
            s.complete = False
            s.reason = f"newer than {what} ({run.tracker}): save in progress"
