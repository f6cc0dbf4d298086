"""One whole-file ``torch.save`` holding a full state dict.

RLinf ``full_weights.pt``, ``pytorch_model.bin``, old prime-rl ``trainer.pt`` with
``{"model": .., "optimizers": .., "progress": ..}``: each tensor is one chunk, a strided view of
its storage (tied weights and views share storages). Loading and assembling are shared with the
per-rank files (:mod:`fastckpt.formats.torch_load`, :mod:`fastckpt.formats.torch_assemble`).
"""

from __future__ import annotations

from pathlib import Path

from fastckpt._core import FormatError
from fastckpt.catalog import Catalogue
from fastckpt.formats import Format
from fastckpt.formats.torch_assemble import _catalogue
from fastckpt.formats.torch_load import _load_file
from fastckpt.safeio import listing

#: suffixes of whole-file torch.save checkpoints
TORCH_SAVE_SUFFIXES = (".pt", ".pth", ".bin")


def is_torch_save_file(path: Path) -> bool:
    """True for a file named like a whole-file torch.save checkpoint."""
    return path.is_file() and path.suffix in TORCH_SAVE_SUFFIXES


def single_torch_save_file(path: Path) -> Path | None:
    """The one torch.save file of a directory holding exactly one, else None."""
    if not path.is_dir():
        return None
    found = [path / n for n in listing(path) if is_torch_save_file(path / n)]
    return found[0] if len(found) == 1 else None


def read_torch_save(path: Path) -> Catalogue:
    """Catalogue one whole-file torch.save (a file, or a folder holding exactly one)."""
    file = path if path.is_file() else single_torch_save_file(path)
    if file is None:
        raise FormatError(f"{path}: expected one torch.save file (.pt, .pth, .bin)")
    parent = file.parent
    side_dirs = [
        parent / "huggingface",
        parent / "hf",
        parent,
        parent.parent / "huggingface",
        parent.parent / "hf",
        parent.parent / "tokenizer",
    ]
    return _catalogue("torch_save", file, [_load_file(file, 0)], side_dirs, [])


FILE_FORMAT = Format(
    "torch_save",
    sniff=lambda p: is_torch_save_file(p) or single_torch_save_file(p) is not None,
    open=read_torch_save,
    what="single .pt/.bin file",
)
