"""The canonical form both readers produce.

Megatron names with global layer and expert numbers (``decoder.layers.{i}.…``,
``…mlp.experts.local_experts.{e}.…``), norm aliases resolved, each tensor a list of :class:`Chunk`
boxes placed in the merged (TP-concatenated) Megatron tensor; :func:`_rows` slices such boxes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fastckpt.catalog import Chunk

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")

#: norm aliases (TE fused names -> standalone names), ``shared/formats/megatron.md`` §3.1
_NORM_ALIASES = (
    ("self_attention.linear_qkv.layer_norm_", "input_layernorm."),
    ("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."),
    ("self_attention.linear_q_up_proj.layer_norm_", "self_attention.q_layernorm."),
    ("self_attention.linear_kv_up_proj.layer_norm_", "self_attention.kv_layernorm."),
)
#: the router of a MoE layer (after ``decoder.layers.{i}.``)
_ROUTER = "mlp.router.weight"


@dataclass
class Canon:
    """A canonical Megatron tensor: global shape and its boxes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: list[Chunk] = field(default_factory=list)
    source: str = ""


def _canonical(name: str) -> str | None:
    """Resolve norm aliases; None for entries that are never weights (``_extra_state``)."""
    if "_extra_state" in name:
        return None
    for old, new in _NORM_ALIASES:
        if old in name:
            name = name.replace(old, new)
    return name


def _rows(chunks: list[Chunk], start: int, stop: int, dst: int) -> list[Chunk]:
    """The boxes of rows ``[start, stop)`` of a tensor, placed at row ``dst`` of another."""
    out = []
    for c in chunks:
        lo, hi = max(start, c.offsets[0]), min(stop, c.offsets[0] + c.sizes[0])
        if lo >= hi:
            continue
        skip = lo - c.offsets[0]
        out.append(
            c._replace(
                storage_offset=c.storage_offset + skip * c.strides[0],
                offsets=(lo - start + dst, *c.offsets[1:]),
                sizes=(hi - lo, *c.sizes[1:]),
            )
        )
    return out
