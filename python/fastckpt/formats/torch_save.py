"""Whole-file ``torch.save`` checkpoints: veRL FSDP per-rank files and full state dicts.

Two layouts, one reader:

* **Per-rank files** (veRL ``model_world_size_{W}_rank_{R}.pt``, old prime-rl
  ``trainer_{R}.pt``): each rank's ``torch.save(model.state_dict())``, a dict FQN -> DTensor
  (FSDP2, or FSDP1 ``SHARDED_STATE_DICT`` on a device mesh) or plain tensor. Each DTensor's box in
  the global tensor is computed from its placements and the rank's coordinate in the device mesh
  (the mesh tensor is a storage of the same archive); plain tensors are replicas: rank 0's copy is
  kept and the others are checked equal when the tensor is read.
* **Full state dicts** in one file (RLinf ``full_weights.pt``, ``pytorch_model.bin``, old
  prime-rl ``trainer.pt`` with ``{"model": .., "optimizers": .., "progress": ..}``): each tensor
  is one chunk, a strided view of its storage (tied weights and views share storages).

``data.pkl`` is read by :class:`fastckpt.unpickle.StubbingUnpickler`: unknown classes become
inert stubs; nothing is executed. Format facts: ``shared/formats/torch-pickles.md`` §1-§5.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastckpt import _core
from fastckpt._core import FormatError, ShapeError
from fastckpt.catalog import Catalogue, Chunk, TensorEntry, TensorMeta
from fastckpt.formats import Format
from fastckpt.formats.dcp import normalise_name
from fastckpt.unpickle import (
    TORCH_TO_ST,
    DeviceMesh,
    DTensorRef,
    DTensorSpec,
    FlatLayout,
    MeshLayout,
    Placement,
    Stub,
    TensorRef,
    TorchZip,
    load_state_dict_pickle,
    open_fd,
    torch_itemsize,
)

#: veRL per-rank model files
RANK_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
#: old prime-rl per-rank trainer files (keyed by local rank)
TRAINER_FILE = re.compile(r"^trainer_(\d+)\.pt$")
#: suffixes of whole-file torch.save checkpoints
TORCH_SAVE_SUFFIXES = (".pt", ".pth", ".bin")
#: keys under which a checkpoint dict holds the model state dict, best first
MODEL_KEYS = ("model", "state_dict", "model_state_dict", "module")
#: cap on a data.pkl (real ones are KB to a few MB)
MAX_PICKLE_BYTES = 1 << 30
#: cap on a device-mesh storage read into memory
MAX_MESH_BYTES = 1 << 24


def is_torch_save_file(path: Path) -> bool:
    """True for a file named like a whole-file torch.save checkpoint."""
    return path.is_file() and path.suffix in TORCH_SAVE_SUFFIXES


def _listing(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def is_rank_dir(path: Path) -> bool:
    """True if ``path`` holds per-rank model files (veRL or old prime-rl layout)."""
    if not path.is_dir():
        return False
    names = _listing(path)
    return any(RANK_FILE.match(n) for n in names) or any(TRAINER_FILE.match(n) for n in names)


def single_torch_save_file(path: Path) -> Path | None:
    """The one torch.save file of a directory holding exactly one, else None."""
    if not path.is_dir():
        return None
    found = [path / n for n in _listing(path) if is_torch_save_file(path / n)]
    return found[0] if len(found) == 1 else None


# --------------------------------------------------------------------------------------------
# one file


@dataclass
class _RankFile:
    """One parsed torch.save file: its model entries, and the rank it was written by."""

    path: Path
    rank: int
    entries: dict[str, Any]  # source key -> TensorRef | DTensorRef
    storages: dict[str, tuple[int, int]]  # storage key -> (data offset, data length)
    coords: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]  # id(mesh) -> (shape, coord)
    skipped: list[str] = field(default_factory=list)
    stubs: set[str] = field(default_factory=set)
    wrapper: str = ""


def _read_ints(archive: TorchZip, ref: TensorRef) -> list[int]:
    """Read a small integer tensor (a device mesh) in C order."""
    codes = {"int64": "q", "int32": "i", "int16": "h", "int8": "b", "uint8": "B"}
    code = codes.get(ref.dtype)
    if code is None:
        raise FormatError(f"{archive.path}: device mesh stored as {ref.dtype}, expected integers")
    entry = archive.storage(ref.storage)
    if entry.size > MAX_MESH_BYTES:
        raise FormatError(f"{archive.path}: device mesh storage is implausibly large")
    raw = archive.read(entry)
    item = struct.calcsize(code)
    values = struct.unpack(f"<{len(raw) // item}{code}", raw[: len(raw) // item * item])
    out = []
    for idx in itertools.product(*(range(s) for s in ref.shape)):
        pos = ref.storage_offset + sum(i * s for i, s in zip(idx, ref.stride, strict=True))
        if not 0 <= pos < len(values):
            raise FormatError(f"{archive.path}: device mesh tensor runs past its storage")
        out.append(int(values[pos]))
    return out


def _ints(value: Any) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _mesh_ranks(archive: TorchZip, mesh: DeviceMesh) -> tuple[tuple[int, ...], list[int]]:
    """``(mesh shape, global ranks in C order)`` of a pickled DeviceMesh (any torch version)."""
    where = f"{archive.path}: device mesh"
    tensor = mesh.__dict__.get("mesh")
    if isinstance(tensor, TensorRef):  # torch <= 2.14: the mesh tensor itself
        return tensor.shape, _read_ints(archive, tensor)
    rank_map = mesh.__dict__.get("_rank_map")
    layout = mesh.__dict__.get("_layout")
    if isinstance(rank_map, TensorRef) and isinstance(layout, MeshLayout):
        # torch 2.15+: global ranks = rank_map[offset(coord)], one _FlatLayout per mesh dim
        flat = _read_ints(archive, rank_map)
        axes = layout.__dict__.get("axes")
        if not isinstance(axes, tuple) or not all(isinstance(a, FlatLayout) for a in axes):
            raise FormatError(f"{where}: unexpected _MeshLayout {layout!r}")
        dims: list[list[int]] = []  # per mesh dim: the rank_map offset of each index
        for axis in axes:
            shape, stride = _ints(axis.__dict__["shape"]), _ints(axis.__dict__["stride"])
            offs = [
                sum(i * s for i, s in zip(idx, stride, strict=True))
                for idx in itertools.product(*(range(n) for n in shape))
            ]
            dims.append(offs)
        ranks = []
        for combo in itertools.product(*dims):
            pos = sum(combo)
            if not 0 <= pos < len(flat):
                raise FormatError(f"{where}: layout points past the rank map")
            ranks.append(flat[pos])
        return tuple(len(d) for d in dims), ranks
    raise FormatError(f"{where} has neither a mesh tensor nor a rank map (unknown torch version)")


def _coordinate(
    archive: TorchZip, mesh: Any, rank: int, key: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if not isinstance(mesh, DeviceMesh):
        raise FormatError(f"{archive.path}: DTensor {key!r} has no device mesh (got {mesh!r})")
    shape, ranks = _mesh_ranks(archive, mesh)
    if len(set(ranks)) != len(ranks):
        raise FormatError(f"{archive.path}: device mesh {ranks} repeats a rank")
    saved_rank = mesh.__dict__.get("_rank")
    if isinstance(saved_rank, int) and saved_rank != rank:
        raise FormatError(
            f"{archive.path}: written by global rank {saved_rank}, but its name says rank {rank} "
            "(files keyed by local rank from several nodes?)"
        )
    if rank not in ranks:
        raise FormatError(f"{archive.path}: rank {rank} is not in the device mesh {ranks}")
    flat = ranks.index(rank)
    coord = []
    for n in reversed(shape):
        coord.append(flat % n)
        flat //= n
    coordinate = tuple(reversed(coord))
    saved = mesh.__dict__.get("_coordinate_on_dim")
    if isinstance(saved, tuple | list) and tuple(saved) != coordinate:
        raise FormatError(
            f"{archive.path}: mesh coordinate {tuple(saved)} recorded, {coordinate} computed"
        )
    return shape, coordinate


def _flat_param_message(source: str, key: str) -> str:
    return (
        f"{source}: entry {key!r} is an FSDP1 flat parameter (LOCAL_STATE_DICT): flat "
        "parameters are padded 1-D slices of many tensors with no per-tensor shapes, so they "
        "cannot be converted; save with SHARDED_STATE_DICT on a device mesh, or FSDP2"
    )


def _is_sharded_tensor(value: Any) -> bool:
    return isinstance(value, Stub) and "ShardedTensor" in value.qualname()


def _sharded_tensor_message(source: str, key: str) -> str:
    return (
        f"{source}: entry {key!r} is a ShardedTensor (FSDP1 SHARDED_STATE_DICT without a device "
        "mesh, veRL FSDP1's default), which fastckpt does not read yet; save with "
        "FullyShardedDataParallel(..., device_mesh=init_device_mesh('cuda', (world_size,))) or "
        "FSDP2 (DTensor state dicts), or write the checkpoint with torch.distributed.checkpoint"
    )


def _model_dict(obj: Any, source: str) -> tuple[dict[Any, Any], str]:
    """The model state dict inside a loaded checkpoint, and the key it was found under."""

    def tensors_in(d: dict[Any, Any]) -> int:
        return sum(isinstance(v, TensorRef | DTensorRef) for v in d.values())

    if isinstance(obj, dict):
        if tensors_in(obj):
            return obj, ""
        for key in MODEL_KEYS:
            sub = obj.get(key)
            if isinstance(sub, dict) and tensors_in(sub):
                return sub, key
        flat = [k for k in obj if "_flat_param" in str(k)]
        if flat:
            raise FormatError(_flat_param_message(source, str(flat[0])))
        sharded = [k for k, v in obj.items() if _is_sharded_tensor(v)]
        if sharded:
            raise FormatError(_sharded_tensor_message(source, str(sharded[0])))
        shown = ", ".join(repr(k) for k in list(obj)[:8])
        raise FormatError(f"{source}: no model state dict found (top-level keys: {shown})")
    kind = obj.qualname() if isinstance(obj, Stub) else type(obj).__name__
    raise FormatError(f"{source}: not a state dict (the pickle holds a {kind})")


def _load_file(path: Path, rank: int) -> _RankFile:
    try:
        fd = open_fd(str(path))
    except FileNotFoundError:
        raise FormatError(f"{path}: missing file") from None
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 4, 0)
        if head[:1] == b"\x80":
            raise FormatError(
                f"{path}: a legacy (non-zip) torch.save file, written by torch < 1.6 or with "
                "_use_new_zipfile_serialization=False; re-save it with a current torch"
            )
        archive = TorchZip(str(path), fd, 0, size)
        pkl = archive.entries[archive.prefix + "data.pkl"]
        if pkl.size > MAX_PICKLE_BYTES:
            raise FormatError(f"{path}: data.pkl is implausibly large ({pkl.size} bytes)")
        obj, stubs = load_state_dict_pickle(archive.read(pkl), source=str(path))
        state, wrapper = _model_dict(obj, str(path))
        out = _RankFile(path, rank, {}, {}, {}, stubs=stubs, wrapper=wrapper)
        for key, value in state.items():
            key = str(key)
            if "_flat_param" in key:
                raise FormatError(_flat_param_message(str(path), key))
            if isinstance(value, TensorRef | DTensorRef):
                local = value.local if isinstance(value, DTensorRef) else value
                entry = archive.storage(local.storage)
                out.storages[local.storage.key] = (entry.data_offset, entry.size)
                if isinstance(value, DTensorRef):
                    mesh = value.spec.__dict__.get("mesh")
                    if id(mesh) not in out.coords:
                        out.coords[id(mesh)] = _coordinate(archive, mesh, rank, key)
                out.entries[key] = value
            elif _is_sharded_tensor(value):
                raise FormatError(_sharded_tensor_message(str(path), key))
            elif isinstance(value, Stub) and "wrapper subclass" in value.qualname():
                raise FormatError(
                    f"{path}: entry {key!r} is a {value.qualname()}, not a DTensor: tensor "
                    "subclasses other than DTensor are not supported"
                )
            else:
                out.skipped.append(key)
        return out
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# geometry


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


def _assemble(
    files: list[_RankFile], source: Path
) -> tuple[dict[str, TensorMeta], dict[str, _Placed]]:
    first = files[0]
    metas: dict[str, TensorMeta] = {}
    placed: dict[str, _Placed] = {}
    names: dict[str, str] = {}
    for f in files[1:]:
        extra = set(f.entries) ^ set(first.entries)
        if extra:
            key = sorted(extra)[0]
            where = f.path if key in f.entries else first.path
            raise FormatError(
                f"{f.path}: tensor {key!r} is in {where.name} but not in every rank file "
                f"(ranks disagree)"
            )
    for key, value0 in first.entries.items():
        values = [f.entries[key] for f in files]
        dtype0 = value0.dtype
        st = TORCH_TO_ST.get(str(dtype0))
        if st is None:
            raise FormatError(
                f"{first.path}: tensor {key!r} has dtype {dtype0}, which safetensors cannot store"
            )
        if isinstance(value0, DTensorRef):
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
                hint = (
                    " (a single rank's file: point at the folder holding every rank file)"
                    if len(files) == 1
                    else ""
                )
                raise ShapeError(
                    f"{source}: DTensor {key!r} shards cover {covered} of {math.prod(shape)} "
                    f"elements{hint}"
                )
            placed_value = _Placed(tuple(chunks))
        else:
            for f, v in zip(files, values, strict=True):
                if not isinstance(v, TensorRef) or v.shape != value0.shape or v.dtype != dtype0:
                    raise FormatError(
                        f"{f.path}: tensor {key!r} differs from rank {first.rank}'s (type, shape "
                        "or dtype)"
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
            placed_value = _Placed(tuple(chunks), replicas)
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


# --------------------------------------------------------------------------------------------
# catalogues


def _rank_files(directory: Path) -> tuple[list[tuple[int, Path]], str]:
    names = _listing(directory)
    verl = [(m, n) for n in names if (m := RANK_FILE.match(n))]
    if verl:
        sizes: dict[int, list[str]] = {}
        for m, n in verl:
            sizes.setdefault(int(m.group(1)), []).append(n)
        if len(sizes) > 1:
            shown = "; ".join(f"W={w}: {', '.join(ns[:3])}" for w, ns in sorted(sizes.items()))
            raise FormatError(
                f"{directory}: rank files of several world sizes ({shown}); keep one run's files"
            )
        (world,) = sizes
        source = "file names"
        cfg = directory / "fsdp_config.json"
        if cfg.is_file():
            try:
                declared = json.loads(cfg.read_text()).get("world_size")
            except (ValueError, OSError, AttributeError) as exc:
                raise FormatError(f"{cfg}: unreadable ({exc})") from None
            if declared is not None and int(declared) != world:
                raise FormatError(
                    f"{cfg}: says world_size {declared}, but the rank files are "
                    f"model_world_size_{world}_rank_*.pt"
                )
            source = "fsdp_config.json and file names"
        ranks = {int(m.group(2)): directory / n for m, n in verl}
        for r in range(world):
            if r not in ranks:
                raise FormatError(
                    f"{directory / f'model_world_size_{world}_rank_{r}.pt'}: missing rank file "
                    f"(world size {world})"
                )
        bad = sorted(r for r in ranks if r >= world)
        if bad:
            raise FormatError(f"{ranks[bad[0]]}: rank {bad[0]} is outside world size {world}")
        return [(r, ranks[r]) for r in range(world)], f"world size {world} (from {source})"
    trainer = {int(m.group(1)): directory / n for n in names if (m := TRAINER_FILE.match(n))}
    world = max(trainer) + 1
    for r in range(world):
        if r not in trainer:
            raise FormatError(f"{directory / f'trainer_{r}.pt'}: missing rank file")
    return [(r, trainer[r]) for r in range(world)], f"world size {world} (trainer_R.pt files)"


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


def read_rank_dir(directory: Path) -> Catalogue:
    """Catalogue a folder of per-rank files (veRL FSDP1/FSDP2, old prime-rl ``trainer_R.pt``)."""
    ranks, how = _rank_files(directory)
    files = [_load_file(path, rank) for rank, path in ranks]
    parent = directory.parent
    side_dirs = [
        directory / "huggingface",
        directory / "hf",
        directory,
        parent / "huggingface",
        parent / "hf",
        parent / "tokenizer",
        parent,
    ]
    return _catalogue("torch_ranks", directory, files, side_dirs, [how])


def read_torch_save(path: Path) -> Catalogue:
    """Catalogue one whole-file torch.save (a file, or a folder holding exactly one)."""
    file = path if path.is_file() else single_torch_save_file(path)
    if file is None:
        raise FormatError(f"{path}: expected one torch.save file (.pt, .pth, .bin)")
    parent = file.parent
    side_dirs = [
        parent / "huggingface",
        parent / "hf",
        parent,
        parent.parent / "huggingface",
        parent.parent / "hf",
        parent.parent / "tokenizer",
    ]
    return _catalogue("torch_save", file, [_load_file(file, 0)], side_dirs, [])


RANKS_FORMAT = Format(
    "torch_ranks", sniff=is_rank_dir, open=read_rank_dir, what="model_world_size_W_rank_R.pt files"
)
FILE_FORMAT = Format(
    "torch_save",
    sniff=lambda p: is_torch_save_file(p) or single_torch_save_file(p) is not None,
    open=read_torch_save,
    what="single .pt/.bin file",
)
