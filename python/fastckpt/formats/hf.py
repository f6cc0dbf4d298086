"""Hugging Face safetensors folders (and single ``.safetensors`` files) as a source.

Used to inspect and verify converted output, and to read HF checkpoints with the same API. Each
tensor is one contiguous chunk; the header is read with :mod:`json`, nothing else is read.

torch's ``HuggingFaceStorageWriter`` with ``save_distributed=True`` writes something else under
the same suffix: every rank's *pieces* of each tensor (``shard-0000R-model-0000K-of-N``), each
piece's global offset in ``__metadata__["DCP_SHARDING_INFO"]`` and no global shape anywhere.
Those files are read as the pieces they are: the global shape is where the pieces end, every
shard index from 1 up must be present, the pieces must tile the tensor (a hole is an error
naming the tensor and the missing region), and one rank's file alone is refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

from fastckpt import _core
from fastckpt._core import FormatError, ShapeError
from fastckpt.catalog import Catalogue, Chunk, TensorEntry, TensorMeta
from fastckpt.formats import Format
from fastckpt.safeio import item_path, open_regular, read_regular

#: safetensors readers reject larger headers
MAX_HEADER_BYTES = 100_000_000
#: where torch's HuggingFaceStorageWriter keeps each piece's global offsets
SHARDING_INFO = "DCP_SHARDING_INFO"
_SHARD_FILE = re.compile(r"^shard-(\d+)-model-(\d+)-of-(\d+)\.safetensors$")


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
    """Catalogue a safetensors file or a folder of them (pieces of a distributed torch HF save
    are put together; see the module docstring)."""
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
    headers = []
    for file in files:
        if not file.is_file():
            raise FormatError(f"{file}: listed in the index but missing")
        start, header = read_header(file)
        headers.append((file, start, header, _sharding_info(file, header)))
    if any(_holds_pieces(file, info) for file, _, _, info in headers):
        return _read_pieces(path, directory, headers)
    tensors: dict[str, TensorMeta] = {}
    chunks: dict[str, Chunk] = {}
    for file, start, header, _ in headers:
        for name, (dtype, shape, chunk) in _entries(file, start, header):
            if name in tensors:
                raise FormatError(f"{file}: tensor {name!r} also appears in another file")
            tensors[name] = TensorMeta(name, name, dtype, shape, 1, True)
            if chunk.data_len:
                chunks[name] = chunk
    return Catalogue(
        format="safetensors",
        path=path,
        reader=_HfReader(chunks),
        tensors=tensors,
        side_dirs=[directory],
    )


def _entries(
    file: Path, start: int, header: dict[str, Any]
) -> list[tuple[str, tuple[str, tuple[int, ...], Chunk]]]:
    """``(name, (dtype, shape, chunk))`` of every tensor in one file's header, in header order."""
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            if not 0 <= begin <= end:
                raise ValueError("data_offsets out of order")
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{file}: malformed header entry for {name!r}") from None
        zeros = (0,) * len(shape)
        size = end - begin if math.prod(shape) else 0
        chunk = Chunk(str(file), start + begin, size, 0, _c_strides(shape), zeros, shape)
        out.append((name, (dtype, shape, chunk)))
    return out


def _sharding_info(file: Path, header: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """The global offsets of each piece in ``file`` (torch HF storage writer), or None."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or SHARDING_INFO not in meta:
        return None
    try:
        info = json.loads(meta[SHARDING_INFO])
        return {
            str(name): tuple(int(x) for x in entry["saved_offsets"]) for name, entry in info.items()
        }
    except (TypeError, ValueError, KeyError, AttributeError):
        raise FormatError(f"{file}: malformed {SHARDING_INFO} in the header metadata") from None


def _holds_pieces(file: Path, info: dict[str, tuple[int, ...]] | None) -> bool:
    """A file of pieces: named as the distributed writer names them, or placing a tensor at a
    non-zero offset (a rank-0 save records all-zero offsets and is a plain folder)."""
    if info is None:
        return False
    return bool(_SHARD_FILE.match(file.name)) or any(any(at) for at in info.values())


def _read_pieces(
    path: Path,
    directory: Path,
    headers: list[tuple[Path, int, dict[str, Any], dict[str, tuple[int, ...]] | None]],
) -> Catalogue:
    """Put the pieces of a distributed ``HuggingFaceStorageWriter`` save together."""
    how = "pieces of a distributed save (torch HuggingFaceStorageWriter, save_distributed=True)"
    if path.is_file():
        raise FormatError(
            f"{path}: holds one rank's {how}; convert the folder holding every "
            "shard-*-model-*.safetensors file"
        )
    plain = [str(h[0].name) for h in headers if h[3] is None]
    if plain:
        raise FormatError(f"{path}: mixes {how} with whole-tensor files ({', '.join(plain[:3])})")
    ranks = set()
    for file, *_ in headers:
        m = _SHARD_FILE.match(file.name)
        if m is None:
            raise FormatError(f"{file}: {how} under an unexpected name")
        ranks.add(int(m.group(1)))
    missing = sorted(set(range(1, max(ranks) + 1)) - ranks)
    if missing:
        raise FormatError(
            f"{path}: the {how} of shard(s) {missing} are missing (found shards {sorted(ranks)})"
        )
    dtypes: dict[str, str] = {}
    boxes: dict[str, list[Chunk]] = {}
    for file, start, header, offsets in headers:
        assert offsets is not None
        for name, (dtype, shape, chunk) in _entries(file, start, header):
            at = offsets.get(name, (0,) * len(shape))
            if len(at) != len(shape):
                raise FormatError(f"{file}: tensor {name!r}: offsets {list(at)} for shape {shape}")
            if dtypes.setdefault(name, dtype) != dtype:
                raise FormatError(f"{file}: tensor {name!r} is {dtype} here, {dtypes[name]} before")
            boxes.setdefault(name, []).append(chunk._replace(offsets=at))
    tensors: dict[str, TensorMeta] = {}
    for name, pieces in boxes.items():
        shape = tuple(
            max(c.offsets[k] + c.sizes[k] for c in pieces) for k in range(len(pieces[0].sizes))
        )
        hole = _core.first_gap(shape, [(c.offsets, c.sizes) for c in pieces])
        if hole is not None:
            region = ", ".join(f"{a}:{a + n}" for a, n in zip(*hole, strict=True))
            raise ShapeError(
                f"{path}: tensor {name!r} of shape {list(shape)}: no piece holds [{region}]"
            )
        boxes[name] = [c for c in pieces if c.data_len]
        tensors[name] = TensorMeta(name, name, dtypes[name], shape, len(pieces), True)
    return Catalogue(
        format="hf_dcp_shards",
        path=path,
        reader=_PiecesReader(boxes),
        tensors=tensors,
        side_dirs=[directory, directory.parent] if directory.name == "sharded" else [directory],
        notes=[f"{len(ranks)} ranks' {how}"],
    )


class _PiecesReader:
    def __init__(self, boxes: dict[str, list[Chunk]]) -> None:
        self._boxes = boxes

    def locate(self, metas: list[TensorMeta]) -> list[TensorEntry]:
        return [TensorEntry(meta, tuple(self._boxes.get(meta.name, ()))) for meta in metas]


class _HfReader:
    def __init__(self, chunks: dict[str, Chunk]) -> None:
        self._chunks = chunks

    def locate(self, metas: list[TensorMeta]) -> list[TensorEntry]:
        out = []
        for meta in metas:
            chunk = self._chunks.get(meta.name)
            out.append(TensorEntry(meta, (chunk,) if chunk is not None else ()))
        return out


def _sniff(path: Path) -> bool:
    return path.suffix == ".safetensors" if path.is_file() else is_hf_dir(path)


FORMAT = Format("safetensors", sniff=_sniff, open=read_hf, what=".safetensors files")
