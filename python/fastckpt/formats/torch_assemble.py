"""Parsed torch.save files -> a :class:`Catalogue`: DTensor placements to boxes, chunks, replicas.

Each DTensor's box in the global tensor is computed from its placements and the rank's
coordinate in the device mesh; the primary boxes of all ranks must cover the tensor. An FSDP1
``ShardedTensor`` carries its shards' boxes and the list of every rank's shards, which must tile
the tensor and all be present (a missing rank file is named with the missing region). Plain
tensors are replicas: rank 0's copy is kept and :class:`TorchSaveReader` checks the others equal
when the tensor is read. In a full state dict (one file) each tensor is one chunk, a strided view
of its storage (tied weights and views share storages).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastckpt import _core
from fastckpt._core import FormatError, ShapeError
from fastckpt.catalog import Catalogue, Chunk, TensorEntry, TensorMeta
from fastckpt.formats.dcp import normalise_name
from fastckpt.formats.torch_load import _RankFile
from fastckpt.unpickle import (
    TORCH_TO_ST,
    DTensorRef,
    DTensorSpec,
    Placement,
    ShardBox,
    ShardedTensorRef,
    TensorRef,
    torch_itemsize,
)


def _placement_box(
    path: Path,
    key: str,
    ref: DTensorRef,
    mesh_shape: tuple[int, ...],
    coord: tuple[int, ...],
) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """``(offsets, sizes, primary)`` of one rank's box; ``primary`` is False for replicas."""
    spec: DTensorSpec = ref.spec
    placements = spec.__dict__.get("placements")
    if not isinstance(placements, tuple | list) or len(placements) != len(mesh_shape):
        raise FormatError(
            f"{path}: DTensor {key!r} has placements {placements!r} for a {len(mesh_shape)}-D mesh"
        )
    nd = len(ref.shape)
    offsets, sizes = [0] * nd, list(ref.shape)
    primary = True
    sharded: dict[int, list[int]] = {}
    for m, p in enumerate(placements):
        kind = p.kind if isinstance(p, Placement) else repr(p)
        if kind == "Replicate":
            primary = primary and coord[m] == 0
        elif kind == "Shard":
            d = int(p.__dict__["dim"])
            d = d + nd if d < 0 else d
            if not 0 <= d < nd:
                raise FormatError(f"{path}: DTensor {key!r} is sharded on dim {d} of {nd}")
            k, n = mesh_shape[m], sizes[d]
            piece = -(-n // k) if n else 0  # torch.chunk: ceil(n/k), tail pieces short or empty
            start = min(coord[m] * piece, n)
            offsets[d] += start
            sizes[d] = max(0, min(piece, n - start))
            sharded.setdefault(d, []).append(m)
        elif kind in ("Partial", "_Partial", "_MaskPartial", "MaskPartial", "_NormPartial"):
            raise FormatError(
                f"{path}: DTensor {key!r} has a {kind} placement: each rank holds an unreduced "
                "partial value that must be summed across ranks, which a copy cannot do; save "
                "after redistributing to Shard/Replicate"
            )
        elif kind in ("_StridedShard", "StridedShard"):
            raise FormatError(
                f"{path}: DTensor {key!r} has a _StridedShard placement (FSDP2 + TP): its "
                "interleaved layout is not recorded in a per-rank file, so fastckpt refuses it "
                "rather than guess; save with DCP instead"
            )
        else:
            raise FormatError(f"{path}: DTensor {key!r} has an unknown placement {kind}")
    order = spec.__dict__.get("shard_order")
    if order:
        found = {}
        for entry in order:
            args: tuple[Any, ...] = tuple(getattr(entry, "_args", None) or ())
            if len(args) == 2:
                found[int(args[0])] = tuple(int(x) for x in args[1])
        if found and found != {d: tuple(ms) for d, ms in sharded.items()}:
            raise FormatError(
                f"{path}: DTensor {key!r} uses a non-default shard order {found}; not supported"
            )
    return tuple(offsets), tuple(sizes), primary


def _normalise(key: str) -> str:
    """:func:`normalise_name` to a fixed point: adjacent wrapper components
    (``_fsdp_wrapped_module._checkpoint_wrapped_module.``) need more than one pass."""
    while True:
        name = normalise_name(key)
        if name == key:
            return name
        key = name


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _chunk(rank_file: _RankFile, ref: TensorRef, offsets: tuple[int, ...], key: str) -> Chunk:
    data_offset, data_len = rank_file.storages[ref.storage.key]
    item = torch_itemsize(ref.dtype)
    if math.prod(ref.shape):
        pairs = zip(ref.shape, ref.stride, strict=True)
        last = ref.storage_offset + sum((s - 1) * st for s, st in pairs)
        negative = ref.storage_offset < 0 or min(ref.stride, default=0) < 0
        if negative or (last + 1) * item > data_len:
            raise FormatError(
                f"{rank_file.path}: tensor {key!r} (offset {ref.storage_offset}, shape "
                f"{ref.shape}, strides {ref.stride}) runs past its storage of {data_len} bytes"
            )
    return Chunk(
        path=str(rank_file.path),
        data_offset=data_offset,
        data_len=data_len,
        storage_offset=ref.storage_offset,
        strides=ref.stride,
        offsets=offsets,
        sizes=ref.shape,
    )


@dataclass(frozen=True)
class _Placed:
    """A tensor's located chunks, plus replica copies to check (plain tensors on many ranks)."""

    chunks: tuple[Chunk, ...]
    replicas: tuple[Chunk, ...] = ()


def _check_same_keys(files: list[_RankFile]) -> None:
    """Every rank file holds the same tensor keys."""
    first = files[0]
    for f in files[1:]:
        extra = set(f.entries) ^ set(first.entries)
        if extra:
            key = sorted(extra)[0]
            where = f.path if key in f.entries else first.path
            raise FormatError(
                f"{f.path}: tensor {key!r} is in {where.name} but not in every rank file "
                f"(ranks disagree)"
            )


def _place_dtensor(files: list[_RankFile], key: str, value0: DTensorRef, source: Path) -> _Placed:
    """The primary box of every rank, which together must cover the global tensor."""
    first = files[0]
    values = [f.entries[key] for f in files]
    dtype0 = value0.dtype
    chunks: list[Chunk] = []
    covered: int = 0
    for f, v in zip(files, values, strict=True):
        if not isinstance(v, DTensorRef) or v.shape != value0.shape or v.dtype != dtype0:
            raise FormatError(
                f"{f.path}: tensor {key!r} differs from rank {first.rank}'s (type, global "
                "shape or dtype)"
            )
        if v.local.dtype != v.dtype:
            raise FormatError(
                f"{f.path}: DTensor {key!r} stores {v.local.dtype}, declares {v.dtype}"
            )
        mesh_shape, coord = f.coords[id(v.spec.__dict__.get("mesh"))]
        offsets, sizes, primary = _placement_box(f.path, key, v, mesh_shape, coord)
        if v.local.shape != sizes:
            raise ShapeError(
                f"{f.path}: DTensor {key!r} local shape {v.local.shape} does not match its "
                f"box {sizes} at {offsets} (placements, mesh coordinate {coord})"
            )
        box_numel = _numel(sizes)
        if primary and box_numel:
            chunks.append(_chunk(f, v.local, offsets, key))
            covered += box_numel
    shape = value0.shape
    if covered != math.prod(shape):
        gap = _core.first_gap(shape, [(c.offsets, c.sizes) for c in chunks])
        missing = f"; nothing holds offsets {gap[0]} (sizes {gap[1]})" if gap else ""
        hint = (
            " (a single rank's file: point at the folder holding every rank file)"
            if len(files) == 1
            else ""
        )
        raise ShapeError(
            f"{source}: DTensor {key!r} shards cover {covered} of {math.prod(shape)} "
            f"elements{missing}{hint}"
        )
    return _Placed(tuple(chunks))


def _check_shard_boxes(
    source: Path, key: str, shape: tuple[int, ...], boxes: list[ShardBox]
) -> None:
    """The boxes of a ShardedTensor's global metadata lie in its shape, do not overlap (pairwise,
    up to 4096 boxes, as the planner) and hold as many elements as the tensor: they tile it."""
    where = f"{source}: ShardedTensor {key!r}"
    for b in boxes:
        if len(b.offsets) != len(shape) or any(
            o + s > n for o, s, n in zip(b.offsets, b.sizes, shape, strict=True)
        ):
            raise ShapeError(
                f"{where}: shard at offsets {list(b.offsets)} (sizes {list(b.sizes)}) lies "
                f"outside its global size {list(shape)}"
            )
    live = [b for b in boxes if _numel(b.sizes)]
    for i, a in enumerate(live[:4096]):
        for b in live[i + 1 : 4096]:
            if all(
                ao < bo + bs and bo < ao + as_
                for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
            ):
                raise ShapeError(
                    f"{where}: shards at offsets {list(a.offsets)} (sizes {list(a.sizes)}) and "
                    f"{list(b.offsets)} (sizes {list(b.sizes)}) overlap"
                )
    total = sum(_numel(b.sizes) for b in live)
    if total != math.prod(shape):
        raise ShapeError(
            f"{where}: its shards hold {total} elements but its global size {list(shape)} has "
            f"{math.prod(shape)} (the metadata's shard list is incomplete or inconsistent)"
        )


def _place_sharded(
    files: list[_RankFile], key: str, value0: ShardedTensorRef, source: Path
) -> _Placed:
    """The local shards of every rank, each at its box; together they must tile the tensor, as
    the global metadata (checked to agree on every rank) lists its shards."""
    first = files[0]
    boxes = {(b.offsets, b.sizes): b for b in value0.shards}
    _check_shard_boxes(source, key, value0.shape, list(value0.shards))
    chunks: dict[tuple[tuple[int, ...], tuple[int, ...]], Chunk] = {}
    for f in files:
        v = f.entries[key]
        if not isinstance(v, ShardedTensorRef) or (v.shape, v.dtype) != (
            value0.shape,
            value0.dtype,
        ):
            raise FormatError(
                f"{f.path}: tensor {key!r} differs from rank {first.rank}'s (type, global "
                "shape or dtype)"
            )
        if {(b.offsets, b.sizes) for b in v.shards} != set(boxes):
            raise FormatError(
                f"{f.path}: ShardedTensor {key!r} lists other shards than rank {first.rank}'s "
                "file (ranks disagree)"
            )
        for ref, box in v.local:
            if (box.offsets, box.sizes) not in boxes:
                raise FormatError(
                    f"{f.path}: ShardedTensor {key!r} has a local shard at offsets "
                    f"{list(box.offsets)} (sizes {list(box.sizes)}) that its metadata does not list"
                )
            if ref.shape != box.sizes or ref.dtype != value0.dtype:
                raise ShapeError(
                    f"{f.path}: ShardedTensor {key!r} local shard is {ref.dtype} {list(ref.shape)}"
                    f", its metadata says {value0.dtype} {list(box.sizes)}"
                )
            if _numel(box.sizes):  # a replica of a box already placed (HSDP) is not read
                chunks.setdefault((box.offsets, box.sizes), _chunk(f, ref, box.offsets, key))
    for box in value0.shards:
        if _numel(box.sizes) and (box.offsets, box.sizes) not in chunks:
            held = f"rank {box.rank}'s" if box.rank is not None else "a rank's"
            hint = " (point at the folder holding every rank file)" if len(files) == 1 else ""
            raise ShapeError(
                f"{source}: ShardedTensor {key!r} is missing its shard at offsets "
                f"{list(box.offsets)} (sizes {list(box.sizes)}), {held} file, which is not "
                f"here{hint}"
            )
    return _Placed(tuple(chunks.values()))


def _place_plain(files: list[_RankFile], key: str, value0: Any) -> _Placed:
    """Rank 0's copy of a plain tensor, with the other ranks' copies as replicas to check."""
    first = files[0]
    values = [f.entries[key] for f in files]
    dtype0 = value0.dtype
    for f, v in zip(files, values, strict=True):
        if not isinstance(v, TensorRef) or v.shape != value0.shape or v.dtype != dtype0:
            raise FormatError(
                f"{f.path}: tensor {key!r} differs from rank {first.rank}'s (type, shape or dtype)"
            )
    assert isinstance(value0, TensorRef)
    shape = value0.shape
    zeros = (0,) * len(shape)
    chunks = [_chunk(first, value0, zeros, key)] if math.prod(shape) else []
    replicas = tuple(
        _chunk(f, v, zeros, key)
        for f, v in zip(files[1:], values[1:], strict=True)
        if math.prod(shape) and isinstance(v, TensorRef)
    )
    return _Placed(tuple(chunks), replicas)


def _assemble(
    files: list[_RankFile], source: Path
) -> tuple[dict[str, TensorMeta], dict[str, _Placed]]:
    """Catalogue entries (normalised name -> meta) and located chunks (source key -> placed) of the
    tensors in ``files``, one file per rank (a single file is rank 0)."""
    first = files[0]
    metas: dict[str, TensorMeta] = {}
    placed: dict[str, _Placed] = {}
    names: dict[str, str] = {}
    _check_same_keys(files)
    for key, value0 in first.entries.items():
        dtype0 = value0.dtype
        st = TORCH_TO_ST.get(str(dtype0))
        if st is None:
            raise FormatError(
                f"{first.path}: tensor {key!r} has dtype {dtype0}, which safetensors cannot store"
            )
        if isinstance(value0, DTensorRef):
            placed_value = _place_dtensor(files, key, value0, source)
        elif isinstance(value0, ShardedTensorRef):
            placed_value = _place_sharded(files, key, value0, source)
        else:
            placed_value = _place_plain(files, key, value0)
        shape = value0.shape
        name = _normalise(key)
        if name in names:
            raise FormatError(f"{source}: keys {names[name]!r} and {key!r} both map to {name!r}")
        names[name] = key
        metas[name] = TensorMeta(
            name=name,
            key=key,
            dtype=st,
            shape=shape,
            n_chunks=len(placed_value.chunks),
            is_model=True,
        )
        placed[key] = placed_value
    return metas, placed


class TorchSaveReader:
    """Hands out the chunks located at catalogue time; checks plain-tensor replicas agree."""

    def __init__(self, placed: dict[str, _Placed]) -> None:
        self._placed = placed

    def locate(self, metas: list[TensorMeta]) -> list[TensorEntry]:
        out = []
        for meta in metas:
            placed = self._placed[meta.key]
            entry = TensorEntry(meta, placed.chunks)
            if placed.replicas:
                want = _core.digest(entry.source())
                for replica in placed.replicas:
                    got = _core.digest((meta.name, meta.dtype, list(meta.shape), [replica]))
                    if got != want:
                        raise FormatError(
                            f"{replica.path}: tensor {meta.key!r} is not a DTensor and differs "
                            "from rank 0's copy (plain tensors must be identical on every rank)"
                        )
            out.append(entry)
        return out


def _catalogue(
    fmt: str, path: Path, files: list[_RankFile], side_dirs: list[Path], notes: list[str]
) -> Catalogue:
    metas, placed = _assemble(files, path)
    first = files[0]
    if first.wrapper:
        notes.append(f"model weights under {first.wrapper!r}")
    if first.stubs:
        notes.append("inert stand-ins for pickled classes: " + ", ".join(sorted(first.stubs)))
    return Catalogue(
        format=fmt,
        path=path,
        reader=TorchSaveReader(placed),
        tensors=metas,
        skipped=list(first.skipped),
        side_dirs=side_dirs,
        notes=notes,
    )
