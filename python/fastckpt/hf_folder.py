"""Hugging Face safetensors folders (and single ``.safetensors`` files) as a source.

Used to inspect and verify converted output, and to read HF checkpoints with the same API. Each
tensor is one contiguous chunk; the header is read with :mod:`json`, nothing else is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from fastckpt._core import FormatError
from fastckpt.catalog import Catalogue, Chunk, TensorEntry, TensorMeta
from fastckpt.safeio import item_path, open_regular, read_regular

#: safetensors readers reject larger headers
MAX_HEADER_BYTES = 100_000_000


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.safetensors"))


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    acc = 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= dim
    return tuple(reversed(strides))


def read_header(path: Path) -> tuple[int, dict[str, dict[str, object]]]:
    """Return ``(data_start, header)`` of a safetensors file, validating sizes."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise FormatError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise FormatError(f"{path}: invalid safetensors header length {n}")
        raw = os.pread(fd, n, 8)
    finally:
        os.close(fd)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    return 8 + n, header


def read_hf(path: Path) -> Catalogue:
    """Catalogue a safetensors file or a folder of them."""
    if path.is_file():
        files = [path]
        directory = path.parent
    else:
        directory = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(read_regular(index, limit=MAX_HEADER_BYTES))["weight_map"]
                names = dict.fromkeys(weight_map.values())
            except (KeyError, ValueError, TypeError, AttributeError) as exc:
                raise FormatError(f"{index}: invalid index ({type(exc).__name__})") from None
            files = [item_path(path, n, where=f"{index}: weight_map") for n in names]
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FormatError(f"{path}: no .safetensors files")
    tensors: dict[str, TensorMeta] = {}
    chunks: dict[str, Chunk] = {}
    for file in files:
        if not file.is_file():
            raise FormatError(f"{file}: listed in the index but missing")
        start, header = read_header(file)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in tensors:
                raise FormatError(f"{file}: tensor {name!r} also appears in another file")
            try:
                dtype = str(info["dtype"])
                shape = tuple(int(s) for s in info["shape"])  # type: ignore[attr-defined]
                begin, end = (int(x) for x in info["data_offsets"])  # type: ignore[attr-defined]
                if not 0 <= begin <= end:
                    raise ValueError("data_offsets outside the file")
            except (KeyError, TypeError, ValueError):
                raise FormatError(f"{file}: malformed header entry for {name!r}") from None
            tensors[name] = TensorMeta(name, name, dtype, shape, 1, True)
            zeros = (0,) * len(shape)
            n_elems = math.prod(shape)
            chunks[name] = Chunk(
                str(file), start + begin, end - begin, 0, _c_strides(shape), zeros, shape
            )
            if n_elems == 0:
                chunks.pop(name)
    return Catalogue(
        format="safetensors",
        path=path,
        reader=_HfReader(chunks),
        tensors=tensors,
        side_dirs=[directory],
    )


class _HfReader:
    def __init__(self, chunks: dict[str, Chunk]) -> None:
        self._chunks = chunks

    def locate(self, metas: list[TensorMeta]) -> list[TensorEntry]:
        out = []
        for meta in metas:
            chunk = self._chunks.get(meta.name)
            out.append(TensorEntry(meta, (chunk,) if chunk is not None else ()))
        return out
