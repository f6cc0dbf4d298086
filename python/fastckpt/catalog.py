"""The catalogue: every tensor of a checkpoint as name, dtype, shape and stored chunks.

Every source format (DCP, torch.save zips, ZeRO partitions, Megatron, HF shards) reduces to the
same shape: a global tensor made of boxes placed at global offsets, each box a strided view of a
byte range of some file. The Rust core only ever sees these boxes (:class:`Chunk`), so one planner
and one copy engine serve every format.
"""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from fastckpt import _core
from fastckpt._core import FastckptError, FormatError, MappingError, ShapeError
from fastckpt.safeio import short

#: largest tensor a checkpoint may describe (bytes); larger means corrupt metadata
MAX_TENSOR_BYTES = 2**60

#: what a reader's own code raises when metadata values have the wrong type or shape
_MALFORMED = (
    AttributeError,
    TypeError,
    ValueError,
    KeyError,
    IndexError,
    OverflowError,
    RecursionError,
    NotImplementedError,
    ZeroDivisionError,
    struct.error,
)


@contextlib.contextmanager
def reading(path: Path | str) -> Iterator[None]:
    """The reader boundary: every failure on a checkpoint's bytes becomes one
    :class:`FastckptError` line naming ``path`` (or a file in it)."""
    try:
        yield
    except FastckptError as exc:
        message = str(exc)
        if str(path) in message:
            raise
        raise type(exc)(f"{path}: {message}") from None
    except _MALFORMED as exc:
        raise FormatError(
            f"{path}: malformed checkpoint metadata ({type(exc).__name__}: {short(str(exc))})"
        ) from None
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from None


class Chunk(NamedTuple):
    """One stored box of a tensor (the ``Chunk`` tuple of ``fastckpt._core``)."""

    path: str
    data_offset: int
    data_len: int
    storage_offset: int
    strides: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class TensorMeta:
    """A tensor as the metadata describes it, before its chunks are located.

    Attributes:
        name: output name (Hugging Face name for model tensors, the source key otherwise).
        key: the key in the source checkpoint.
        dtype: safetensors dtype name (``"BF16"``, ``"F32"``, ...).
        shape: global shape.
        n_chunks: number of stored chunks (zero-size ones included).
        is_model: part of the model's weights (as opposed to optimizer or trainer state).
    """

    name: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    n_chunks: int
    is_model: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorEntry:
    """A tensor with its chunks located: what the Rust core needs to copy it."""

    meta: TensorMeta
    chunks: tuple[Chunk, ...]

    @property
    def name(self) -> str:
        return self.meta.name

    def source(self) -> tuple[str, str, list[int], list[Chunk]]:
        """The ``Source`` tuple of ``fastckpt._core``."""
        return (self.meta.name, self.meta.dtype, list(self.meta.shape), list(self.chunks))


@dataclass(frozen=True)
class TensorInfo:
    """What ``inspect`` and ``Checkpoint.info`` report about one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: int
    nbytes: int


class Reader(Protocol):
    """What each format module provides."""

    def locate(self, metas: list[TensorMeta]) -> list[TensorEntry]:
        """Locate the chunks of ``metas`` (batched: each source file is opened once)."""
        ...


@dataclass
class Catalogue:
    """Every tensor of one checkpoint.

    Attributes:
        format: ``"dcp"`` or ``"safetensors"``.
        path: the checkpoint directory (or file).
        tensors: every tensor entry, model and non-model, by output name, in source key order.
        skipped: non-tensor entries (BYTE_IO items, ...) by source key, never converted.
        side_dirs: directories where config and tokenizer files may be found, best first.
        notes: remarks found while reading (e.g. the wrapper that was stripped).
        warnings: what the user should act on (e.g. names no mapping knows, kept as they are);
            a conversion reports them.
        undecided: why no entry could be taken as a model weight (then none is: the caller
            picks them with include patterns, or refuses with this message).
        optimizer_dir: a separate checkpoint holding the optimizer state (accelerate's
            ``optimizer_0/`` beside ``pytorch_model_fsdp_0/``).
    """

    format: str
    path: Path
    reader: Reader
    tensors: dict[str, TensorMeta]
    skipped: list[str] = field(default_factory=list)
    side_dirs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    undecided: str | None = None
    optimizer_dir: Path | None = None

    def __post_init__(self) -> None:
        for name, meta in self.tensors.items():
            check_meta(self.path, name, meta)

    def model_names(self) -> list[str]:
        return [name for name, meta in self.tensors.items() if meta.is_model]

    def meta(self, name: str) -> TensorMeta:
        try:
            return self.tensors[name]
        except KeyError:
            raise MappingError(f"{self.path}: no tensor named {name!r}") from None

    def locate(self, names: list[str]) -> list[TensorEntry]:
        metas = [self.meta(n) for n in names]
        with reading(self.path):
            return self.reader.locate(metas)


def check_meta(path: Path, name: object, meta: TensorMeta) -> None:
    """Refuse a tensor whose name, dtype or shape no output could hold (one line, naming it)."""
    if not isinstance(name, str) or not isinstance(meta.key, str):
        raise FormatError(f"{path}: tensor name {short(name)} is not a string")
    try:
        name.encode()
        meta.key.encode()
    except UnicodeEncodeError:
        raise FormatError(f"{path}: tensor name {short(name)} is not valid UTF-8") from None
    try:
        itemsize = _core.dtype_size(meta.dtype)
    except (FastckptError, TypeError):
        raise FormatError(
            f"{path}: tensor {name!r} has unknown dtype {short(meta.dtype)}"
        ) from None
    shape = meta.shape
    if not isinstance(shape, tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ShapeError(f"{path}: tensor {name!r} has an invalid shape {short(shape)}")
    if math.prod(shape) * itemsize > MAX_TENSOR_BYTES:
        raise ShapeError(f"{path}: tensor {name!r} has an implausible shape {short(shape)}")
