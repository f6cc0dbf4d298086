"""Crash-safe filesystem steps of a conversion: owned temporary folders, atomic replace, reclaim.

A conversion into ``PARENT/X`` uses three names in ``PARENT``, sharing one random id ``H``:

- ``.X.fastckpt-lock-H``: the owner record, a small file holding the owner's pid and host, kept
  locked with ``flock(LOCK_EX)`` for the life of the conversion (the kernel drops the lock when
  the process dies, however it dies);
- ``.X.fastckpt-tmp-H``: the output being written;
- ``.X.fastckpt-old-H``: a replaced folder on its way out (only where the kernel or filesystem
  lacks ``renameat2(RENAME_EXCHANGE)``).

The finished folder goes into place with ``renameat2(RENAME_NOREPLACE)`` (a destination that
appeared meanwhile is never clobbered) or, with ``overwrite``, with ``RENAME_EXCHANGE``, so that a
kill at any instant leaves either the old or the new complete folder at ``X``. Without exchange
support the old folder is parked as ``.X.fastckpt-old-H`` first; a later run that finds it with
its owner gone and ``X`` missing puts it back.

:func:`reclaim_stale` (run at the start of every conversion) removes the temporary folders of
owners that are gone and says so; a temporary folder without an owner record (written by
fastckpt < 0.2) is reported, never removed.

``FASTCKPT_TEST_KILL_AT=<point>`` (tests only) makes the process SIGKILL itself at a named point:
``staged`` (output complete under its temporary name), ``exchanged`` (after the exchange, before
the old folder is removed), ``parked`` (fallback path: old folder parked, new one not yet in
place), ``retention-renamed`` (a pruned step renamed out, before its removal), ``retention-rmtree``
(a pruned step half removed). ``FASTCKPT_TEST_NO_RENAMEAT2=1`` (tests only) takes the fallback
path of a kernel without ``renameat2``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import signal
import socket
import sys
import uuid
from pathlib import Path

from fastckpt._core import FastckptError

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_TEMP = re.compile(r"^\.(.+)\.fastckpt-(tmp|old|lock)-([0-9a-f]{8,32})$")
# What marks a folder --overwrite may replace: a Hugging Face model folder or a fastckpt output.
_MODEL_FILES = ("config.json", "adapter_config.json", "model.safetensors.index.json")
_MODEL_SUFFIXES = (".safetensors", ".safetensors.index.json")


def kill_point(name: str) -> None:
    """Test hook: SIGKILL this process when ``FASTCKPT_TEST_KILL_AT`` names ``name``."""
    if os.environ.get("FASTCKPT_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """``renameat2(a, b, flags)``; ``False`` where the kernel or filesystem lacks it."""
    if not sys.platform.startswith("linux") or os.environ.get("FASTCKPT_TEST_NO_RENAMEAT2"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (``RENAME_EXCHANGE``); ``False`` where unsupported."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, never replacing an existing ``dst`` (``FileExistsError``).

    Without ``RENAME_NOREPLACE`` a plain rename, which still refuses a non-empty directory.
    """
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst) and not _is_empty_dir(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _is_empty_dir(path: Path) -> bool:
    try:
        if path.is_symlink() or not path.is_dir():
            return False
        with os.scandir(path) as it:
            return next(it, None) is None
    except OSError:
        return False


def describe_contents(path: Path, limit: int = 5) -> str:
    """``a, b, c, ... (N entries)``: what a folder holds, for error messages."""
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        return f"unreadable: {e.strerror}"
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{shown} ({len(names)} entries)" if names else "nothing"


def check_replaceable(dst: Path) -> None:
    """Refuse to replace ``dst`` unless it is a model folder, a fastckpt output, or empty.

    A symbolic link is refused too: replacing the link would leave its target behind, and
    replacing the target would write outside the named place.
    """
    if dst.is_symlink():
        raise FastckptError(
            f"destination {dst} is a symbolic link (to {os.readlink(dst)}); pass the real "
            "folder, or remove the link"
        )
    if not dst.is_dir():
        raise FastckptError(f"destination {dst} exists and is not a directory")
    try:
        names = os.listdir(dst)
    except OSError as e:
        raise FastckptError(f"destination {dst} cannot be listed ({e.strerror})") from None
    if not names:
        return
    if any(n in _MODEL_FILES or n.endswith(_MODEL_SUFFIXES) for n in names):
        return
    raise FastckptError(
        f"refusing to overwrite {dst}: it is not a Hugging Face model folder or a fastckpt "
        f"output (no config.json or *.safetensors; it holds {describe_contents(dst)})"
    )


class Owner:
    """The owner record of one conversion into ``dst`` and the names of its temporary folders.

    ``acquire`` creates and locks ``.X.fastckpt-lock-H``; ``release`` removes the temporary
    folders (whatever is left of them) and the lock file.
    """

    def __init__(self, dst: Path) -> None:
        self.dst = dst
        self.id = uuid.uuid4().hex[:16]
        stem = f".{dst.name}.fastckpt"
        self.lock = dst.parent / f"{stem}-lock-{self.id}"
        self.tmp = dst.parent / f"{stem}-tmp-{self.id}"
        self.old = dst.parent / f"{stem}-old-{self.id}"
        self._fd: int | None = None

    def acquire(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.lock, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"pid {os.getpid()} host {socket.gethostname()}\n".encode())
        except BaseException:
            os.close(fd)
            os.unlink(self.lock)
            raise
        self._fd = fd

    def release(self) -> None:
        for p in (self.tmp, self.old):
            if os.path.lexists(p):
                shutil.rmtree(p, ignore_errors=True)
        if self._fd is not None:
            try:
                os.unlink(self.lock)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Owner:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _owner_gone(lock: Path) -> int | None:
    """An fd holding the lock of a dead owner (caller closes it), or ``None`` if it is alive."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def reclaim_stale(parent: Path) -> list[str]:
    """Remove temporary folders in ``parent`` whose owner is gone; one message per action.

    A parked old folder (``.X.fastckpt-old-H``) whose ``X`` is missing is put back at ``X``
    instead: its owner died between the two renames of the fallback replace.
    """
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for n in names:
        m = _TEMP.match(n)
        if m:
            groups.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = n
    notes: list[str] = []
    for (target, _id), kinds in sorted(groups.items()):
        if "lock" not in kinds:
            left = [parent / kinds[k] for k in ("tmp", "old") if k in kinds]
            notes += [
                f"{p}: temporary folder of an earlier run with no owner record; left in place "
                "(remove it by hand if no conversion is running)"
                for p in left
            ]
            continue
        lock = parent / kinds["lock"]
        fd = _owner_gone(lock)
        if fd is None:
            continue  # its owner is still converting
        try:
            if "old" in kinds:
                old, final = parent / kinds["old"], parent / target
                if not os.path.lexists(final):
                    os.rename(old, final)
                    notes.append(f"{final}: put back the folder a killed --overwrite had parked")
                else:
                    shutil.rmtree(old, ignore_errors=True)
                    notes.append(f"removed {old}, left by a killed conversion")
            if "tmp" in kinds:
                shutil.rmtree(parent / kinds["tmp"], ignore_errors=True)
                notes.append(f"removed {parent / kinds['tmp']}, left by a killed conversion")
            try:
                os.unlink(lock)
            except FileNotFoundError:
                pass
        finally:
            os.close(fd)
    return notes


def move_into_place(owner: Owner, *, overwrite: bool) -> None:
    """Put ``owner.tmp`` at ``owner.dst``: never clobbering, or (``overwrite``) swapping."""
    tmp, dst = owner.tmp, owner.dst
    kill_point("staged")
    if not os.path.lexists(dst):
        try:
            rename_noreplace(tmp, dst)
            return
        except FileExistsError:
            if not overwrite:
                raise FastckptError(
                    f"destination {dst} appeared while converting (another conversion?); "
                    "nothing was replaced"
                ) from None
    if not overwrite:
        raise FastckptError(f"destination {dst} already exists (use --overwrite)")
    check_replaceable(dst)
    if exchange(tmp, dst):
        kill_point("exchanged")
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        return
    os.rename(dst, owner.old)
    kill_point("parked")
    try:
        rename_noreplace(tmp, dst)
    except BaseException:
        os.rename(owner.old, dst)
        raise
    shutil.rmtree(owner.old, ignore_errors=True)


# ---------------------------------------------------------------- retention

_DISCARDED = ".fastckpt-deleting"


def discard_tree(path: Path) -> None:
    """Delete the directory ``path`` crash-safely: rename it out of its run's namespace (to
    ``.NAME.fastckpt-deleting``, a name no scanner lists), fsync the parent, then remove it.

    A kill during the removal leaves only the hidden name, which :func:`clean_discarded` removes
    later; ``path`` itself is never seen half deleted.
    """
    trash = path.parent / f".{path.name}{_DISCARDED}"
    if os.path.lexists(trash):
        shutil.rmtree(trash)
    os.rename(path, trash)
    _fsync_dir(path.parent)
    kill_point("retention-renamed")
    if os.environ.get("FASTCKPT_TEST_KILL_AT") == "retention-rmtree":
        for dirpath, _dirs, files in os.walk(trash):
            for f in files[: max(1, len(files) // 2)]:
                os.unlink(os.path.join(dirpath, f))
        kill_point("retention-rmtree")
    shutil.rmtree(trash)


def discarded(root: Path) -> list[Path]:
    """Leftovers of :func:`discard_tree` calls that were killed, in ``root``."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return [root / n for n in sorted(names) if n.startswith(".") and n.endswith(_DISCARDED)]


def clean_discarded(root: Path) -> list[str]:
    """Remove the leftovers of killed :func:`discard_tree` calls in ``root``; one note each."""
    notes = []
    for p in discarded(root):
        shutil.rmtree(p, ignore_errors=True)
        notes.append(f"removed {p}, left by an interrupted removal")
    return notes


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)
