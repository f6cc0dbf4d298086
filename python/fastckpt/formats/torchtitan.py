"""torchtitan checkpoints: a DCP whose model keys sit at the top level, renamed to Hugging Face's.

torchtitan's ``CheckpointManager`` saves the model's own names (``tok_embeddings.weight``,
``layers.N.attention.qkv_linear.wq.weight``, ``lm_head.weight``; before 0.3
``layers.N.attention.wq.weight`` and ``output.weight``) beside ``optimizer.*``,
``lr_scheduler.*``, ``train_state.*`` and ``dataloader.*``. The DCP reader (:mod:`.dcp`) already
keeps the model tensors only; this module renames them as torchtitan's own state-dict adapters
(``<family>/state_dict_adapter.py``, ``to_hf``) do, for the families torchtitan 0.3 ships adapters
for: ``llama3``, ``qwen3`` (dense and MoE) and ``deepseek_v3``. Every op stays a view of the stored
bytes, never a computation:

* a rename;
* llama3's rotary permutation of ``q_proj``/``k_proj``: torchtitan keeps each head's rotary
  pairs interleaved (rows ``2j``, ``2j + 1``), Hugging Face keeps them in halves, so per head
  the output rows are the source's even rows then its odd rows: two boxes per head, each with a
  row stride of two source rows (a source chunk boundary inside a head splits a box further);
* MoE experts stored stacked (``w1_EFD`` ``[E, F, D]``) split into one tensor per expert: the
  box of expert ``e`` is the stored chunk with its first dimension fixed (``storage_offset`` moved
  by ``e`` strides).

The head counts come from the Hugging Face ``config.json`` the output will carry (``hf_config``,
from ``--config-from``, else the first ``config.json`` beside the checkpoint); without one, or
for another family, the names stay torchtitan's (the API warns that transformers cannot load
them). Names no table knows keep their names, with a warning (``Catalogue.warnings``).
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastckpt._core import FormatError, MappingError
from fastckpt.catalog import Catalogue, Chunk, TensorEntry, TensorMeta
from fastckpt.formats import Format
from fastckpt.formats.dcp import MAX_METADATA_BYTES, DcpReader, is_dcp_dir, read_dcp
from fastckpt.safeio import listing, open_regular
from fastckpt.side_files import find_side_files
from fastckpt.unpickle import Metadata

#: the key every torchtitan language model saves (what :func:`sniff` looks for)
TITAN_EMBED = "tok_embeddings.weight"

# --------------------------------------------------------------------------------------------
# name tables, as in torchtitan 0.3's ``to_hf``: (pattern, Hugging Face name, op), first match
# wins. Layer rules match what follows ``layers.N.`` and name what follows ``model.layers.N.``;
# ``{e}`` is the expert. ``qkv_linear.`` is optional (names before torchtitan 0.3 lack it).

Rule = tuple[str, str, str]

_TOP: tuple[Rule, ...] = (
    (r"tok_embeddings\.weight", "model.embed_tokens.weight", ""),
    (r"norm\.weight", "model.norm.weight", ""),
    (r"(?:lm_head|output)\.weight", "lm_head.weight", ""),
)
_QKV = r"attention\.(?:qkv_linear\.)?"
_DENSE: tuple[Rule, ...] = (
    (_QKV + r"wv\.weight", "self_attn.v_proj.weight", ""),
    (r"attention\.wo\.weight", "self_attn.o_proj.weight", ""),
    (r"feed_forward\.w1\.weight", "mlp.gate_proj.weight", ""),
    (r"feed_forward\.w3\.weight", "mlp.up_proj.weight", ""),
    (r"feed_forward\.w2\.weight", "mlp.down_proj.weight", ""),
    (r"attention_norm\.weight", "input_layernorm.weight", ""),
    (r"ffn_norm\.weight", "post_attention_layernorm.weight", ""),
)
_EXPERTS = r"moe\.routed_experts\.inner_experts\."
_MOE: tuple[Rule, ...] = (
    (_EXPERTS + "w1_EFD", "mlp.experts.{e}.gate_proj.weight", "experts"),
    (_EXPERTS + "w3_EFD", "mlp.experts.{e}.up_proj.weight", "experts"),
    (_EXPERTS + "w2_EDF", "mlp.experts.{e}.down_proj.weight", "experts"),
    (r"moe\.router\.gate\.weight", "mlp.gate.weight", ""),
)

#: family -> layer rules
TABLES: dict[str, tuple[Rule, ...]] = {
    "llama3": (
        (_QKV + r"wq\.weight", "self_attn.q_proj.weight", "rope_q"),
        (_QKV + r"wk\.weight", "self_attn.k_proj.weight", "rope_k"),
        *_DENSE,
    ),
    "qwen3": (
        (_QKV + r"wq\.weight", "self_attn.q_proj.weight", ""),
        (_QKV + r"wk\.weight", "self_attn.k_proj.weight", ""),
        (r"attention\.q_norm\.weight", "self_attn.q_norm.weight", ""),
        (r"attention\.k_norm\.weight", "self_attn.k_norm.weight", ""),
        *_DENSE,
        *_MOE,
    ),
    "deepseek_v3": (
        (r"attention\.wq\.weight", "self_attn.q_proj.weight", ""),
        (r"attention\.wq_a\.weight", "self_attn.q_a_proj.weight", ""),
        (r"attention\.q_norm\.weight", "self_attn.q_a_layernorm.weight", ""),
        (r"attention\.wq_b\.weight", "self_attn.q_b_proj.weight", ""),
        (r"attention\.wkv_a\.weight", "self_attn.kv_a_proj_with_mqa.weight", ""),
        (r"attention\.kv_norm\.weight", "self_attn.kv_a_layernorm.weight", ""),
        (r"attention\.wkv_b\.weight", "self_attn.kv_b_proj.weight", ""),
        *_DENSE,
        *_MOE,
        (r"moe\.shared_experts\.w1\.weight", "mlp.shared_experts.gate_proj.weight", ""),
        (r"moe\.shared_experts\.w3\.weight", "mlp.shared_experts.up_proj.weight", ""),
        (r"moe\.shared_experts\.w2\.weight", "mlp.shared_experts.down_proj.weight", ""),
        (r"moe\.expert_bias_E", "mlp.gate.e_score_correction_bias", ""),
        (r"enorm\.weight", "enorm.weight", ""),
        (r"hnorm\.weight", "hnorm.weight", ""),
        (r"eh_proj\.weight", "eh_proj.weight", ""),
        (r"mtp_norm\.weight", "shared_head.norm.weight", ""),
    ),
}

#: Hugging Face ``model_type`` (or ``--arch``) -> family
FAMILIES = {
    "llama": "llama3",
    "llama3": "llama3",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3",
    "deepseek_v3": "deepseek_v3",
}

_COMPILED = {
    family: tuple((re.compile(p), hf, op) for p, hf, op in table)
    for family, table in TABLES.items()
}
_TOP_COMPILED = tuple((re.compile(p), hf, op) for p, hf, op in _TOP)
_LAYER = re.compile(r"^(mtp_)?layers\.(\d+)\.(.+)$")


# --------------------------------------------------------------------------------------------
# views: every op is a set of boxes over the stored chunks


def permute_rows(chunks: tuple[Chunk, ...], rows: list[int]) -> tuple[Chunk, ...]:
    """The chunks of a tensor whose output row ``r`` is source row ``rows[r]`` (dim 0).

    Each stored chunk gives the output rows its source rows feed, grouped into runs of adjacent
    output rows whose source rows advance by one constant positive step: one box per run.
    """
    inverse = [0] * len(rows)
    for out_row, src_row in enumerate(rows):
        inverse[src_row] = out_row
    out: list[Chunk] = []
    for c in chunks:
        first = c.offsets[0]
        fed = sorted(inverse[s] for s in range(first, first + c.sizes[0]))
        i = 0
        while i < len(fed):
            j, step = i + 1, 0
            while j < len(fed) and fed[j] == fed[j - 1] + 1:
                d = rows[fed[j]] - rows[fed[j - 1]]
                if d <= 0 or (step and d != step):
                    break
                step, j = d, j + 1
            src = rows[fed[i]]
            out.append(
                c._replace(
                    storage_offset=c.storage_offset + (src - first) * c.strides[0],
                    strides=((step or 1) * c.strides[0], *c.strides[1:]),
                    offsets=(fed[i], *c.offsets[1:]),
                    sizes=(j - i, *c.sizes[1:]),
                )
            )
            i = j
    return tuple(out)


def rope_rows(n_rows: int, heads: int) -> list[int]:
    """Source row of each output row of torchtitan's ``_permute(w, heads)``: per head,
    ``view(heads, hd/2, 2, ...).transpose(1, 2)``, i.e. the even rows, then the odd rows."""
    hd = n_rows // heads
    half = hd // 2
    return [h * hd + 2 * j + i for h in range(heads) for i in range(2) for j in range(half)]


def select_first(chunks: tuple[Chunk, ...], index: int) -> tuple[Chunk, ...]:
    """The chunks of ``tensor[index]`` (the first dimension fixed, as ``split(1)[index]``
    then ``squeeze(0)``)."""
    out = []
    for c in chunks:
        if c.offsets[0] <= index < c.offsets[0] + c.sizes[0]:
            out.append(
                c._replace(
                    storage_offset=c.storage_offset + (index - c.offsets[0]) * c.strides[0],
                    strides=tuple(c.strides[1:]),
                    offsets=tuple(c.offsets[1:]),
                    sizes=tuple(c.sizes[1:]),
                )
            )
    return tuple(out)


@dataclass(frozen=True)
class View:
    """How one output tensor is cut from one stored tensor (``source``)."""

    source: TensorMeta
    cut: Callable[[tuple[Chunk, ...]], tuple[Chunk, ...]]


class TitanReader(DcpReader):
    """A DCP reader whose renamed tensors are views of their stored ones; the rest (optimizer
    state read by ``--with-optimizer``, kept names) is located as the DCP reader does."""

    def __init__(self, directory: Path, md: Metadata, views: dict[str, View]) -> None:
        super().__init__(directory, md)
        self.views = views

    def _view(self, meta: TensorMeta) -> View | None:
        view = self.views.get(meta.name)
        return view if view is not None and view.source.key == meta.key else None

    def locate(self, metas: list[TensorMeta]) -> list[TensorEntry]:
        wanted: dict[str, TensorMeta] = {}
        for meta in metas:
            view = self._view(meta)
            source = view.source if view is not None else meta
            wanted.setdefault(f"{source.key}\0{source.name}", source)
        located = {f"{e.meta.key}\0{e.meta.name}": e for e in super().locate(list(wanted.values()))}
        out = []
        for meta in metas:
            view = self._view(meta)
            if view is None:
                out.append(located[f"{meta.key}\0{meta.name}"])
            else:
                stored = located[f"{view.source.key}\0{view.source.name}"]
                out.append(TensorEntry(meta, view.cut(stored.chunks)))
        return out


# --------------------------------------------------------------------------------------------
# the mapping


@dataclass
class _Heads:
    """Attention geometry from ``config.json`` (llama3's rotary permutation needs it)."""

    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: dict[str, Any]) -> _Heads:
        try:
            heads = int(config["num_attention_heads"])
            kv = int(config.get("num_key_value_heads") or heads)
            head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            raise MappingError(
                "config.json lacks num_attention_heads / hidden_size, which the llama3 rotary "
                "permutation of q_proj/k_proj needs"
            ) from None
        return cls(heads, kv, head_dim)


def family_of(config: dict[str, Any] | None, arch: str | None) -> str | None:
    """The adapter family: ``arch`` if given, else from ``config.json``'s ``model_type``."""
    if arch is not None:
        if arch not in FAMILIES:
            known = ", ".join(sorted(FAMILIES))
            raise FormatError(f"--arch {arch!r}: torchtitan names map for {known} only")
        return FAMILIES[arch]
    if not config:
        return None
    return FAMILIES.get(str(config.get("model_type", "")))


def _hf_name(family: str, name: str, n_main: int) -> tuple[str, str] | None:
    """``(Hugging Face name, op)`` for one torchtitan name; ``None`` when no rule knows it.

    deepseek_v3's ``mtp_layers.M.*`` are Hugging Face's layer ``n_main + M``."""
    layer = _LAYER.match(name)
    if layer is None:
        rules, rest, prefix = _TOP_COMPILED, name, ""
    elif layer.group(1) and family != "deepseek_v3":
        return None
    else:
        number = int(layer.group(2)) + (n_main if layer.group(1) else 0)
        rules, rest, prefix = _COMPILED[family], layer.group(3), f"model.layers.{number}."
    for pattern, hf, op in rules:
        if pattern.fullmatch(rest):
            return prefix + hf, op
    return None


def _rope_view(meta: TensorMeta, heads: int, head_dim: int) -> View:
    rows = meta.shape[0] if len(meta.shape) == 2 else 0
    if rows != heads * head_dim or head_dim % 2:
        raise MappingError(
            f"tensor {meta.key!r} has shape {list(meta.shape)}, but config.json's head counts "
            f"give {heads} heads of {head_dim} rows: the rotary permutation cannot be applied "
            "(pass --config-from DIR with the model's own config.json)"
        )
    order = rope_rows(rows, heads)
    return View(meta, lambda chunks: permute_rows(chunks, order))


def _expert_view(meta: TensorMeta, index: int) -> View:
    return View(meta, lambda chunks: select_first(chunks, index))


def map_names(cat: Catalogue, family: str, config: dict[str, Any] | None) -> Catalogue:
    """Rename the model tensors of a torchtitan catalogue to Hugging Face names (in place)."""
    heads = _Heads.of(config or {}) if family == "llama3" else None
    model = [m for m in cat.tensors.values() if m.is_model]
    n_main = len({m.name.split(".")[1] for m in model if m.name.startswith("layers.")})
    tensors: dict[str, TensorMeta] = {}
    views: dict[str, View] = {}
    unknown: list[str] = []
    taken: dict[str, str] = {}
    for meta in cat.tensors.values():
        rule = _hf_name(family, meta.name, n_main) if meta.is_model else None
        if rule is None:
            unknown += [meta.name] if meta.is_model else []
            tensors[meta.name] = meta
            continue
        template, op = rule
        outs: list[tuple[str, TensorMeta, View | None]] = []
        if op == "experts":
            for e in range(meta.shape[0] if meta.shape else 0):
                out = replace(meta, name=template.replace("{e}", str(e)), shape=meta.shape[1:])
                outs.append((out.name, out, _expert_view(meta, e)))
        else:
            out = replace(meta, name=template)
            view = None
            if op and heads is not None:
                n = heads.heads if op == "rope_q" else heads.kv_heads
                view = _rope_view(meta, n, heads.head_dim)
            outs.append((template, out, view))
        for name, out, view in outs:
            if name in taken:
                raise FormatError(
                    f"{cat.path}: keys {taken[name]!r} and {meta.key!r} both map to {name!r}"
                )
            taken[name] = meta.key
            tensors[name] = out
            if view is not None:
                views[name] = view
    for name, meta in list(tensors.items()):  # a kept (non-model) name equal to a mapped one
        if not meta.is_model and name in taken and meta.key != taken[name]:
            del tensors[name]
            tensors["__" + meta.key] = replace(meta, name="__" + meta.key)
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        cat.warnings.append(
            f"{len(unknown)} torchtitan tensor name(s) have no Hugging Face name in the "
            f"{family} adapter and are written as they are ({shown})"
        )
    assert isinstance(cat.reader, DcpReader)
    cat.reader = TitanReader(cat.reader.directory, cat.reader.md, views)
    cat.tensors = tensors
    cat.notes.append(
        f"torchtitan names mapped to Hugging Face names as torchtitan's {family} "
        "state_dict_adapter.to_hf does"
        + (" (q_proj/k_proj rows permuted per head for rotary embeddings)" if heads else "")
    )
    return cat


# --------------------------------------------------------------------------------------------
# the format


def _metadata_file(path: Path) -> Path | None:
    if (path / ".metadata").is_file():
        return path / ".metadata"
    ranks = [n for n in listing(path) if re.fullmatch(r"__\d+\.metadata", n)]
    return path / ranks[0] if ranks else None


def sniff(path: Path) -> bool:
    """A DCP folder (or its ``.metadata``) whose metadata names ``tok_embeddings.weight``."""
    folder = path.parent if path.is_file() and path.name == ".metadata" else path
    if not is_dcp_dir(folder):
        return False
    md = _metadata_file(folder)
    if md is None:
        return False
    try:  # never blocks on a FIFO, never reads a device: the DCP reader then refuses it
        fd = open_regular(md)
    except (OSError, FormatError):
        return False
    try:
        size = os.fstat(fd).st_size
        if size == 0 or size > MAX_METADATA_BYTES:
            return False
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            return m.find(TITAN_EMBED.encode()) >= 0
    except (OSError, ValueError):
        return False
    finally:
        os.close(fd)


def open_titan(
    path: Path, *, arch: str | None = None, hf_config: dict[str, Any] | None = None
) -> Catalogue:
    """Catalogue a torchtitan DCP, its names mapped when the family and heads are known."""
    cat = read_dcp(path.parent if path.is_file() else path)
    config = hf_config if hf_config is not None else find_side_files(cat.side_dirs).config
    family = family_of(config, arch)
    if family is None or not any(m.name == TITAN_EMBED for m in cat.tensors.values()):
        if config is not None and family is None:
            cat.notes.append(
                f"config.json says model_type {str(config.get('model_type'))!r}: torchtitan "
                f"names map to Hugging Face names for {', '.join(sorted(TABLES))} only"
            )
        return cat
    return map_names(cat, family, config)


FORMAT = Format(
    "torchtitan",
    sniff=sniff,
    open=open_titan,
    what="",
    takes_arch=True,
)
