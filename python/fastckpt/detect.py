"""Format detection: which reader understands a path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastckpt._core import FormatError
from fastckpt.catalog import Catalogue, reading
from fastckpt.distcp import accelerate_model_dir, is_dcp_dir, read_dcp
from fastckpt.hf_folder import is_hf_dir, read_hf
from fastckpt.megatron import is_dist_dir, is_legacy_dir, read_megatron
from fastckpt.torch_save import (
    is_rank_dir,
    is_torch_save_file,
    read_rank_dir,
    read_torch_save,
    single_torch_save_file,
)
from fastckpt.zero import MODEL_FILE, is_zero_dir, is_zero_name, read_zero_dir


def detect(path: Path) -> str:
    """Name the format of ``path``: ``"dcp"``, ``"safetensors"``, ``"torch_ranks"`` (per-rank
    ``torch.save`` files), ``"torch_save"`` (one whole-file state dict), ``"megatron"`` (legacy
    ``mp_rank_*`` folders), ``"megatron_dist"`` (torch_dist) or ``"deepspeed"`` (a ZeRO tag folder);
    FormatError otherwise."""
    if not path.exists():
        raise FileNotFoundError(2, "no such file or directory", str(path))
    if path.is_file():
        if path.suffix == ".safetensors":
            return "safetensors"
        if path.name == ".metadata":
            return "dcp"
        if is_zero_name(path.name) or (MODEL_FILE.match(path.name) and is_zero_dir(path.parent)):
            return "deepspeed"  # one file of a ZeRO tag folder: read the whole folder
        if is_torch_save_file(path):
            return "torch_save"
        raise FormatError(f"{path}: not a checkpoint fastckpt can read (unknown file type)")
    if is_dist_dir(path):
        return "megatron_dist"
    if is_legacy_dir(path):
        return "megatron"
    if is_dcp_dir(path) or accelerate_model_dir(path) is not None:
        return "dcp"
    if is_hf_dir(path):
        return "safetensors"
    if is_zero_dir(path):
        return "deepspeed"
    if is_rank_dir(path):
        return "torch_ranks"
    if single_torch_save_file(path) is not None:
        return "torch_save"
    raise FormatError(
        f"{path}: not a checkpoint fastckpt can read (no .metadata, .distcp, .safetensors, "
        "model_world_size_W_rank_R.pt files or single .pt/.bin file in it)"
    )


def open_catalogue(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    hf_config: dict[str, Any] | None = None,
) -> Catalogue:
    """Detect the format of ``path`` and catalogue its tensors.

    ``arch`` and ``hf_config`` (the config.json the output will carry) are used by formats that
    rename tensors (Megatron); the others ignore them.
    """
    p = Path(path)
    with reading(p):
        return _open(p, arch=arch, hf_config=hf_config)


def _open(p: Path, *, arch: str | None, hf_config: dict[str, Any] | None) -> Catalogue:
    fmt = detect(p)
    if fmt in ("megatron", "megatron_dist"):
        return read_megatron(p, arch=arch, hf_config=hf_config)
    if arch is not None:
        raise FormatError(f"{p}: --arch applies to Megatron checkpoints only (this is {fmt})")
    if fmt == "dcp":
        accelerate = accelerate_model_dir(p)
        if accelerate is not None:  # an accelerate save_state() folder
            cat = read_dcp(accelerate)
            cat.side_dirs += [p, p.parent]
            cat.notes.append(f"accelerate save_state() folder: model from {accelerate.name}/")
            return cat
        return read_dcp(p.parent if p.is_file() else p)
    if fmt == "deepspeed":
        return read_zero_dir(p.parent if p.is_file() else p)
    if fmt == "torch_ranks":
        return read_rank_dir(p)
    if fmt == "torch_save":
        return read_torch_save(p)
    return read_hf(p)
