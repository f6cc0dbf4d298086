"""Writing the Hugging Face folder: side files copied byte for byte, the index, durable writes.

Everything is copied byte for byte; the only edit ever made is the dtype entry of ``config.json``
when the weights are cast (a textual replacement, so the rest of the file is untouched).
Rules: ``shared/formats/hf-output.md`` §3-§6.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from fastckpt.safeio import read_regular
from fastckpt.side_files import MAX_SIDE_FILE_BYTES, TORCH_DTYPE_NAMES, SideFiles

_DTYPE_ENTRY = re.compile(rb'("(?:torch_)?dtype"\s*:\s*)"[A-Za-z0-9_.]*"')


def update_config_dtype(raw: bytes, dtype: str) -> bytes:
    """Replace every ``"dtype"``/``"torch_dtype"`` string value in config.json bytes."""
    name = TORCH_DTYPE_NAMES[dtype].encode()
    return _DTYPE_ENTRY.sub(lambda m: m.group(1) + b'"' + name + b'"', raw)


def copy_side_files(side: SideFiles, dst: Path, *, cast_to: str | None, fsync: bool) -> list[str]:
    """Copy side files into ``dst`` byte for byte (config dtype updated when casting)."""
    written = []
    for name, src in side.files.items():
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        data = read_regular(src, limit=MAX_SIDE_FILE_BYTES, nofollow=True)
        if name == "config.json" and cast_to is not None:
            data = update_config_dtype(data, cast_to)
        _write_bytes(target, data, fsync=fsync)
        written.append(name)
    return written


def index_bytes(weight_map: dict[str, str], total_size: int, total_parameters: int) -> bytes:
    """``model.safetensors.index.json`` exactly as transformers writes it."""
    index = {
        "metadata": {"total_parameters": total_parameters, "total_size": total_size},
        "weight_map": weight_map,
    }
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _write_bytes(path: Path, data: bytes, *, fsync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def write_file(path: Path, data: bytes, *, fsync: bool) -> None:
    _write_bytes(path, data, fsync=fsync)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames and new entries in it are durable."""
    try:
        _fsync_path(path)
    except OSError:  # some filesystems refuse fsync on directories
        pass
