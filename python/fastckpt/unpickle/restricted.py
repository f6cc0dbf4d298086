"""The restricted unpickler: allow-listed globals only, bounded before and during loading.

:func:`scan_pickle` refuses, before anything is built, a pickle whose loading could exhaust memory
or the C stack (Rust, one pass over the opcodes); :class:`RestrictedUnpickler` then resolves
globals only through an allow-list (see :mod:`fastckpt.unpickle.records`), charges the
size-taking builtins to a per-pickle element budget, and turns persistent ids into
:class:`StorageRef` objects; :func:`restricted_loads` is the one-call form.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from fastckpt import _core
from fastckpt._core import FormatError
from fastckpt.safeio import short
from fastckpt.unpickle.records import StorageRef, _StorageType

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


#: the builtins whose arguments size what they allocate (wrapped by :class:`_Sized`)
_SIZED_BUILTINS = frozenset(map(id, (set, frozenset, bytearray, range)))


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
