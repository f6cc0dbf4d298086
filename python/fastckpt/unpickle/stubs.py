"""DTensor pickles and whole-file torch.save state dicts (veRL, RLinf, prime-rl, HF .bin).

A separate allow-list: the DCP tables of :mod:`fastckpt.unpickle.records` stay strict. Classes
of the DTensor machinery are recognised by name under the torch packages that have held them
across versions; the FSDP1 ``ShardedTensor`` classes are allow-listed to the records of
:mod:`fastckpt.unpickle.sharded`; any other class becomes an inert :class:`Stub` (never
imported, never called), and the readers fail only when a value they need turns out to be a stub.
Globals of modules that can run code (``os``, ``subprocess``, ``builtins``, ...) are refused
outright.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, ClassVar

from fastckpt._core import FormatError
from fastckpt.safeio import short
from fastckpt.unpickle.records import TENSOR_GLOBALS, TensorRef, _identity, _Record, _size
from fastckpt.unpickle.restricted import _SIZED_BUILTINS, RestrictedUnpickler, _Sized
from fastckpt.unpickle.sharded import (
    SHARDED_GLOBALS,
    ShardedTensorType,
    nested_class,
    sharded_tensor_ref,
)

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
    """DTensor: ``(_rebuild_wrapper_subclass, DTensor, args, state)``; ShardedTensor likewise
    (:func:`fastckpt.unpickle.sharded.sharded_tensor_ref`); other subclasses pass."""
    if func is _rebuild_wrapper_subclass and new_type is ShardedTensorType:
        return sharded_tensor_ref(args, state)
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
    nested = nested_class(obj, name)
    if nested is not None:
        return nested
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
    table.update(SHARDED_GLOBALS)
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
