"""Loading one ``torch.save`` file: its model entries, and the rank's place in each device mesh.

Shared by :mod:`fastckpt.formats.torch_file` (one full state dict) and
:mod:`fastckpt.formats.torch_ranks` (veRL / prime-rl per-rank files), and by the optimizer
transform. :func:`_load_file` opens the zip, unpickles ``data.pkl``, finds the model state dict
(possibly under a ``"model"``-like key) and records, for every DTensor's device mesh, this rank's
coordinate in it (the mesh tensor is a storage of the same archive). FSDP1 ``ShardedTensor``
values carry their shards' boxes themselves (:class:`fastckpt.unpickle.ShardedTensorRef`).

``data.pkl`` is read by :class:`fastckpt.unpickle.StubbingUnpickler`: unknown classes become
inert stubs; nothing is executed. Format facts: ``shared/formats/torch-pickles.md`` §1-§5.
"""

from __future__ import annotations

import itertools
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastckpt._core import FormatError
from fastckpt.unpickle import (
    DeviceMesh,
    DTensorRef,
    FlatLayout,
    MeshLayout,
    ShardedTensorRef,
    Stub,
    TensorRef,
    TorchZip,
    load_state_dict_pickle,
    open_fd,
)

#: keys under which a checkpoint dict holds the model state dict, best first
MODEL_KEYS = ("model", "state_dict", "model_state_dict", "module")
#: cap on a data.pkl (real ones are KB to a few MB)
MAX_PICKLE_BYTES = 1 << 30
#: cap on a device-mesh storage read into memory
MAX_MESH_BYTES = 1 << 24


@dataclass
class _RankFile:
    """One parsed torch.save file: its model entries, and the rank it was written by."""

    path: Path
    rank: int
    entries: dict[str, Any]  # source key -> TensorRef | DTensorRef | ShardedTensorRef
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
    """A ShardedTensor pickled in a form :mod:`fastckpt.unpickle.sharded` does not recognise
    (classes under other module names: a torch older than 1.13?)."""
    return (
        f"{source}: entry {key!r} is a ShardedTensor (FSDP1 SHARDED_STATE_DICT without a device "
        "mesh, veRL FSDP1's default) pickled in a form fastckpt does not recognise; save with "
        "FullyShardedDataParallel(..., device_mesh=init_device_mesh('cuda', (world_size,))) or "
        "FSDP2 (DTensor state dicts), or write the checkpoint with torch.distributed.checkpoint"
    )


def _model_dict(obj: Any, source: str) -> tuple[dict[Any, Any], str]:
    """The model state dict inside a loaded checkpoint, and the key it was found under."""

    def tensors_in(d: dict[Any, Any]) -> int:
        return sum(isinstance(v, TensorRef | DTensorRef | ShardedTensorRef) for v in d.values())

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


def record_tensor(
    out: _RankFile, archive: TorchZip, rank: int, key: str, value: TensorRef | DTensorRef
) -> None:
    """Keep ``value`` as entry ``key`` of ``out``: where its storage lies in the archive and, for
    a DTensor, this rank's coordinate in its device mesh."""
    local = value.local if isinstance(value, DTensorRef) else value
    entry = archive.storage(local.storage)
    out.storages[local.storage.key] = (entry.data_offset, entry.size)
    if isinstance(value, DTensorRef):
        mesh = value.spec.__dict__.get("mesh")
        if id(mesh) not in out.coords:
            out.coords[id(mesh)] = _coordinate(archive, mesh, rank, key)
    out.entries[key] = value


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
                record_tensor(out, archive, rank, key, value)
            elif isinstance(value, ShardedTensorRef):
                for local, _box in value.local:
                    entry = archive.storage(local.storage)
                    out.storages[local.storage.key] = (entry.data_offset, entry.size)
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
