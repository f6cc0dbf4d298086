"""Restricted unpickling of torch metadata, and torch.save zip archives, without torch.

Two kinds of pickle reach fastckpt:

* DCP ``.metadata`` files: plain ``pickle.dump(Metadata)`` of a handful of dataclasses.
* ``data.pkl`` inside a ``torch.save`` zip (every DCP item is one): a call to
  ``torch._utils._rebuild_tensor_v2`` on a persistent storage reference.

Both are read by :class:`RestrictedUnpickler`, which maps an allow-list of ``(module, name)``
globals to local stand-ins and refuses everything else with :class:`FormatError`. Nothing named in
a pickle is ever imported or called, so a malicious file cannot execute code.

Zip archives are read with the standard :mod:`zipfile` over a window of the source file, so an
archive embedded at any offset of a ``.distcp`` file is handled, zip64 included.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, ClassVar

from fastckpt import _core
from fastckpt._core import FormatError
from fastckpt.safeio import open_regular, short

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


# --------------------------------------------------------------------------------------------
# bounds

#: deepest nesting of containers and objects a pickle may build (real ones stay below 20)
MAX_DEPTH = 100


def scan_pickle(data: bytes, *, source: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuse a pickle whose loading could exhaust memory or the C stack, before it is loaded.

    The C unpickler trusts its input: ``LONG_BINPUT`` with a huge index resizes the memo to that
    index, a length-prefixed string is allocated before it is read, and hashing a tuple nested a
    million deep recurses in C until the process dies. ``_core.scan_pickle`` (Rust, one pass
    over the opcodes) refuses such input, and ``BUILD`` onto a global, before anything is built.
    """
    try:
        _core.scan_pickle(data, max_depth)
    except FormatError as exc:
        raise FormatError(f"{source}: cannot read pickle: {exc}") from None


class _Sized:
    """A size-taking builtin (``set``, ``bytearray``, ``range``, ...) bound to one unpickler's
    element budget: a 9-byte pickle cannot ask for ``bytearray(10**9)``. Immutable."""

    __slots__ = ("_fn", "_owner")
    _fn: Any
    _owner: RestrictedUnpickler

    def __init__(self, fn: Any, owner: RestrictedUnpickler) -> None:
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_owner", owner)

    def __setattr__(self, name: str, value: Any) -> None:
        raise FormatError("refusing to modify a pickle stand-in")

    def __call__(self, *args: Any) -> Any:
        for a in args:
            if isinstance(a, int) and not isinstance(a, bool):
                self._owner.spend(max(0, a) if self._fn is bytearray else 0)
            elif hasattr(a, "__len__"):
                self._owner.spend(len(a))
        value = self._fn(*args)
        if isinstance(value, range):
            self._owner.spend(len(value))
        return value


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves globals only through an allow-list of local stand-ins.

    Args:
        file: the pickle stream.
        allowed: ``(module, name)`` -> stand-in object.
        source: the file name used in error messages.
        storages: when given, persistent ids ``('storage', type, key, location, numel)`` become
            :class:`StorageRef` objects; otherwise any persistent id is refused.
    """

    def __init__(
        self,
        file: io.BufferedIOBase | io.BytesIO,
        *,
        allowed: dict[tuple[str, str], Any],
        source: str,
        storages: bool = False,
    ) -> None:
        super().__init__(file)
        self._data = file.getvalue() if isinstance(file, io.BytesIO) else None
        self._allowed = allowed
        self._source = source
        self._storages = storages
        # elements that the size-taking builtins (set, bytearray, range, ...) may still create
        self._budget = 4096 + 8 * len(self._data or b"")

    def load(self) -> Any:
        """Scan the opcodes (:func:`scan_pickle`), then unpickle."""
        if self._data is None:
            raise FormatError(f"{self._source}: the restricted unpickler needs in-memory data")
        scan_pickle(self._data, source=self._source)
        try:
            return super().load()
        except FormatError as exc:  # raised by a stand-in: name the file
            if str(exc).startswith(self._source):
                raise
            raise FormatError(f"{self._source}: {exc}") from None
        except Exception as exc:  # corrupt pickle, or a stand-in refusing its arguments
            raise FormatError(
                f"{self._source}: cannot read pickle ({type(exc).__name__}: {short(str(exc))})"
            ) from None

    def spend(self, n: int) -> None:
        """Account for ``n`` elements created by a call; refuse a memory bomb."""
        self._budget -= n
        if self._budget < 0:
            raise FormatError(
                f"{self._source}: refusing pickle: its calls would create more elements than "
                "its size allows (a memory bomb?)"
            )

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = self._allowed[(module, name)]
        except KeyError:
            raise FormatError(
                f"{self._source}: refusing to load pickled global {module}.{name} "
                "(not on fastckpt's allow-list; nothing was executed)"
            ) from None
        return _Sized(found, self) if id(found) in _SIZED_BUILTINS else found

    def persistent_load(self, pid: Any) -> Any:
        if not self._storages:
            raise FormatError(f"{self._source}: unexpected persistent id in pickle")
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise FormatError(f"{self._source}: unsupported persistent id {short(pid)}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise FormatError(f"{self._source}: unsupported storage type {short(storage_type)}")
        if not isinstance(key, str | int) or not isinstance(numel, int) or numel < 0:
            raise FormatError(f"{self._source}: malformed storage reference {short(pid)}")
        return StorageRef(str(key), storage_type.dtype, numel)


def restricted_loads(
    data: bytes, *, allowed: dict[tuple[str, str], Any], source: str, storages: bool = False
) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; any failure becomes a FormatError."""
    try:
        return RestrictedUnpickler(
            io.BytesIO(data), allowed=allowed, source=source, storages=storages
        ).load()
    except FormatError:
        raise
    except Exception as exc:  # corrupt or truncated pickle: name the file
        raise FormatError(f"{source}: cannot read pickle ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------------------------
# torch.save zip archives


class FileWindow(io.RawIOBase):
    """A read-only, seekable view of ``[offset, offset+length)`` of an open file descriptor."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self._fd = fd
        self._base = offset
        self._len = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == io.SEEK_SET:
            self._pos = pos
        elif whence == io.SEEK_CUR:
            self._pos += pos
        elif whence == io.SEEK_END:
            self._pos = self._len + pos
        else:
            raise ValueError(f"bad whence {whence}")
        if self._pos < 0:
            raise OSError("negative seek position")
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._len - self._pos))
        if n == 0:
            return 0
        data = os.pread(self._fd, n, self._base + self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


@dataclass(frozen=True)
class ZipEntry:
    """One STORED entry of a zip archive: absolute byte range of its data."""

    name: str
    data_offset: int
    size: int


class TorchZip:
    """A ``torch.save`` archive located at ``[offset, offset+length)`` of ``path``.

    Only the central directory, the local headers and ``data.pkl`` are read; storages are
    located (file offsets), never read.
    """

    def __init__(self, path: str, fd: int, offset: int, length: int) -> None:
        self.path = path
        self._fd = fd
        self._offset = offset
        if not (isinstance(offset, int) and isinstance(length, int)) or offset < 0 or length < 0:
            raise FormatError(f"{path}: invalid item location (offset {offset}, length {length})")
        window = FileWindow(fd, offset, length)
        head = os.pread(fd, 4, offset)
        if head != b"PK\x03\x04":
            raise FormatError(
                f"{path}: no zip archive at byte {offset} (expected a torch.save item; "
                "corrupt file, or a variant such as SerializationFormat.SAFETENSORS)"
            )
        try:
            with zipfile.ZipFile(io.BufferedReader(window)) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
            raise FormatError(f"{path}: corrupt zip item at byte {offset}: {exc}") from None
        except (NotImplementedError, OverflowError, UnicodeError, TypeError) as exc:
            raise FormatError(
                f"{path}: unsupported zip item at byte {offset} ({type(exc).__name__}: {exc})"
            ) from None
        self.entries: dict[str, ZipEntry] = {}
        self.prefix = ""
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                raise FormatError(f"{path}: zip entry {info.filename} is compressed")
            start = self._data_start(info)
            if start + info.file_size > length:
                raise FormatError(
                    f"{path}: zip entry {info.filename} at byte {offset} runs past the item "
                    "(truncated file?)"
                )
            self.entries[info.filename] = ZipEntry(
                info.filename, offset + start, int(info.file_size)
            )
            if info.filename.endswith("data.pkl"):
                self.prefix = info.filename[: -len("data.pkl")]
        if self.prefix + "data.pkl" not in self.entries:
            raise FormatError(f"{path}: zip item at byte {offset} has no data.pkl")
        order = self.entries.get(self.prefix + "byteorder")
        if order is not None and self.read(order).strip() not in (b"little", b""):
            raise FormatError(f"{path}: big-endian torch archives are not supported")

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        if info.header_offset < 0:
            raise FormatError(f"{self.path}: bad local zip header offset for {info.filename}")
        header = os.pread(self._fd, 30, self._offset + info.header_offset)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise FormatError(f"{self.path}: bad local zip header for {info.filename}")
        name_len, extra_len = struct.unpack_from("<HH", header, 26)
        return int(info.header_offset) + 30 + int(name_len) + int(extra_len)

    def read(self, entry: ZipEntry) -> bytes:
        """Read a (small) entry completely."""
        data = os.pread(self._fd, entry.size, entry.data_offset)
        if len(data) != entry.size:
            raise FormatError(f"{self.path}: entry {entry.name} is truncated")
        return data

    def load_pickle(self, allowed: dict[tuple[str, str], Any] | None = None) -> Any:
        """Restricted-unpickle ``data.pkl`` (default allow-list: tensors only)."""
        entry = self.entries[self.prefix + "data.pkl"]
        return restricted_loads(
            self.read(entry),
            allowed=TENSOR_GLOBALS if allowed is None else allowed,
            source=f"{self.path} (data.pkl at byte {entry.data_offset})",
            storages=True,
        )

    def storage(self, ref: StorageRef) -> ZipEntry:
        """The entry holding storage ``ref``."""
        try:
            return self.entries[f"{self.prefix}data/{ref.key}"]
        except KeyError:
            raise FormatError(f"{self.path}: storage data/{ref.key} is missing") from None


def open_fd(path: str) -> int:
    """Open a regular file read-only, never blocking (close it with ``os.close``)."""
    return open_regular(path)


# --------------------------------------------------------------------------------------------
# DTensor pickles and whole-file torch.save state dicts (veRL, RLinf, prime-rl, HF .bin)
#
# A separate allow-list: the DCP tables above stay strict. Classes of the DTensor machinery are
# recognised by name under the torch packages that have held them across versions; any other
# class becomes an inert :class:`Stub` (never imported, never called), and the readers fail only
# when a value they need turns out to be a stub. Globals of modules that can run code (``os``,
# ``subprocess``, ``builtins``, ...) are refused outright.

#: module prefixes under which DTensor, its spec, placements and DeviceMesh have lived
DTENSOR_MODULES = (
    "torch.distributed.tensor",
    "torch.distributed._tensor",
    "torch.distributed.device_mesh",
    "torch.distributed._mesh_layout",
)

#: modules whose globals are refused even as stubs (a pickle naming them is an attack or junk)
_DENIED_MODULES = frozenset(
    {
        "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "shutil",
        "importlib", "runpy", "pickle", "_pickle", "marshal", "ctypes", "pty", "socket",
        "code", "codeop", "webbrowser", "platform", "multiprocessing", "signal", "eval", "exec",
        "torch._dynamo", "torch.ops", "torch.hub", "torch.jit", "torch.serialization",
        "pathlib", "tempfile", "shelve", "glob", "fileinput",
    }
)  # fmt: skip
#: single globals refused even as stubs (they open files)
_DENIED_GLOBALS = frozenset(
    {("io", "open"), ("_io", "open"), ("io", "FileIO"), ("_io", "FileIO"), ("codecs", "open")}
)

#: builtins that real state dicts use and that are safe to call
#: the builtins whose arguments size what they allocate (wrapped by :class:`_Sized`)
_SIZED_BUILTINS = frozenset(map(id, (set, frozenset, bytearray, range)))
_SAFE_BUILTINS: dict[str, Any] = {
    "set": set,
    "frozenset": frozenset,
    "slice": slice,
    "complex": complex,
    "bytearray": bytearray,
    "range": range,
}


class Stub(_Record):
    """An instance of a class fastckpt does not know: its arguments and state, inert.

    Subclasses are made on the fly per ``(module, name)``. ``REDUCE``/``NEWOBJ`` arguments are
    kept in ``_args``, ``BUILD`` state in ``_state`` (or merged into attributes when it is a
    dict), and list/dict items in ``_items``.
    """

    stub_module: ClassVar[str] = ""
    stub_name: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        self = object.__new__(cls)
        self.__dict__["_args"] = args
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        try:
            super().__setstate__(state)
        except FormatError:
            self.__dict__["_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("_items", []).append((key, value))

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("_items", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("_items", []).extend(values)

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    @classmethod
    def qualname(cls) -> str:
        return f"{cls.stub_module}.{cls.stub_name}"

    def __repr__(self) -> str:
        return f"<stub {self.qualname()}>"


class _DRecord(Stub):
    """Base of the DTensor stand-ins: a stub whose fields fastckpt reads."""


class DTensorSpec(_DRecord):
    pass


class DeviceMesh(_DRecord):
    pass


class MeshLayout(_DRecord):
    """``_MeshLayout``: ``axes`` holds one ``_FlatLayout(shape, stride)`` per mesh dim."""


class FlatLayout(_DRecord):
    pass


class Placement(_DRecord):
    """``Shard``, ``Replicate``, ``Partial``, ``_StridedShard``, ...: see ``stub_name``."""

    @property
    def kind(self) -> str:
        return type(self).stub_name


class DTensorMeta(_DRecord):
    """``TensorMeta(shape, stride, dtype)``, a NamedTuple pickled by its arguments."""


class DTensorType(_DRecord):
    """The ``DTensor`` class itself, named as ``new_type`` of ``_rebuild_from_type_v2``."""


@dataclass(frozen=True, slots=True)
class DTensorRef:
    """A DTensor as pickled on one rank: its local tensor, global shape and spec."""

    local: TensorRef
    dtype: str
    shape: tuple[int, ...]
    spec: Any


_PLACEMENTS = ("Shard", "Replicate", "Partial", "_Partial", "_StridedShard", "_MaskPartial",
               "_NormPartial", "MaskPartial", "StridedShard")  # fmt: skip
_DTENSOR_CLASSES: dict[str, type[_DRecord]] = {
    "DTensorSpec": DTensorSpec,
    "DeviceMesh": DeviceMesh,
    "_MeshLayout": MeshLayout,
    "_FlatLayout": FlatLayout,
    "TensorMeta": DTensorMeta,
}


def _make_stub(module: str, name: str, base: type[Stub] = Stub) -> type[Stub]:
    return type(name, (base,), {"stub_module": module, "stub_name": name})


def _rebuild_wrapper_subclass(*args: Any) -> Any:  # never called: a marker
    raise FormatError("unexpected direct call of _rebuild_wrapper_subclass")


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """DTensor: ``(_rebuild_wrapper_subclass, DTensor, args, state)``; other subclasses pass."""
    if func is _rebuild_wrapper_subclass:
        fields: dict[str, Any] = {}
        if isinstance(state, tuple) and len(state) == 2:
            for part in state:
                if isinstance(part, dict):
                    fields.update(part)
        elif isinstance(state, dict):
            fields.update(state)
        if not (isinstance(new_type, type) and issubclass(new_type, DTensorType)):
            name = new_type.qualname() if isinstance(new_type, type) and issubclass(
                new_type, Stub) else repr(new_type)  # fmt: skip
            return _make_stub("torch", f"wrapper subclass {name}")()
        local, spec = fields.get("_local_tensor"), fields.get("_spec")
        if not isinstance(local, TensorRef) or not isinstance(spec, DTensorSpec):
            raise FormatError("DTensor pickle without a local tensor or a spec")
        dtype = args[1] if isinstance(args, tuple) and len(args) > 2 else local.dtype
        shape = args[2] if isinstance(args, tuple) and len(args) > 2 else None
        if shape is None:
            meta = getattr(spec, "tensor_meta", None)
            shape = meta._args[0] if isinstance(meta, DTensorMeta) and meta._args else None
        if shape is None:
            raise FormatError("DTensor pickle without a global shape")
        return DTensorRef(local, str(dtype), _size(shape), spec)
    if callable(func) and not isinstance(func, type):
        value = func(*args)
        if isinstance(value, TensorRef | Stub):
            return value  # plain tensor subclass (e.g. a Parameter subclass): its data
    return _make_stub("torch", "tensor subclass")()


class PickledDict(dict[Any, Any]):
    """``collections.OrderedDict`` of a state dict: ``BUILD`` may set ``_metadata`` on it."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _stub_getattr(obj: Any, name: Any) -> Any:
    """``getattr`` as pickles use it for nested classes (``ShardedTensor.ProcessGroupState``):
    allowed on stub classes only, giving another stub class; never a real attribute lookup."""
    if isinstance(obj, type) and issubclass(obj, Stub):
        return _make_stub(obj.qualname(), str(name))
    raise FormatError(f"refusing pickled getattr({type(obj).__name__}, {short(name)})")


def _device(*args: Any) -> str:
    return (args[0] if isinstance(args[0], str) else short(args[0])) if args else "cpu"


def _state_dict_globals() -> dict[tuple[str, str], Any]:
    table = dict(TENSOR_GLOBALS)
    table[("torch._tensor", "_rebuild_from_type_v2")] = _rebuild_from_type_v2
    table[("torch._utils", "_rebuild_wrapper_subclass")] = _rebuild_wrapper_subclass
    table[("torch.serialization", "_get_layout")] = _identity
    table[("torch", "device")] = _device
    table[("torch", "Size")] = _size
    table[("collections", "OrderedDict")] = PickledDict
    for name, fn in _SAFE_BUILTINS.items():
        table[("builtins", name)] = fn
        table[("__builtin__", name)] = fn
    table[("builtins", "getattr")] = _stub_getattr
    table[("__builtin__", "getattr")] = _stub_getattr
    return table


STATE_DICT_GLOBALS = _state_dict_globals()


class StubbingUnpickler(RestrictedUnpickler):
    """The restricted unpickler of whole-file state dicts: unknown classes become :class:`Stub`.

    DTensor classes are recognised by name under :data:`DTENSOR_MODULES`; stub names are
    recorded in ``stubs``.
    """

    def __init__(self, file: io.BufferedIOBase | io.BytesIO, *, source: str) -> None:
        super().__init__(file, allowed=STATE_DICT_GLOBALS, source=source, storages=True)
        self.stubs: set[str] = set()
        self._made: dict[tuple[str, str], type[Stub]] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is not None:
            return _Sized(found, self) if id(found) in _SIZED_BUILTINS else found
        root = module.split(".")[0]
        if (
            (module, name) in _DENIED_GLOBALS
            or module in _DENIED_MODULES
            or root in _DENIED_MODULES
            or any(module.startswith(m + ".") for m in _DENIED_MODULES)
        ):
            raise FormatError(
                f"{self._source}: refusing to load pickled global {module}.{name} "
                "(a module that can run code; nothing was executed)"
            )
        key = (module, name)
        cls = self._made.get(key)
        if cls is None:
            base: type[Stub] = Stub
            if any(module == m or module.startswith(m + ".") for m in DTENSOR_MODULES):
                if name == "DTensor":
                    base = DTensorType
                elif name in _PLACEMENTS:
                    base = Placement
                else:
                    base = _DTENSOR_CLASSES.get(name, _DRecord)
            cls = _make_stub(module, name, base)
            self._made[key] = cls
            if base is Stub:
                self.stubs.add(f"{module}.{name}")
        return cls


def load_state_dict_pickle(data: bytes, *, source: str) -> tuple[Any, set[str]]:
    """Unpickle a torch.save ``data.pkl`` with stubs; returns ``(object, stub names)``."""
    unpickler = StubbingUnpickler(io.BytesIO(data), source=source)
    try:
        return unpickler.load(), unpickler.stubs
    except FormatError:
        raise
    except Exception as exc:  # corrupt or truncated pickle: name the file
        raise FormatError(f"{source}: cannot read pickle ({type(exc).__name__}: {exc})") from None
