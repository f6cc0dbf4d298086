"""Where a Megatron save keeps its files, and how they are opened.

* detection (:func:`is_legacy_dir`, :func:`is_dist_dir`) and the tracker file
  (``latest_checkpointed_iteration.txt``) of a save root;
* the restricted unpickler and the zip loading of one rank file (:class:`_File`);
* :class:`Args`, the pickled ``argparse.Namespace``;
* the legacy parallel layout (TP/PP/EP/ETP/VP from ``args``) and its ``mp_rank_*`` directories.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastckpt._core import FormatError
from fastckpt.unpickle import Stub, StubbingUnpickler, TorchZip, open_fd

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
_MP_RANK = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
MAX_PICKLE_BYTES = 1 << 30


# --------------------------------------------------------------------------------------------
# detection


def is_legacy_dir(path: Path) -> bool:
    """True for an ``iter_NNNNNNN``/``release`` folder holding ``mp_rank_*`` directories."""
    if not path.is_dir():
        return False
    try:
        return any(_MP_RANK.match(n) and (path / n).is_dir() for n in os.listdir(path))
    except OSError:
        return False


def is_dist_dir(path: Path) -> bool:
    """True for a Megatron ``torch_dist`` folder (``metadata.json`` beside a DCP ``.metadata``)."""
    meta = path / "metadata.json"
    if not (path.is_dir() and meta.is_file()):
        return False
    try:
        backend = json.loads(meta.read_text()).get("sharded_backend")
    except (OSError, ValueError, AttributeError):
        return False
    return backend in ("torch_dist", "torch")


def _tracker_dir(path: Path) -> Path:
    """A save root with a tracker file -> the iteration folder it names."""
    tracker = path / TRACKER
    if not tracker.is_file() or is_legacy_dir(path) or is_dist_dir(path):
        return path
    text = tracker.read_text().strip()
    if text == "release":
        return path / "release"
    try:
        return path / f"iter_{int(text):07d}"
    except ValueError:
        raise FormatError(
            f"{tracker}: expected an iteration number or 'release', got {text!r}"
        ) from None


# --------------------------------------------------------------------------------------------
# pickles


class _MegatronUnpickler(StubbingUnpickler):
    """The state-dict unpickler, plus ``signal.Signals`` (``args.exit_signal``) as a stub."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "signal" and name in ("Signals", "Handlers", "Sigmasks"):
            return super().find_class("megatron_stub.signal", name)
        return super().find_class(module, name)


def _unpickle(data: bytes, source: str) -> Any:
    try:
        return _MegatronUnpickler(io.BytesIO(data), source=source).load()
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError(f"{source}: cannot read pickle ({type(exc).__name__}: {exc})") from None


@dataclass
class _File:
    path: Path
    obj: Any
    storages: dict[str, tuple[int, int]]


def _load_zip(path: Path, offset: int = 0, length: int | None = None) -> _File:
    try:
        fd = open_fd(str(path))
    except FileNotFoundError:
        raise FormatError(f"{path}: missing file") from None
    try:
        size = os.fstat(fd).st_size if length is None else length
        archive = TorchZip(str(path), fd, offset, size)
        pkl = archive.entries[archive.prefix + "data.pkl"]
        if pkl.size > MAX_PICKLE_BYTES:
            raise FormatError(f"{path}: data.pkl is implausibly large ({pkl.size} bytes)")
        obj = _unpickle(archive.read(pkl), str(path))
        storages = {
            name[len(archive.prefix) + 5 :]: (e.data_offset, e.size)
            for name, e in archive.entries.items()
            if name.startswith(archive.prefix + "data/")
        }
        return _File(path, obj, storages)
    finally:
        os.close(fd)


class Args:
    """Read-only view of a pickled ``argparse.Namespace`` (a stub), with defaults."""

    def __init__(self, obj: Any, source: str) -> None:
        fields = getattr(obj, "__dict__", None)
        if not isinstance(obj, Stub) or not isinstance(fields, dict):
            raise FormatError(f"{source}: 'args' is not an argparse.Namespace")
        self.fields = fields
        self.source = source

    def get(self, name: str, default: Any = None) -> Any:
        value = self.fields.get(name, default)
        return default if value is None else value

    def int(self, name: str, default: int) -> int:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise FormatError(f"{self.source}: args.{name} = {value!r}, expected an integer")
        return value


# --------------------------------------------------------------------------------------------
# legacy parallel layout


@dataclass
class _Layout:
    tp: int
    pp: int
    ep: int
    etp: int
    vp: int | None


def _layout(args: Args) -> _Layout:
    tp = args.int("tensor_model_parallel_size", args.int("model_parallel_size", 1))
    vp_raw = args.get("virtual_pipeline_model_parallel_size")
    return _Layout(
        tp=tp,
        pp=args.int("pipeline_model_parallel_size", 1),
        ep=args.int("expert_model_parallel_size", 1),
        etp=args.int("expert_tensor_parallel_size", tp),
        vp=int(vp_raw) if vp_raw else None,
    )


def _writers(lay: _Layout) -> list[tuple[int, int]]:
    """The ``(tp, ep)`` rank directories a legacy save writes in each pipeline stage.

    Megatron-LM saves from the ranks whose expert-data-parallel rank is 0: with the default rank
    order (``tp-cp-ep-dp-pp``, CP=1) those are the in-stage ranks ``r < ETP·EP``, and rank ``r``
    writes ``mp_rank_{r % TP}_{(r // ETP) % EP}`` (``shared/formats/megatron.md`` §3.8). With
    ETP = TP that is every ``(tp, ep)`` pair; with ETP=1, TP=2, EP=2 only ``(0, 0)`` and ``(1, 1)``.
    """
    if lay.ep == 1:
        return [(tp, 0) for tp in range(lay.tp)]
    pairs = [(r % lay.tp, (r // lay.etp) % lay.ep) for r in range(lay.etp * lay.ep)]
    return sorted(set(pairs))


def _rank_dirs(directory: Path, lay: _Layout) -> dict[tuple[int, int, int], Path]:
    """``(tp, pp, ep)`` -> rank file, checked against the layout ``args`` declares."""
    if lay.ep > 1 and lay.tp % lay.etp:
        raise FormatError(
            f"{directory}: args say expert TP={lay.etp}, which does not divide TP={lay.tp}: a "
            "legacy save then writes several expert-TP ranks to one mp_rank file (not readable; "
            "use torch_dist)"
        )
    found: dict[tuple[int, int, int], Path] = {}
    for name in sorted(os.listdir(directory)):
        m = _MP_RANK.match(name)
        if not m or not (directory / name).is_dir():
            continue
        tp, a, b = int(m.group(1)), m.group(2), m.group(3)
        if b is not None:
            pp, ep = int(a), int(b)
        elif a is not None:
            pp, ep = (int(a), 0) if lay.pp > 1 else (0, int(a))
            if lay.pp == 1 and lay.ep == 1:
                raise FormatError(
                    f"{directory / name}: a pipeline or expert rank suffix, but args say "
                    "PP=1 and EP=1 (args disagree with the files)"
                )
        else:
            pp, ep = 0, 0
            if lay.pp > 1 or lay.ep > 1:
                raise FormatError(
                    f"{directory / name}: no rank suffix, but args say PP={lay.pp}, EP={lay.ep} "
                    "(args disagree with the files)"
                )
        if tp >= lay.tp or pp >= lay.pp or ep >= lay.ep:
            raise FormatError(
                f"{directory / name}: outside TP={lay.tp}, PP={lay.pp}, EP={lay.ep} from args "
                "(args disagree with the files)"
            )
        found[(tp, pp, ep)] = directory / name / RANK_FILE
    for tp, ep in _writers(lay):
        for pp in range(lay.pp):
            if (tp, pp, ep) not in found:
                name = f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if lay.pp > 1 else "")
                name += f"_{ep:03d}" if lay.ep > 1 else ""
                etp = f", ETP={lay.etp}" if lay.etp != lay.tp else ""
                raise FormatError(
                    f"{directory / name}: missing rank directory (args say TP={lay.tp}, "
                    f"PP={lay.pp}, EP={lay.ep}{etp})"
                )
    for path in found.values():
        if not path.is_file():
            raise FormatError(f"{path}: missing rank file")
    return found
