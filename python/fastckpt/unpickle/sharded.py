"""FSDP1 ``ShardedTensor`` pickles (``SHARDED_STATE_DICT`` without a device mesh), inert.

torch pickles a ``ShardedTensor`` as ``_rebuild_from_type_v2(_rebuild_wrapper_subclass,
ShardedTensor, (cls, dtype, size, stride, ...), state)`` with ``state`` its ``__getstate__``:
``(local_shards, ShardedTensorMetadata, ProcessGroupState, sharding_spec, init_rrefs)``. Each
local ``Shard`` holds a tensor and a ``ShardMetadata`` (``shard_offsets``, ``shard_sizes``,
``placement``); the ``ShardedTensorMetadata`` lists every rank's ``ShardMetadata``, the global
``size`` and ``tensor_properties``. The classes named here are mapped to the record stand-ins
below (only ``BUILD`` state, nothing run); :func:`sharded_tensor_ref` turns the rebuilt pieces into
a :class:`ShardedTensorRef` whose fields are checked plain values. Where the boxes must lie, cover
and agree across ranks is checked by :mod:`fastckpt.formats.torch_assemble`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastckpt._core import FormatError
from fastckpt.safeio import short
from fastckpt.unpickle.records import TensorProperties, TensorRef, _mem_format, _Record, _size


class ShardedTensorType(_Record):
    """The ``ShardedTensor`` class itself, named as ``new_type`` of ``_rebuild_from_type_v2``."""


class ShardRecord(_Record):
    """``Shard``: ``tensor`` and ``metadata`` (slots state)."""


class ShardMetadataRecord(_Record):
    """``ShardMetadata``: ``shard_offsets``, ``shard_sizes``, ``placement`` (slots state)."""


class ShardedTensorMetadataRecord(_Record):
    """``ShardedTensorMetadata``: ``shards_metadata``, ``size``, ``tensor_properties``."""


class RemoteDevice(_Record):
    """``_remote_device``: ``_rank`` (or ``_worker_name``) and ``_device``."""


class _Inert(_Record):
    """``ProcessGroupState``, ``ChunkShardingSpec``, ...: kept, never read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args


_SHARD = "torch.distributed._shard"
#: ``(module, name)`` -> stand-in, for every class a ShardedTensor pickle names
SHARDED_GLOBALS: dict[tuple[str, str], Any] = {
    (f"{_SHARD}.sharded_tensor.api", "ShardedTensor"): ShardedTensorType,
    (f"{_SHARD}.sharded_tensor.shard", "Shard"): ShardRecord,
    (f"{_SHARD}.metadata", "ShardMetadata"): ShardMetadataRecord,
    (f"{_SHARD}.sharded_tensor.metadata", "ShardedTensorMetadata"): ShardedTensorMetadataRecord,
    (f"{_SHARD}.sharded_tensor.metadata", "TensorProperties"): TensorProperties,
    (f"{_SHARD}.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"): _mem_format,
    (f"{_SHARD}.sharding_spec.chunk_sharding_spec", "ChunkShardingSpec"): _Inert,
    (f"{_SHARD}.sharding_spec.api", "EnumerableShardingSpec"): _Inert,
    ("torch.distributed.remote_device", "_remote_device"): RemoteDevice,
}


def nested_class(owner: Any, name: Any) -> Any:
    """``getattr(ShardedTensor, "ProcessGroupState")`` as pickled: an inert record class, or
    None for anything else."""
    return _Inert if owner is ShardedTensorType and name == "ProcessGroupState" else None


@dataclass(frozen=True, slots=True)
class ShardBox:
    """One shard of a ShardedTensor: its box in the global tensor and the rank holding it."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    rank: int | None  # from the placement ("rank:R/cpu"); None when it names a worker


@dataclass(frozen=True, slots=True)
class ShardedTensorRef:
    """A ShardedTensor as pickled on one rank: its local shards and the global metadata."""

    dtype: str
    shape: tuple[int, ...]
    local: tuple[tuple[TensorRef, ShardBox], ...]  # this rank's shards
    shards: tuple[ShardBox, ...]  # every rank's shards, from the global metadata


def _field(record: Any, cls: type, name: str, what: str) -> Any:
    if not isinstance(record, cls):
        raise FormatError(f"ShardedTensor pickle: {what} is {short(record)}")
    try:
        return record.__dict__[name]
    except KeyError:
        raise FormatError(f"ShardedTensor pickle: {what} has no {name!r}") from None


def _box(meta: Any, what: str) -> ShardBox:
    offsets = _field(meta, ShardMetadataRecord, "shard_offsets", what)
    sizes = _field(meta, ShardMetadataRecord, "shard_sizes", what)
    offsets, sizes = _size(offsets), _size(sizes)
    if len(offsets) != len(sizes) or min(offsets + sizes, default=0) < 0:
        raise FormatError(f"ShardedTensor pickle: {what} has offsets {offsets}, sizes {sizes}")
    placement = meta.__dict__.get("placement")
    rank = placement.__dict__.get("_rank") if isinstance(placement, RemoteDevice) else None
    if not (isinstance(rank, int) and not isinstance(rank, bool)):
        rank = None
    return ShardBox(offsets, sizes, rank)


def sharded_tensor_ref(args: Any, state: Any) -> ShardedTensorRef:
    """Check the rebuilt pieces of one ShardedTensor and keep its shards' boxes."""
    if not (isinstance(state, tuple) and len(state) >= 2 and isinstance(state[0], list)):
        raise FormatError(f"ShardedTensor pickle with an unexpected state {short(state)}")
    local_shards, metadata = state[0], state[1]
    shape = _size(_field(metadata, ShardedTensorMetadataRecord, "size", "its metadata"))
    props = _field(metadata, ShardedTensorMetadataRecord, "tensor_properties", "its metadata")
    dtype = props.__dict__.get("dtype") if isinstance(props, TensorProperties) else None
    if dtype is None and isinstance(args, tuple) and len(args) > 1:
        dtype = args[1]
    if not isinstance(dtype, str):
        raise FormatError(f"ShardedTensor pickle without a dtype ({short(props)})")
    if isinstance(args, tuple) and len(args) > 2 and _size(args[2]) != shape:
        raise FormatError(
            f"ShardedTensor pickle: size {_size(args[2])} disagrees with its metadata's {shape}"
        )
    metas = _field(metadata, ShardedTensorMetadataRecord, "shards_metadata", "its metadata")
    if not isinstance(metas, list):
        raise FormatError(f"ShardedTensor pickle: shards_metadata is {short(metas)}")
    shards = tuple(_box(m, "a shard's metadata") for m in metas)
    local = []
    for shard in local_shards:
        tensor = _field(shard, ShardRecord, "tensor", "a local shard")
        if not isinstance(tensor, TensorRef):
            raise FormatError(f"ShardedTensor pickle: a local shard's tensor is {short(tensor)}")
        local.append((tensor, _box(_field(shard, ShardRecord, "metadata", "a local shard"),
                                   "a local shard's metadata")))  # fmt: skip
    return ShardedTensorRef(str(dtype), shape, tuple(local), shards)
