"""Lazy, read-only access to the tensors of any checkpoint fastckpt reads.

Example:
    >>> import fastckpt
    >>> with fastckpt.open("step_100/policy/weights") as ckpt:      # doctest: +SKIP
    ...     ckpt.keys()[:2], ckpt.info("model.embed_tokens.weight")
    ...     emb = ckpt.tensor("model.embed_tokens.weight")           # numpy, bf16 via ml_dtypes
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from fastckpt import _core
from fastckpt._core import FastckptError
from fastckpt.catalog import Catalogue, TensorEntry, TensorInfo, TensorMeta
from fastckpt.formats.registry import open_catalogue

if TYPE_CHECKING:
    import numpy as np

_NUMPY_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "C64": "complex64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_ML_DTYPES_NAMES = {
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}
_TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "C64": "complex64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}


def numpy_dtype(dtype: str) -> np.dtype[Any]:
    """The numpy dtype for a safetensors dtype name (``BF16`` and fp8 need ``ml_dtypes``)."""
    import numpy as np

    if dtype in _NUMPY_NAMES:
        return np.dtype(_NUMPY_NAMES[dtype])
    if dtype in _ML_DTYPES_NAMES:
        try:
            import ml_dtypes
        except ImportError:
            raise FastckptError(
                f"numpy has no {dtype} dtype and ml_dtypes is not installed: "
                "pip install ml_dtypes, or use tensor(name, framework='pt')"
            ) from None
        found: np.dtype[Any] = np.dtype(getattr(ml_dtypes, _ML_DTYPES_NAMES[dtype]))
        return found
    raise FastckptError(f"no numpy dtype for {dtype}")


def info_of(meta: TensorMeta) -> TensorInfo:
    return TensorInfo(
        meta.name, meta.dtype, meta.shape, meta.n_chunks, meta.numel * _core.dtype_size(meta.dtype)
    )


def _zero_copy_offset(entry: TensorEntry, itemsize: int) -> int | None:
    """Byte offset of the tensor in its file when one chunk holds it contiguously, else None."""
    meta = entry.meta
    if len(entry.chunks) != 1 or meta.numel == 0:
        return None
    chunk = entry.chunks[0]
    if chunk.sizes != meta.shape:
        return None
    expected = 1
    for dim, stride in zip(reversed(chunk.sizes), reversed(chunk.strides), strict=True):
        if dim != 1 and stride != expected:
            return None
        expected *= dim
    if (chunk.storage_offset + meta.numel) * itemsize > chunk.data_len:
        return None
    # DCP items sit at arbitrary file offsets: the view may be unaligned, which numpy and
    # torch both accept
    return chunk.data_offset + chunk.storage_offset * itemsize


class Checkpoint:
    """A checkpoint opened for reading; tensors are located on demand and never all loaded."""

    def __init__(self, catalogue: Catalogue) -> None:
        self._cat = catalogue
        self._entries: dict[str, TensorEntry] = {}

    @property
    def format(self) -> str:
        """``"dcp"`` or ``"safetensors"``."""
        return self._cat.format

    @property
    def path(self) -> Path:
        return self._cat.path

    @property
    def catalogue(self) -> Catalogue:
        return self._cat

    def keys(self) -> list[str]:
        """Model tensor names, as a conversion writes them (wrapper stripped)."""
        return self._cat.model_names()

    def __contains__(self, name: object) -> bool:
        return name in self._cat.tensors

    def __len__(self) -> int:
        return len(self.keys())

    def info(self, name: str) -> TensorInfo:
        """Dtype, global shape, stored chunk count and byte size of one tensor."""
        return info_of(self._cat.meta(name))

    def entry(self, name: str) -> TensorEntry:
        """The tensor with its chunks located (cached)."""
        if name not in self._entries:
            (self._entries[name],) = self._cat.locate([name])
        return self._entries[name]

    def tensor(self, name: str, *, framework: Literal["np", "pt"] = "np") -> Any:
        """Read one tensor.

        Args:
            name: a name from :meth:`keys` (or any tensor of the catalogue).
            framework: ``"np"`` for numpy (``BF16`` via ``ml_dtypes``), ``"pt"`` for torch.

        Returns:
            The tensor. When one chunk holds it contiguously it is a zero-copy view of the
            memory-mapped file (read-only for numpy, copy-on-write for torch); otherwise the
            chunks are gathered into a new buffer in parallel.
        """
        import numpy as np

        entry = self.entry(name)
        meta = entry.meta
        itemsize = _core.dtype_size(meta.dtype)
        nbytes = meta.numel * itemsize
        offset = _zero_copy_offset(entry, itemsize)
        if offset is not None:
            mode: Literal["c", "r"] = "c" if framework == "pt" else "r"
            raw: np.ndarray[Any, Any] = np.memmap(
                entry.chunks[0].path, dtype=np.uint8, mode=mode, offset=offset, shape=(nbytes,)
            )
        else:
            raw = np.empty(nbytes, dtype=np.uint8)
            _core.gather(entry.source(), meta.dtype, raw)
        if framework == "pt":
            return _to_torch(raw, meta)
        if framework != "np":
            raise FastckptError(f"unknown framework {framework!r} (use 'np' or 'pt')")
        return raw.view(numpy_dtype(meta.dtype)).reshape(meta.shape)

    def close(self) -> None:
        self._entries.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, format={self.format!r}, tensors={len(self)})"


def _to_torch(raw: np.ndarray[Any, Any], meta: TensorMeta) -> Any:
    import numpy as np

    try:
        import torch
    except ImportError:
        raise FastckptError("framework='pt' needs torch installed") from None
    itemsize = _core.dtype_size(meta.dtype)
    signed = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}.get(itemsize)
    if signed is None or meta.dtype == "C64":
        return torch.from_numpy(np.array(raw.view(numpy_dtype(meta.dtype)))).reshape(meta.shape)
    t = torch.from_numpy(raw.view(signed))
    return t.view(getattr(torch, _TORCH_NAMES[meta.dtype])).reshape(meta.shape)


def open(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint for lazy reading; the format is detected from its files."""
    return Checkpoint(open_catalogue(path))


def total_bytes(metas: list[TensorMeta]) -> int:
    return sum(math.prod(m.shape) * _core.dtype_size(m.dtype) for m in metas)
