"""Megatron-LM / Megatron-Core checkpoints: legacy ``mp_rank_*`` files and ``torch_dist``.

Both formats are reduced to one *canonical* form first: Megatron names with global layer and
expert numbers (``decoder.layers.{i}.…``, ``…mlp.experts.local_experts.{e}.…``), norm aliases
resolved, each tensor a list of :class:`Chunk` boxes placed in the merged (TP-concatenated)
Megatron tensor, with the SwiGLU ``linear_fc1`` as global ``[GATE; UP]``:

* **legacy** (``iter_NNNNNNN/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``): every rank file is read
  with the restricted unpickler (``args`` and Megatron enums become inert stubs); TP/PP/EP/VP come
  from ``args``; layers are renumbered by the order of (virtual stage, pipeline rank) chunks; each
  TP shard is placed at its offset (column: dim 0, row: dim 1, gated fc1: gate and up halves
  apart, replicated: rank 0); legacy ``GroupedMLP`` ``weight1`` / ``weight2`` become one
  transposed strided view per local expert.
* **torch_dist** (DCP + ``metadata.json``): the DCP reader locates the global chunks; the stacked
  layer (and expert) axes are exploded into per-layer boxes.

The canonical tensors are then mapped to Hugging Face names by one :class:`Arch` table entry per
architecture; every op (QKV split per query group, gate/up split, vocab trim) is a row slice of
boxes, so the Rust core copies straight from the mapped rank files. Format facts:
``shared/formats/megatron.md``.

Layout of this package:

* ``layout.py``: detection, the tracker file, rank files (restricted unpickler, zip), ``Args``, the
  legacy TP/PP/EP layout and its ``mp_rank_*`` directories;
* ``canon.py``: the canonical form (``Canon``, norm aliases, row slices of boxes);
* ``legacy.py``: the legacy reader (TP merging, grouped experts, layer renumbering);
* ``dist.py``: the torch_dist reader;
* ``naming.py``: the ``Arch`` table and the Megatron -> HF name mapping;
* ``config.py``: dimensions, architecture detection, the derived ``config.json``;
* here: :func:`read_megatron`, which ties them together, and the two registered formats.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastckpt._core import FormatError, MappingError
from fastckpt.catalog import Catalogue, TensorEntry, TensorMeta
from fastckpt.formats import Format
from fastckpt.formats.megatron.canon import _LAYER, _ROUTER, Canon
from fastckpt.formats.megatron.config import _dims, derive_config, detect_arch
from fastckpt.formats.megatron.dist import _read_dist
from fastckpt.formats.megatron.layout import (
    MAX_PICKLE_BYTES,
    RANK_FILE,
    TRACKER,
    Args,
    _tracker_dir,
    is_dist_dir,
    is_legacy_dir,
)
from fastckpt.formats.megatron.legacy import _read_legacy
from fastckpt.formats.megatron.naming import ARCHS, Arch, _map, _Out
from fastckpt.side_files import find_side_files

__all__ = [
    "ARCHS",
    "DIST_FORMAT",
    "LEGACY_FORMAT",
    "MAX_PICKLE_BYTES",
    "RANK_FILE",
    "TRACKER",
    "Arch",
    "Args",
    "Canon",
    "MegatronReader",
    "derive_config",
    "detect_arch",
    "is_dist_dir",
    "is_legacy_dir",
    "read_megatron",
]


class MegatronReader:
    """Hands out the boxes mapped at catalogue time; ``derived_config`` when no HF config."""

    def __init__(self, outs: dict[str, _Out], derive: Callable[[], dict[str, Any]] | None) -> None:
        self._outs = outs
        self._derive = derive

    @property
    def derived_config(self) -> dict[str, Any] | None:
        """A ``config.json`` from ``args``, made on first use (it may refuse: MappingError)."""
        return None if self._derive is None else self._derive()

    def locate(self, metas: list[TensorMeta]) -> list[TensorEntry]:
        return [TensorEntry(m, tuple(self._outs[m.name].chunks)) for m in metas]


def read_megatron(
    path: Path, *, arch: str | None = None, hf_config: dict[str, Any] | None = None
) -> Catalogue:
    """Catalogue a Megatron checkpoint (legacy or torch_dist) under Hugging Face names.

    Args:
        path: an ``iter_NNNNNNN``/``release`` folder, or a save root with a tracker file.
        arch: a key of :data:`ARCHS` (default: from ``hf_config``, else from ``args``).
        hf_config: the HF ``config.json`` the output will carry (vocab size, tied embeddings).
    """
    directory = _tracker_dir(path)
    if not directory.is_dir():
        raise FormatError(f"{directory}: iteration folder named by {TRACKER} is missing")
    parent = directory.parent
    side_dirs = [directory / "huggingface", directory / "hf", parent / "huggingface",
                 parent / "hf", parent / "tokenizer", parent]  # fmt: skip
    config = hf_config if hf_config is not None else find_side_files(side_dirs).config
    if is_dist_dir(directory):
        fmt = "megatron_dist"
        args, canon, notes = _read_dist(directory)
    else:
        fmt = "megatron"
        args, canon, notes = _read_legacy(directory)
    if args.get("layernorm_zero_centered_gamma") or args.get("apply_layernorm_1p"):
        raise MappingError(
            f"{args.source}: zero-centred norm weights (HF = stored + 1) need arithmetic, not a "
            "copy; not supported"
        )
    key = arch or detect_arch(args, config)
    if key not in ARCHS:
        raise MappingError(f"unknown arch {key!r} (known: {', '.join(ARCHS)})")
    d = _dims(args, config, canon)
    outs = _map(canon, ARCHS[key], d, str(directory))
    notes.append(f"architecture {key}" + (" (--arch)" if arch else ""))
    derive: Callable[[], dict[str, Any]] | None = None
    if config is None:
        emb = canon.get("embedding.word_embeddings.weight")
        routers = [m.group(1) for n in canon if (m := _LAYER.match(n)) and m.group(2) == _ROUTER]
        moe_layers = sorted({int(i) for i in routers})
        dtype = emb.dtype if emb else "F32"
        derive = functools.partial(derive_config, args, key, d, dtype, moe_layers)
    tensors: dict[str, TensorMeta] = {}
    by_name: dict[str, _Out] = {}
    for o in outs:
        if o.name in tensors:
            raise MappingError(f"{directory}: two Megatron tensors map to {o.name!r}")
        tensors[o.name] = TensorMeta(o.name, o.key, o.dtype, o.shape, len(o.chunks), True)
        by_name[o.name] = o
    return Catalogue(
        format=fmt,
        path=directory,
        reader=MegatronReader(by_name, derive),
        tensors=tensors,
        skipped=[],
        side_dirs=side_dirs,
        notes=notes,
    )


DIST_FORMAT = Format(
    "megatron_dist",
    sniff=is_dist_dir,
    open=read_megatron,
    what="Megatron metadata.json",
    takes_arch=True,
)
LEGACY_FORMAT = Format(
    "megatron", sniff=is_legacy_dir, open=read_megatron, what="mp_rank_* folders", takes_arch=True
)
