"""What a restricted pickle may name, and the local stand-ins it gets instead.

* dtype tables: torch dtype names, their safetensors names and item sizes, legacy typed storages;
* :class:`StorageRef` / :class:`TensorRef`: a tensor located in its archive, never read;
* stand-ins for the DCP metadata classes (``Metadata``, ``TensorStorageMetadata``, ...), plain
  records that accept ``BUILD`` state and run nothing;
* the tensor rebuild functions of ``torch._utils``, checked and returning a :class:`TensorRef`;
* the allow-lists :data:`METADATA_GLOBALS` (DCP ``.metadata``) and :data:`TENSOR_GLOBALS`
  (``data.pkl`` of a torch.save archive): ``(module, name)`` -> stand-in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fastckpt._core import FormatError
from fastckpt.safeio import short

# --------------------------------------------------------------------------------------------
# dtypes

#: torch dtype name -> safetensors dtype name (None: torch knows it, safetensors cannot store it)
TORCH_TO_ST: dict[str, str | None] = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "complex64": "C64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e8m0fnu": "F8_E8M0",
    "complex128": None,
    "complex32": None,
    "float8_e4m3fnuz": None,
    "float8_e5m2fnuz": None,
    "float4_e2m1fn_x2": None,
}

#: legacy typed storage class -> torch dtype name
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}

_ITEM_SIZES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "complex64": 8,
    "complex128": 16,
    "complex32": 4,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e8m0fnu": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float4_e2m1fn_x2": 1,
}


def torch_itemsize(dtype: str) -> int:
    """Item size in bytes of a torch dtype name (``"bfloat16"`` -> 2)."""
    try:
        return _ITEM_SIZES[dtype]
    except KeyError:
        raise FormatError(f"unsupported torch dtype {short(dtype)}") from None


class DType(str):
    """A torch dtype named in a pickle (``torch.bfloat16`` becomes ``DType("bfloat16")``)."""

    __slots__ = ()  # shared by every call: no attributes a pickle could set


@dataclass(frozen=True, slots=True)
class StorageRef:
    """A storage named by a persistent id: ``data/<key>`` in the archive."""

    key: str
    dtype: str  # torch dtype name, or "untyped" (then numel counts bytes)
    numel: int


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor rebuilt lazily: where its elements live, never the elements themselves."""

    storage: StorageRef
    dtype: str
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


# --------------------------------------------------------------------------------------------
# stand-ins for DCP metadata classes


class _Record:
    """Base of the stand-ins: accepts ``BUILD`` state as a dict or a ``(dict, slots)`` pair."""

    _defaults: ClassVar[dict[str, Any]] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict | None):
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        if not isinstance(state, dict):
            raise FormatError(f"unexpected pickled state for {type(self).__name__}")
        self.__dict__.update(state)

    def __getattr__(self, name: str) -> Any:
        defaults = type(self)._defaults
        if name in defaults:
            return defaults[name]
        raise AttributeError(name)

    def __repr__(self) -> str:  # bounded: values may be an exponential pickled DAG
        fields = ", ".join(f"{k}={short(v)}" for k, v in list(self.__dict__.items())[:8])
        return f"{type(self).__name__}({fields})"


class Metadata(_Record):
    state_dict_metadata: dict[str, Any]
    storage_data: dict[Any, Any]
    planner_data: dict[str, Any] | None
    _defaults: ClassVar[dict[str, Any]] = {
        "planner_data": None,
        "storage_meta": None,
        "version": None,
        "storage_data": None,
    }


class TensorStorageMetadata(_Record):
    properties: Any
    size: Any
    chunks: list[Any]


class BytesStorageMetadata(_Record):
    pass


class ChunkStorageMetadata(_Record):
    pass


class StorageMeta(_Record):
    _defaults: ClassVar[dict[str, Any]] = {
        "checkpoint_id": None,
        "save_id": None,
        "load_id": None,
        "modules": [],
    }


class StorageInfo(_Record):
    """``_StorageInfo``: where one item lives (file name, offset, length)."""

    _defaults: ClassVar[dict[str, Any]] = {"transform_descriptors": None}


class TensorProperties(_Record):
    """Pickled as a 5-tuple (torch <= 2.14) or a 6-tuple with local strides (2.15)."""

    _defaults: ClassVar[dict[str, Any]] = {"strides": None}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) in (5, 6) and not isinstance(state[1], dict):
            self.dtype = state[0]
            self.layout = state[1]
            self.requires_grad = state[2]
            self.memory_format = state[3]
            self.pin_memory = state[4]
            self.strides = state[5] if len(state) == 6 else None
            return
        super().__setstate__(state)


class MetadataIndex(_Record):
    """Key of ``storage_data``; hashed on ``(fqn, offset)`` as torch does (``index`` is a hint)."""

    _defaults: ClassVar[dict[str, Any]] = {"offset": None, "index": None}

    def __init__(self, fqn: str = "", offset: Any = None, index: Any = None) -> None:
        self.fqn = fqn
        self.offset = offset
        self.index = index

    def _key(self) -> tuple[str, tuple[int, ...] | None]:
        offset = self.offset
        return (self.fqn, None if offset is None else tuple(offset))

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MetadataIndex) and self._key() == other._key()


class _Inert(_Record):
    """Stand-in for classes that may appear but are never needed (Megatron save plans)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs


_MEM_FORMATS = {0: "contiguous", 1: "channels_last", 2: "preserve"}


def _mem_format(value: int) -> str:
    return _MEM_FORMATS.get(value, short(value)) if isinstance(value, int) else "unknown"


def _path(*parts: Any) -> str:
    if not all(isinstance(p, str) for p in parts):
        raise FormatError("pickled path with a part that is not a string")
    return "/".join(parts)


def _data(value: Any) -> Any:
    """A value passed through by a stand-in: data only, never a global (class, function)."""
    if callable(value) or isinstance(value, type):
        raise FormatError(f"refusing to pass a pickled global through ({type(value).__name__})")
    return value


def _identity(value: Any) -> Any:
    return _data(value)


#: most dimensions a tensor shape may have (torch allows 64)
MAX_DIMS = 64


def _size(value: Any = ()) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or len(value) > MAX_DIMS:
        raise FormatError(f"malformed pickled shape {short(value)}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise FormatError(f"malformed pickled shape {short(value)}")
    return tuple(value)


_DCP_CLASSES: dict[str, type] = {
    "Metadata": Metadata,
    "TensorStorageMetadata": TensorStorageMetadata,
    "BytesStorageMetadata": BytesStorageMetadata,
    "ChunkStorageMetadata": ChunkStorageMetadata,
    "MetadataIndex": MetadataIndex,
    "TensorProperties": TensorProperties,
    "StorageMeta": StorageMeta,
}

_PATH_NAMES = ("PosixPath", "Path", "PurePath", "PurePosixPath", "WindowsPath", "PureWindowsPath")


def _metadata_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {}
    for module in (
        "torch.distributed.checkpoint.metadata",
        "torch.distributed._shard.checkpoint.metadata",
        "torch.distributed._shard.sharded_tensor.metadata",
    ):
        for name, cls in _DCP_CLASSES.items():
            table[(module, name)] = cls
        table[(module, "_MEM_FORMAT_ENCODING")] = _mem_format
        table[(module, "MEM_FORMAT_ENCODING")] = _mem_format
    for module in (
        "torch.distributed.checkpoint.filesystem",
        "torch.distributed._shard.checkpoint.filesystem",
    ):
        table[(module, "_StorageInfo")] = StorageInfo
    for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"):
        table[("torch.distributed.checkpoint.planner", name)] = _Inert
    for module in ("pathlib", "pathlib._local"):
        for name in _PATH_NAMES:
            table[(module, name)] = _path
    table[("torch.serialization", "_get_layout")] = _identity
    table[("collections", "OrderedDict")] = dict
    return table


def _rebuild_tensor_v2(
    storage: StorageRef,
    storage_offset: int,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> TensorRef:
    if not isinstance(storage, StorageRef) or storage.dtype == "untyped":
        raise FormatError("tensor rebuilt from an untyped or unknown storage")
    return TensorRef(storage, storage.dtype, int(storage_offset), _size(size), _size(stride))


def _rebuild_tensor_v3(
    storage: StorageRef,
    storage_offset: int,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> TensorRef:
    if not isinstance(storage, StorageRef) or not isinstance(dtype, DType):
        raise FormatError("malformed _rebuild_tensor_v3 call")
    return TensorRef(storage, str(dtype), int(storage_offset), _size(size), _size(stride))


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    return _data(data)


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> Any:
    return _data(data)


class _StorageType:
    """A storage class named in a persistent id (``torch.FloatStorage``, ``UntypedStorage``).

    Shared by every call, so immutable: no ``__dict__``, and ``setattr`` refused.
    """

    __slots__ = ("dtype",)
    dtype: str

    def __init__(self, dtype: str) -> None:
        object.__setattr__(self, "dtype", dtype)

    def __setattr__(self, name: str, value: Any) -> None:
        raise FormatError("refusing to modify a pickle stand-in")

    def __delattr__(self, name: str) -> None:
        raise FormatError("refusing to modify a pickle stand-in")


def _tensor_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch", "UntypedStorage"): _StorageType("untyped"),
        ("torch.storage", "UntypedStorage"): _StorageType("untyped"),
        ("collections", "OrderedDict"): dict,
    }
    for name, dtype in STORAGE_DTYPES.items():
        table[("torch", name)] = _StorageType(dtype)
    return table


def _common_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {("torch", "Size"): _size}
    for name in _ITEM_SIZES:
        table[("torch", name)] = DType(name)
    return table


METADATA_GLOBALS = {**_common_globals(), **_metadata_globals()}
TENSOR_GLOBALS = {**_common_globals(), **_tensor_globals()}
