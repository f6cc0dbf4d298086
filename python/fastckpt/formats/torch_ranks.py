"""Per-rank ``torch.save`` files: veRL FSDP and old prime-rl.

veRL ``model_world_size_{W}_rank_{R}.pt`` and old prime-rl ``trainer_{R}.pt``: each rank's
``torch.save(model.state_dict())``, a dict FQN -> DTensor (FSDP2, or FSDP1
``SHARDED_STATE_DICT`` on a device mesh) or plain tensor. This module finds the rank files and
checks the world size; loading one file and placing the DTensor boxes are shared with the
whole-file reader (:mod:`fastckpt.formats.torch_load`, :mod:`fastckpt.formats.torch_assemble`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastckpt._core import FormatError
from fastckpt.catalog import Catalogue
from fastckpt.formats import Format
from fastckpt.formats.torch_assemble import _catalogue
from fastckpt.formats.torch_load import _load_file
from fastckpt.safeio import listing

#: veRL per-rank model files
RANK_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
#: old prime-rl per-rank trainer files (keyed by local rank)
TRAINER_FILE = re.compile(r"^trainer_(\d+)\.pt$")


def is_rank_dir(path: Path) -> bool:
    """True if ``path`` holds per-rank model files (veRL or old prime-rl layout)."""
    if not path.is_dir():
        return False
    names = listing(path)
    return any(RANK_FILE.match(n) for n in names) or any(TRAINER_FILE.match(n) for n in names)


def _rank_files(directory: Path) -> tuple[list[tuple[int, Path]], str]:
    names = listing(directory)
    verl = [(m, n) for n in names if (m := RANK_FILE.match(n))]
    if verl:
        sizes: dict[int, list[str]] = {}
        for m, n in verl:
            sizes.setdefault(int(m.group(1)), []).append(n)
        if len(sizes) > 1:
            shown = "; ".join(f"W={w}: {', '.join(ns[:3])}" for w, ns in sorted(sizes.items()))
            raise FormatError(
                f"{directory}: rank files of several world sizes ({shown}); keep one run's files"
            )
        (world,) = sizes
        source = "file names"
        cfg = directory / "fsdp_config.json"
        if cfg.is_file():
            try:
                declared = json.loads(cfg.read_text()).get("world_size")
            except (ValueError, OSError, AttributeError) as exc:
                raise FormatError(f"{cfg}: unreadable ({exc})") from None
            if declared is not None and int(declared) != world:
                raise FormatError(
                    f"{cfg}: says world_size {declared}, but the rank files are "
                    f"model_world_size_{world}_rank_*.pt"
                )
            source = "fsdp_config.json and file names"
        ranks = {int(m.group(2)): directory / n for m, n in verl}
        for r in range(world):
            if r not in ranks:
                raise FormatError(
                    f"{directory / f'model_world_size_{world}_rank_{r}.pt'}: missing rank file "
                    f"(world size {world})"
                )
        bad = sorted(r for r in ranks if r >= world)
        if bad:
            raise FormatError(f"{ranks[bad[0]]}: rank {bad[0]} is outside world size {world}")
        return [(r, ranks[r]) for r in range(world)], f"world size {world} (from {source})"
    trainer = {int(m.group(1)): directory / n for n in names if (m := TRAINER_FILE.match(n))}
    world = max(trainer) + 1
    for r in range(world):
        if r not in trainer:
            raise FormatError(f"{directory / f'trainer_{r}.pt'}: missing rank file")
    return [(r, trainer[r]) for r in range(world)], f"world size {world} (trainer_R.pt files)"


def read_rank_dir(directory: Path) -> Catalogue:
    """Catalogue a folder of per-rank files (veRL FSDP1/FSDP2, old prime-rl ``trainer_R.pt``)."""
    ranks, how = _rank_files(directory)
    files = [_load_file(path, rank) for rank, path in ranks]
    parent = directory.parent
    side_dirs = [
        directory / "huggingface",
        directory / "hf",
        directory,
        parent / "huggingface",
        parent / "hf",
        parent / "tokenizer",
        parent,
    ]
    return _catalogue("torch_ranks", directory, files, side_dirs, [how])


RANKS_FORMAT = Format(
    "torch_ranks", sniff=is_rank_dir, open=read_rank_dir, what="model_world_size_W_rank_R.pt files"
)
