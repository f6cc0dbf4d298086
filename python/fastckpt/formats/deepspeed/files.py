"""The files of a ZeRO tag folder: their names, loading one (``_File``), and small checked readers.

A ``_File`` is one parsed ``torch.save`` file (its pickle read by the stubbing restricted
unpickler, its zip kept for storage offsets); ``_File.run`` turns a 1-D (or C-contiguous) tensor
into a ``_Run`` of contiguous elements, the unit the placement functions work with.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastckpt._core import FormatError
from fastckpt.catalog import Chunk
from fastckpt.safeio import listing
from fastckpt.unpickle import (
    Stub,
    TensorRef,
    TorchZip,
    load_state_dict_pickle,
    open_fd,
    torch_itemsize,
)

#: per-rank optimizer states (ZeRO >= 1); group 1 is ``bf16_`` or empty
OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
#: per-rank model states (ZeRO-3)
ZERO3_MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
#: the one model-states file of ZeRO 0/1/2 (per model-parallel rank)
MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
#: MoE expert files, which this reader does not assemble
EXPERT_FILE = re.compile(r"^(expp_rank_\d+_|layer_\d+_expert_\d+_).*\.pt$")
#: cap on a data.pkl (real ones are KB to a few MB)
MAX_PICKLE_BYTES = 1 << 30


def is_zero_name(name: str) -> bool:
    """True for a file name DeepSpeed writes into a ZeRO tag folder."""
    return bool(OPTIM_FILE.match(name) or ZERO3_MODEL_FILE.match(name))


def is_zero_dir(path: Path) -> bool:
    """True if ``path`` is a DeepSpeed ZeRO tag folder (has ZeRO optimizer or model files)."""
    return path.is_dir() and any(is_zero_name(n) for n in listing(path))


@dataclass
class _File:
    """One parsed ``torch.save`` file of the tag folder."""

    path: Path
    obj: dict[Any, Any]
    archive: TorchZip
    stubs: set[str]

    def run(self, ref: Any, what: str) -> _Run:
        """The contiguous run of elements of a tensor (1-D, or C-contiguous N-D)."""
        if not isinstance(ref, TensorRef):
            raise FormatError(f"{self.path}: {what} is not a tensor (got {_kind(ref)})")
        n = math.prod(ref.shape)
        if n > 1 and ref.stride != _c_strides(ref.shape):
            raise FormatError(
                f"{self.path}: {what} is not contiguous (shape {ref.shape}, strides {ref.stride})"
            )
        entry = self.archive.storage(ref.storage)
        item = torch_itemsize(ref.dtype)
        if ref.storage_offset < 0 or (ref.storage_offset + n) * item > entry.size:
            raise FormatError(
                f"{self.path}: {what} (offset {ref.storage_offset}, {n} elements) runs past its "
                f"storage of {entry.size} bytes"
            )
        return _Run(str(self.path), entry.data_offset, entry.size, ref.storage_offset, n, ref.dtype)

    def whole(self, ref: TensorRef, what: str) -> list[Chunk]:
        """One chunk holding a whole tensor (any strides), bounds-checked."""
        entry = self.archive.storage(ref.storage)
        item, size = torch_itemsize(ref.dtype), entry.size
        if math.prod(ref.shape) == 0:
            return []
        pairs = zip(ref.shape, ref.stride, strict=True)
        last = ref.storage_offset + sum((s - 1) * st for s, st in pairs)
        if ref.storage_offset < 0 or min(ref.stride, default=0) < 0 or (last + 1) * item > size:
            raise FormatError(f"{self.path}: {what} runs past its storage of {entry.size} bytes")
        zeros = (0,) * len(ref.shape)
        chunk = Chunk(str(self.path), entry.data_offset, size, ref.storage_offset, ref.stride,
                      zeros, ref.shape)  # fmt: skip
        return [chunk]


def _kind(value: Any) -> str:
    return value.qualname() if isinstance(value, Stub) else type(value).__name__


def _load(path: Path) -> _File:
    try:
        fd = open_fd(str(path))
    except FileNotFoundError:
        raise FormatError(f"{path}: missing file") from None
    try:
        size = os.fstat(fd).st_size
        if os.pread(fd, 1, 0) == b"\x80":
            raise FormatError(
                f"{path}: a legacy (non-zip) torch.save file; re-save it with a current torch"
            )
        archive = TorchZip(str(path), fd, 0, size)
        pkl = archive.entries[archive.prefix + "data.pkl"]
        if pkl.size > MAX_PICKLE_BYTES:
            raise FormatError(f"{path}: data.pkl is implausibly large ({pkl.size} bytes)")
        obj, stubs = load_state_dict_pickle(archive.read(pkl), source=str(path))
    finally:
        os.close(fd)
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: not a DeepSpeed checkpoint (the pickle holds a {_kind(obj)})")
    return _File(path, obj, archive, stubs)


def _get(f: _File, obj: dict[Any, Any], key: str, where: str = "") -> Any:
    if key not in obj:
        raise FormatError(f"{f.path}: no {key!r}{where} (not a DeepSpeed ZeRO checkpoint file?)")
    return obj[key]


def _int(value: Any, f: _File, what: str) -> int:
    """An int, or an ``IntEnum`` stub pickled as ``ZeroStageEnum(value)``."""
    if isinstance(value, Stub):
        args: tuple[Any, ...] = tuple(value.__dict__.get("_args") or ())
        if len(args) == 1 and isinstance(args[0], int):
            return int(args[0])
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise FormatError(f"{f.path}: {what} is {value!r}, expected an integer")


def _shape(value: Any, f: _File, what: str) -> tuple[int, ...]:
    if isinstance(value, tuple | list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        return tuple(int(v) for v in value)
    raise FormatError(f"{f.path}: shape of {what} is {value!r}, expected a torch.Size")


@dataclass(frozen=True)
class _Run:
    """``length`` contiguous elements of ``dtype`` from element ``start`` of a storage."""

    path: str
    data_offset: int
    data_len: int
    start: int
    length: int
    dtype: str


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))
