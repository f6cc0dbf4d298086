"""Format detection: which reader understands a path."""

from __future__ import annotations

import os
from pathlib import Path

from fastckpt._core import FormatError
from fastckpt.catalog import Catalogue
from fastckpt.distcp import is_dcp_dir, read_dcp
from fastckpt.hf_folder import is_hf_dir, read_hf


def detect(path: Path) -> str:
    """Name the format of ``path``: ``"dcp"`` or ``"safetensors"``; FormatError otherwise."""
    if not path.exists():
        raise FileNotFoundError(2, "no such file or directory", str(path))
    if path.is_file():
        if path.suffix == ".safetensors":
            return "safetensors"
        if path.name == ".metadata":
            return "dcp"
        raise FormatError(f"{path}: not a checkpoint fastckpt can read (unknown file type)")
    if is_dcp_dir(path):
        return "dcp"
    if is_hf_dir(path):
        return "safetensors"
    raise FormatError(
        f"{path}: not a checkpoint fastckpt can read (no .metadata, .distcp or .safetensors "
        "files in it)"
    )


def open_catalogue(path: str | os.PathLike[str]) -> Catalogue:
    """Detect the format of ``path`` and catalogue its tensors."""
    p = Path(path)
    fmt = detect(p)
    if fmt == "dcp":
        return read_dcp(p.parent if p.is_file() else p)
    return read_hf(p)
