"""``torch.save`` zip archives, read without torch.

A :class:`TorchZip` is read with the standard :mod:`zipfile` over a :class:`FileWindow` of the
source file, so an archive embedded at any offset of a ``.distcp`` file is handled, zip64
included. Only the central directory, the local headers and ``data.pkl`` are read; storages are
located (file offsets), never read.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from dataclasses import dataclass
from typing import Any

from fastckpt._core import FormatError
from fastckpt.safeio import open_regular
from fastckpt.unpickle.records import TENSOR_GLOBALS, StorageRef
from fastckpt.unpickle.restricted import restricted_loads


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
