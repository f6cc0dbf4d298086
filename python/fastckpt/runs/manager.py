"""A checkpoint manager for trainers, compatible with NeMo RL's ``CheckpointManager``.

Layout (NeMo RL's): ``<checkpoint_dir>/tmp_step_N/`` while a save is written, renamed to
``step_N/`` when complete, each holding ``training_info.json`` (and ``config.yaml``).

Differences from NeMo RL, all in the direction of safety:

- ``finalize_checkpoint`` replaces an existing ``step_N`` with one atomic exchange
  (``renameat2(RENAME_EXCHANGE)``), so ``step_N`` exists at every instant; where the kernel lacks
  it, the old step is parked as ``old_step_N`` and restored by the next manager if a crash left
  no ``step_N``.
- ``training_info.json`` and the directories are fsynced before the rename.
- Retention deletes a step by renaming it out of the run first (``.step_N.fastckpt-deleting``,
  a name nothing lists), then removing it; a killed removal never leaves a half-deleted
  ``step_N``, and the next manager removes the leftover.
- Retention never removes the latest step, a step lacking the metric (it cannot be ranked), or a
  save in progress (``tmp_step_*``).

Example:
    >>> mgr = CheckpointManager({"checkpoint_dir": "results/grpo", "metric_name": "val:reward",
    ...                          "higher_is_better": True, "keep_top_k": 3})  # doctest: +SKIP
    >>> path = mgr.init_tmp_checkpoint(100, {"val:reward": 0.8})          # doctest: +SKIP
    >>> ...  # write path / "policy" / "weights" with torch.distributed.checkpoint.save
    >>> mgr.finalize_checkpoint(path)                                       # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import json
import logging
import math
import os
import re
import shutil
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastckpt._core import FastckptError
from fastckpt.fsops import clean_discarded, discard_tree
from fastckpt.runs.model import higher_is_better_for

PathLike = str | os.PathLike[str]

_STEP = re.compile(r"^step_(\d+)$")
_TMP = re.compile(r"^tmp_step_(\d+)$")
_OLD = re.compile(r"^old_step_(\d+)$")
_RENAME_EXCHANGE = 2
_log = logging.getLogger("fastckpt")
_AT_FDCWD = -100


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); ``False`` where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _plain(value: Any) -> Any:
    """numpy / torch scalars -> Python numbers (without importing either)."""
    if isinstance(value, str | bool | int | float) or value is None:
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Entry:
    """A finished checkpoint: ``(step, path, training_info)``."""

    step: int
    path: Path
    info: dict[str, Any]

    def metric(self, name: str) -> float | None:
        v = self.info.get(name)
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
            return None
        return float(v)


def history(checkpoint_dir: PathLike) -> list[Entry]:
    """Every finished ``step_N`` with its ``training_info.json``, oldest first."""
    root = Path(checkpoint_dir)
    out = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    for name in names:
        m = _STEP.match(name)
        if not m or not (root / name).is_dir():
            continue
        info: dict[str, Any] = {}
        try:
            with open(root / name / "training_info.json", encoding="utf-8") as f:
                doc = json.load(f)
            if isinstance(doc, dict):
                info = doc
        except (OSError, ValueError):
            pass
        out.append(Entry(int(m.group(1)), root / name, info))
    out.sort(key=lambda e: e.step)
    return out


def plan_retention(
    entries: list[Entry],
    keep_top_k: int,
    metric_name: str | None,
    *,
    higher_is_better: bool | None = None,
    keep_latest: bool = True,
) -> tuple[list[Entry], list[str]]:
    """Which finished checkpoints fall outside the top ``keep_top_k``.

    The latest step is always kept, and so is every step lacking ``metric_name``.

    Returns:
        ``(to_remove, warnings)``.
    """
    if keep_top_k < 1:
        raise FastckptError(f"keep_top_k must be at least 1, got {keep_top_k}")
    if not entries:
        return [], []
    latest = max(e.step for e in entries)
    notes: list[str] = []
    if metric_name is None:
        ranked = sorted(entries, key=lambda e: e.step, reverse=True)
    else:
        ranked = [e for e in entries if e.metric(metric_name) is not None]
        for e in entries:
            if e.metric(metric_name) is None:
                notes.append(f"step {e.step} has no metric {metric_name!r}: kept ({e.path})")
        sign = 1.0 if higher_is_better_for(metric_name, higher_is_better) else -1.0
        ranked.sort(key=lambda e: (sign * (e.metric(metric_name) or 0.0), e.step), reverse=True)
    remove = [e for e in ranked[keep_top_k:] if not (keep_latest and e.step == latest)]
    remove.sort(key=lambda e: e.step)
    return remove, notes


class CheckpointManager:
    """Save, finalize, rank and prune checkpoints in NeMo RL's ``step_N/`` layout.

    Args:
        config: NeMo RL ``CheckpointingConfig``-style mapping (``checkpoint_dir``, ``metric_name``,
            ``higher_is_better``, ``keep_top_k``); keywords override it.
        checkpoint_dir: the run directory.
        metric_name: ``training_info`` key to rank by (``None``: by recency).
        higher_is_better: rank the metric descending (default: ascending for a loss,
            perplexity or error metric, else descending).
        keep_top_k: checkpoints to keep (``None``: keep all).
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        checkpoint_dir: PathLike | None = None,
        metric_name: str | None = None,
        higher_is_better: bool | None = None,
        keep_top_k: int | None = None,
    ) -> None:
        cfg = dict(config or {})
        directory = checkpoint_dir if checkpoint_dir is not None else cfg.get("checkpoint_dir")
        if directory is None:
            raise FastckptError("CheckpointManager needs checkpoint_dir")
        self.checkpoint_dir = Path(directory)
        self.metric_name: str | None = (
            metric_name if metric_name is not None else cfg.get("metric_name")
        )
        hib = higher_is_better if higher_is_better is not None else cfg.get("higher_is_better")
        self.higher_is_better: bool | None = None if hib is None else bool(hib)
        k = keep_top_k if keep_top_k is not None else cfg.get("keep_top_k")
        self.keep_top_k: int | None = None if k is None else int(k)
        self._recover()

    def _recover(self) -> None:
        """Put back an ``old_step_N`` parked by a replacement that crashed before its rename, and
        remove what a killed retention left (``.step_N.fastckpt-deleting``)."""
        if not self.checkpoint_dir.is_dir():
            return
        for note in clean_discarded(self.checkpoint_dir):
            _log.warning(note)
        for name in os.listdir(self.checkpoint_dir):
            m = _OLD.match(name)
            if not m:
                continue
            old = self.checkpoint_dir / name
            final = self.checkpoint_dir / f"step_{m.group(1)}"
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, final)

    def init_tmp_checkpoint(
        self,
        step: int,
        training_info: Mapping[str, Any],
        run_config: Mapping[str, Any] | None = None,
    ) -> Path:
        """Create ``tmp_step_{step}/`` with ``training_info.json`` (and ``config.yaml``).

        A leftover ``tmp_step_{step}`` from an interrupted save is removed first.

        Returns:
            The absolute path to write the checkpoint into.
        """
        save_dir = self.checkpoint_dir / f"tmp_step_{int(step)}"
        if save_dir.exists():
            shutil.rmtree(save_dir)
        save_dir.mkdir(parents=True)
        info = {str(k): _plain(v) for k, v in training_info.items()}
        _write_durable(save_dir / "training_info.json", json.dumps(info).encode())
        if run_config is not None:
            _write_durable(save_dir / "config.yaml", _dump_yaml(_plain(dict(run_config))))
        return save_dir.absolute()

    def finalize_checkpoint(self, checkpoint_path: PathLike) -> None:
        """Rename ``tmp_step_N`` to ``step_N`` atomically, then apply ``keep_top_k``.

        An existing ``step_N`` is swapped out in one atomic exchange and then deleted, so a crash at
        any point leaves either the old or the new ``step_N`` in place, never neither.
        """
        tmp = Path(checkpoint_path)
        m = _TMP.match(tmp.name)
        if not m:
            raise FastckptError(f"{tmp}: not a temporary checkpoint (expected tmp_step_N)")
        if not tmp.is_dir():
            raise FileNotFoundError(2, "no such checkpoint directory", str(tmp))
        n = m.group(1)
        final = tmp.parent / f"step_{n}"
        _fsync_tree(tmp)
        if final.exists():
            if _exchange(tmp, final):
                # tmp now holds the old checkpoint; park it under a name no scanner lists
                old = tmp.parent / f"old_step_{n}"
                os.rename(tmp, old)
                _fsync_dir(tmp.parent)
                shutil.rmtree(old)
            else:
                old = tmp.parent / f"old_step_{n}"
                os.rename(final, old)
                os.rename(tmp, final)
                _fsync_dir(tmp.parent)
                shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(tmp.parent)
        self.remove_old_checkpoints()

    def remove_old_checkpoints(self, exclude_latest: bool = True) -> list[Path]:
        """Delete finished checkpoints outside the top ``keep_top_k``; returns what it removed."""
        if self.keep_top_k is None:
            return []
        entries = history(self.checkpoint_dir)
        remove, notes = plan_retention(
            entries,
            self.keep_top_k,
            self.metric_name,
            higher_is_better=self.higher_is_better,
            keep_latest=exclude_latest,
        )
        for note in notes:
            _log.info(note)
        for e in remove:
            discard_tree(e.path)
        return [e.path for e in remove]

    def get_best_checkpoint_path(self) -> str | None:
        """The finished step with the best metric (ties: the higher step); else the latest."""
        entries = history(self.checkpoint_dir)
        if not entries:
            return None
        name = self.metric_name
        ranked = [e for e in entries if name is not None and e.metric(name) is not None]
        if not ranked:
            warnings.warn(
                f"metric {name!r} not found in any checkpoint; returning the latest", stacklevel=2
            )
            return self.get_latest_checkpoint_path()
        assert name is not None
        sign = 1.0 if higher_is_better_for(name, self.higher_is_better) else -1.0
        best = max(ranked, key=lambda e: (sign * (e.metric(name) or 0.0), e.step))
        return str(best.path)

    def get_latest_checkpoint_path(self) -> str | None:
        """The finished ``step_N`` with the highest N (temporary saves are never returned)."""
        entries = history(self.checkpoint_dir)
        return str(entries[-1].path) if entries else None

    def load_training_info(self, checkpoint_path: PathLike | None = None) -> dict[str, Any] | None:
        """``training_info.json`` of ``checkpoint_path`` (``None`` in, ``None`` out)."""
        if checkpoint_path is None:
            return None
        with open(Path(checkpoint_path) / "training_info.json", encoding="utf-8") as f:
            doc: dict[str, Any] = json.load(f)
        return doc


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _dump_yaml(doc: Any) -> bytes:
    try:
        yaml: Any = importlib.import_module("yaml")  # PyYAML, when installed (as with NeMo RL)
    except ImportError:  # JSON is valid YAML
        return json.dumps(doc, indent=2).encode()
    text = str(yaml.safe_dump(doc, sort_keys=False))
    return text.encode()
