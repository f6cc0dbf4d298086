"""Reading the files a checkpoint names, without leaving it, blocking, or reading special files.

Nothing in a checkpoint is trusted (``docs/SECURITY.md``), so every file fastckpt reads passes here:

* :func:`item_path`: a data file named by metadata (DCP ``relative_path``, Megatron's
  ``common_state`` item) must be a plain name inside the checkpoint folder.
* :func:`contained`: a side file (config, tokenizer, templates, code) is copied only when its real
  path stays inside the folder it was found in, or when it is a Hugging Face cache snapshot's link
  into that repository's own ``blobs/``.
* :func:`open_regular`: every open is ``O_NONBLOCK`` (a FIFO never hangs) and is checked with
  ``fstat`` to be a regular file outside ``/proc``, ``/sys`` and ``/dev``.
* :func:`short`: pickled values quoted in error messages are bounded in size.
"""

from __future__ import annotations

import errno
import os
import reprlib
import stat
from pathlib import Path

from fastckpt._core import FormatError

_SPECIAL_ROOTS = ("/proc", "/sys", "/dev")
_HF_REPO_PREFIXES = ("models--", "datasets--", "spaces--")

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def short(value: object) -> str:
    """A bounded ``repr`` of an untrusted value, for error messages."""
    if isinstance(value, str | bytes | int | float | bool | tuple | list | dict | set) or (
        value is None
    ):
        try:
            return _REPR.repr(value)
        except Exception:  # an element's repr failed: fall through to the type name
            pass
    return f"<{type(value).__name__}>"


def listing(directory: Path) -> list[str]:
    """The sorted names in ``directory``; empty when it cannot be listed (sniffing never fails)."""
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def plain_name(name: object, *, where: str) -> str:
    """``name`` when it is a plain file name (no separator, not ``.``/``..``, not absolute).

    Args:
        name: the file name as the metadata gives it.
        where: the metadata file and entry, for the error message.
    """
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
    ):
        raise FormatError(
            f"{where}: refusing data file name {short(name)} (metadata may only name a plain "
            "file inside the checkpoint folder)"
        )
    return name


def item_path(directory: Path, name: object, *, where: str) -> Path:
    """``directory / name`` for a data file named by metadata (see :func:`plain_name`)."""
    return directory / plain_name(name, where=where)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _special(real: str) -> bool:
    # /dev/shm is a tmpfs where checkpoints are legitimately staged
    return any(_under(real, r) for r in _SPECIAL_ROOTS) and not _under(real, "/dev/shm")


def _snapshot_blobs(path: Path) -> str | None:
    """The real ``blobs/`` folder when ``path`` lies in ``<cache>/models--X/snapshots/REV/``."""
    parts = Path(os.path.abspath(path)).parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(_HF_REPO_PREFIXES):
            repo = os.path.realpath(Path(*parts[:i]))
            blobs = os.path.join(repo, "blobs")
            # the blobs folder itself must not be a link elsewhere
            if os.path.isdir(blobs) and os.path.realpath(blobs) == blobs:
                return blobs
            return None
    return None


def contained(path: Path, root: Path) -> Path | None:
    """The real path of ``path`` when it stays inside ``root`` (links included), or when it is
    a Hugging Face cache snapshot's link into its own repository's ``blobs/``; else None."""
    real = os.path.realpath(path)
    if _special(real):
        return None
    if _under(real, os.path.realpath(root)):
        return Path(real)
    blobs = _snapshot_blobs(path)
    if blobs is not None and _under(real, blobs) and real != blobs:
        return Path(real)
    return None


def open_regular(path: str | os.PathLike[str], *, nofollow: bool = False) -> int:
    """Open ``path`` read-only without blocking and check that it is a regular file.

    Args:
        path: the file.
        nofollow: refuse a symbolic link as the last component (``O_NOFOLLOW``); used on paths
            already resolved by :func:`contained`.

    Returns:
        An open file descriptor (close it with ``os.close``).

    Raises:
        FormatError: a FIFO, socket, device, directory, link (with ``nofollow``) or a file under
            ``/proc``, ``/sys`` or ``/dev``. ``FileNotFoundError`` and other ``OSError`` pass.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FormatError(
                f"{os.fspath(path)}: a symbolic link; refusing to follow it"
            ) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FormatError(f"{os.fspath(path)}: not a regular file; refusing to read it")
        if _special(os.path.realpath(path)):
            raise FormatError(f"{os.fspath(path)}: a special file; refusing to read it")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike[str], *, limit: int, nofollow: bool = False) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes (see :func:`open_regular`)."""
    fd = open_regular(path, nofollow=nofollow)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise FormatError(f"{os.fspath(path)}: implausibly large ({size} bytes)")
        chunks, total = [], 0
        while data := os.read(fd, 1 << 20):
            chunks.append(data)
            total += len(data)
            if total > limit:
                raise FormatError(f"{os.fspath(path)}: implausibly large (over {limit} bytes)")
        return b"".join(chunks)
    finally:
        os.close(fd)
