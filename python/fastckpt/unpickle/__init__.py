"""Restricted unpickling of torch metadata, and torch.save zip archives, without torch.

This package is fastckpt's one attack surface: every byte of a pickle in a checkpoint passes
through it. Three kinds of pickle reach fastckpt:

* DCP ``.metadata`` files: plain ``pickle.dump(Metadata)`` of a handful of dataclasses.
* ``data.pkl`` inside a ``torch.save`` zip (every DCP item is one): a call to
  ``torch._utils._rebuild_tensor_v2`` on a persistent storage reference.
* ``data.pkl`` of a whole-file ``torch.save`` state dict (veRL, RLinf, prime-rl, HF ``.bin``,
  DeepSpeed, Megatron): tensors, DTensors, and whatever classes the trainer pickled alongside.

All are read by :class:`RestrictedUnpickler`, which maps an allow-list of ``(module, name)``
globals to local stand-ins and refuses everything else with :class:`FormatError`. Nothing named in
a pickle is ever imported or called, so a malicious file cannot execute code. What is allowed, and
why:

* :data:`METADATA_GLOBALS` (:mod:`.records`): the DCP metadata classes, as plain records that
  only accept ``BUILD`` state; ``pathlib`` paths as strings; ``torch.Size`` and dtypes as checked
  values. Strict: anything else is refused.
* :data:`TENSOR_GLOBALS` (:mod:`.records`): the ``torch._utils`` rebuild functions, which check
  their arguments and return a :class:`TensorRef` (where the elements live, never the elements),
  and the storage classes named by persistent ids, which become :class:`StorageRef` objects.
* :data:`STATE_DICT_GLOBALS` (:mod:`.stubs`): the tensor table plus DTensor rebuilding and a few
  constructors (``set``, ``slice``, ``range``, ...), and the FSDP1 ``ShardedTensor`` classes
  (:data:`SHARDED_GLOBALS`, :mod:`.sharded`: records of each shard's offsets and sizes, rebuilt
  into a :class:`ShardedTensorRef`). :class:`StubbingUnpickler` recognises the
  DTensor machinery by name and turns any other class into an inert :class:`Stub`, since real
  state dicts carry trainer classes fastckpt cannot know; globals of modules that can run code
  (``os``, ``subprocess``, ``builtins``, ...) or open files are refused outright.

Loading is bounded (:mod:`.restricted`): :func:`scan_pickle` (Rust, one pass over the opcodes)
refuses, before anything is built, input that would exhaust memory or the C stack (huge memo
indices, lengths past the data, deep nesting, ``BUILD`` onto a global), and the size-taking
builtins draw on a per-pickle element budget.

Zip archives are read with the standard :mod:`zipfile` over a window of the source file
(:mod:`.torchzip`), so an archive embedded at any offset of a ``.distcp`` file is handled, zip64
included; storages are located, never read here.
"""

from __future__ import annotations

from fastckpt.unpickle.records import (
    MAX_DIMS,
    METADATA_GLOBALS,
    STORAGE_DTYPES,
    TENSOR_GLOBALS,
    TORCH_TO_ST,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    DType,
    Metadata,
    MetadataIndex,
    StorageInfo,
    StorageMeta,
    StorageRef,
    TensorProperties,
    TensorRef,
    TensorStorageMetadata,
    torch_itemsize,
)
from fastckpt.unpickle.restricted import (
    MAX_DEPTH,
    RestrictedUnpickler,
    restricted_loads,
    scan_pickle,
)
from fastckpt.unpickle.sharded import SHARDED_GLOBALS, ShardBox, ShardedTensorRef
from fastckpt.unpickle.stubs import (
    DTENSOR_MODULES,
    STATE_DICT_GLOBALS,
    DeviceMesh,
    DTensorMeta,
    DTensorRef,
    DTensorSpec,
    DTensorType,
    FlatLayout,
    MeshLayout,
    PickledDict,
    Placement,
    Stub,
    StubbingUnpickler,
    load_state_dict_pickle,
)
from fastckpt.unpickle.torchzip import FileWindow, TorchZip, ZipEntry, open_fd

__all__ = [
    "DTENSOR_MODULES",
    "MAX_DEPTH",
    "MAX_DIMS",
    "METADATA_GLOBALS",
    "SHARDED_GLOBALS",
    "STATE_DICT_GLOBALS",
    "STORAGE_DTYPES",
    "TENSOR_GLOBALS",
    "TORCH_TO_ST",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "DTensorMeta",
    "DTensorRef",
    "DTensorSpec",
    "DTensorType",
    "DType",
    "DeviceMesh",
    "FileWindow",
    "FlatLayout",
    "MeshLayout",
    "Metadata",
    "MetadataIndex",
    "PickledDict",
    "Placement",
    "RestrictedUnpickler",
    "ShardBox",
    "ShardedTensorRef",
    "StorageInfo",
    "StorageMeta",
    "StorageRef",
    "Stub",
    "StubbingUnpickler",
    "TensorProperties",
    "TensorRef",
    "TensorStorageMetadata",
    "TorchZip",
    "ZipEntry",
    "load_state_dict_pickle",
    "open_fd",
    "restricted_loads",
    "scan_pickle",
    "torch_itemsize",
]
