"""Source formats: one module per on-disk layout, each reducing its files to a :class:`Catalogue`.

Every reader registers a :class:`Format` (a name, a cheap ``sniff`` and an ``open``) in
:mod:`fastckpt.formats.registry`, which tries them in order. Adding a format is one new module that
defines its ``FORMAT`` plus one line in the registry. Formats import only the layers below them
(:mod:`fastckpt.catalog`, :mod:`fastckpt.unpickle`, :mod:`fastckpt.safeio`,
:mod:`fastckpt.side_files`, the Rust core), never transforms, output, runs, the API or the CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastckpt.catalog import Catalogue


@dataclass(frozen=True)
class Format:
    """One source format.

    ``sniff(path)`` says, from names and at most a few small reads, whether this reader should
    take ``path`` (a file or a folder); ``open(path, **options)`` catalogues it. Formats that
    rename tensors to Hugging Face names (Megatron, torchtitan) set ``takes_arch`` and receive
    ``arch`` and ``hf_config``; the others are refused an ``--arch``.
    """

    name: str
    sniff: Callable[[Path], bool]
    open: Callable[..., Catalogue]
    what: str  # the files it looks for, for the "cannot read" message
    takes_arch: bool = False

    def read(self, path: Path, *, arch: str | None, hf_config: dict[str, Any] | None) -> Catalogue:
        if self.takes_arch:
            return self.open(path, arch=arch, hf_config=hf_config)
        return self.open(path)
