"""Which reader understands a path: the formats, tried in order.

The order matters where layouts nest: Megatron's torch_dist is a DCP folder with a
``metadata.json``, a ZeRO tag folder holds ``.pt`` files that are also torch.save zips.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastckpt._core import FormatError
from fastckpt.catalog import Catalogue, reading
from fastckpt.formats import (
    Format,
    dcp,
    deepspeed,
    hf,
    megatron,
    torch_file,
    torch_ranks,
    torchtitan,
)

#: every format fastckpt reads, most specific first
FORMATS: tuple[Format, ...] = (
    megatron.DIST_FORMAT,
    megatron.LEGACY_FORMAT,
    torchtitan.FORMAT,
    dcp.FORMAT,
    hf.FORMAT,
    deepspeed.FORMAT,
    torch_ranks.RANKS_FORMAT,
    torch_file.FILE_FORMAT,
)


def find_format(path: Path) -> Format:
    """The first format whose ``sniff`` takes ``path``; FormatError when none does."""
    if not path.exists():
        raise FileNotFoundError(2, "no such file or directory", str(path))
    for fmt in FORMATS:
        if fmt.sniff(path):
            return fmt
    if path.is_file():
        raise FormatError(f"{path}: not a checkpoint fastckpt can read (unknown file type)")
    looked = ", ".join(f.what for f in FORMATS if f.what)
    raise FormatError(f"{path}: not a checkpoint fastckpt can read (no {looked} in it)")


def detect(path: Path) -> str:
    """Name the format of ``path`` (see :data:`FORMATS`); FormatError when none reads it."""
    return find_format(path).name


def open_catalogue(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    hf_config: dict[str, Any] | None = None,
) -> Catalogue:
    """Detect the format of ``path`` and catalogue its tensors.

    ``arch`` and ``hf_config`` (the config.json the output will carry) are used by formats that
    rename tensors (Megatron, torchtitan); the others refuse an ``arch``.
    """
    p = Path(path)
    with reading(p):
        fmt = find_format(p)
        if arch is not None and not fmt.takes_arch:
            raise FormatError(
                f"{p}: --arch applies to Megatron and torchtitan checkpoints only "
                f"(this is {fmt.name})"
            )
        return fmt.read(p, arch=arch, hf_config=hf_config)
