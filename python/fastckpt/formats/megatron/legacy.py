"""Legacy Megatron saves: ``iter_NNNNNNN/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``.

Every rank file is read with the restricted unpickler (``args`` and Megatron enums become inert
stubs); TP/PP/EP/VP come from ``args``; layers are renumbered by the order of (virtual stage,
pipeline rank) chunks; each TP shard is placed at its offset (column: dim 0, row: dim 1, gated
fc1: gate and up halves apart, replicated: rank 0); legacy ``GroupedMLP`` ``weight1`` /
``weight2`` become one transposed strided view per local expert. The result is the canonical
form of :mod:`fastckpt.formats.megatron.canon`.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastckpt._core import FormatError, ShapeError
from fastckpt.catalog import Chunk
from fastckpt.formats.megatron.canon import _LAYER, _LOCAL_EXPERT, Canon, _canonical, _rows
from fastckpt.formats.megatron.layout import (
    _MP_RANK,
    RANK_FILE,
    Args,
    _File,
    _Layout,
    _layout,
    _load_zip,
    _rank_dirs,
)
from fastckpt.unpickle import TORCH_TO_ST, TensorRef, torch_itemsize

_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")
_LEGACY_GROUPED = re.compile(r"^mlp\.experts\.weight([12])$")


def _ref_chunk(f: _File, ref: TensorRef, offsets: tuple[int, ...], key: str) -> Chunk:
    try:
        data_offset, data_len = f.storages[ref.storage.key]
    except KeyError:
        raise FormatError(f"{f.path}: storage data/{ref.storage.key} is missing") from None
    item = torch_itemsize(ref.dtype)
    if all(ref.shape):
        last = ref.storage_offset + sum(
            (s - 1) * st for s, st in zip(ref.shape, ref.stride, strict=True)
        )
        if ref.storage_offset < 0 or min(ref.stride, default=0) < 0 or (last + 1) * item > data_len:
            raise FormatError(f"{f.path}: tensor {key!r} runs past its storage")
    return Chunk(str(f.path), data_offset, data_len, ref.storage_offset, ref.stride, offsets,
                 ref.shape)  # fmt: skip


def _dtype(ref: TensorRef, where: str, key: str) -> str:
    st = TORCH_TO_ST.get(ref.dtype)
    if st is None:
        raise FormatError(f"{where}: tensor {key!r} has dtype {ref.dtype}, not storable")
    return st


_COLUMN = ("linear_qkv.weight", "linear_qkv.bias", "linear_q_proj.weight",
           "linear_q_up_proj.weight", "linear_kv_up_proj.weight")  # fmt: skip
_ROW = ("linear_proj.weight", "linear_fc2.weight")
_VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")


def _tp_kind(name: str, gated: bool) -> str:
    """How legacy TP shards of ``name`` merge: cat0, cat1, glu or rep."""
    if name in _VOCAB or name.endswith(_COLUMN):
        return "cat0"
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        return "glu" if gated else "cat0"
    if name.endswith(_ROW):
        return "cat1"
    if name.endswith(("linear_q_down_proj.weight", "linear_kv_down_proj.weight")):
        return "down"  # replicated (TE) or column-split (local): decided by shape
    return "rep"


def _grouped_mlp(
    ref: TensorRef, which: str, e_local: int, hidden: int, where: str, key: str
) -> list[tuple[str, TensorRef]]:
    """Legacy ``GroupedMLP`` ``weight1`` / ``weight2`` -> each local expert's ``[out, in]`` view.

    ``weight1`` ``[H, E_loc·C]`` is the memory of ``[E_loc, H, C]`` (``C`` = 2F/ETP, or F/ETP
    without GLU) and ``weight2`` ``[E_loc·R, H]`` that of ``[E_loc, R, H]`` (``R`` = F/ETP): expert
    ``j`` is block ``j``, transposed (``shared/formats/megatron.md`` §3.7). Each becomes a strided
    view of the same storage, so no bytes move until the copy.
    """
    shape, stride = ref.shape, ref.stride
    if not e_local or not hidden:
        raise FormatError(f"{where}: GroupedMLP {key!r} but args lack num_experts / hidden_size")
    if len(shape) != 2 or tuple(stride) != (shape[1], 1):
        raise FormatError(
            f"{where}: GroupedMLP {key!r} is {list(shape)} with strides {list(stride)}, expected a "
            "contiguous 2-D buffer"
        )
    rows, cols = shape
    if which == "1":
        inner = cols // e_local
        if rows != hidden or cols % e_local:
            raise ShapeError(
                f"{where}: GroupedMLP {key!r} is {list(shape)}, expected [{hidden}, "
                f"{e_local}·C] (hidden size, local experts from args)"
            )
        view, step, fc = (inner, hidden), (1, inner), "linear_fc1"
    else:
        inner = rows // e_local
        if cols != hidden or rows % e_local:
            raise ShapeError(
                f"{where}: GroupedMLP {key!r} is {list(shape)}, expected [{e_local}·R, "
                f"{hidden}] (local experts, hidden size from args)"
            )
        view, step, fc = (hidden, inner), (1, hidden), "linear_fc2"
    block = inner * hidden
    return [
        (
            f"mlp.experts.local_experts.{j}.{fc}.weight",
            TensorRef(ref.storage, ref.dtype, ref.storage_offset + j * block, view, step),
        )
        for j in range(e_local)
    ]


@dataclass
class _Shard:
    file: _File
    ref: TensorRef
    key: str
    rank: int  # TP (or expert-TP) rank


def _merge(name: str, shards: list[_Shard], size: int, gated: bool, down_rows: int) -> Canon:
    """Place legacy TP shards in the merged tensor."""
    first = shards[0]
    where = str(first.file.path)
    dtype = _dtype(first.ref, where, first.key)
    for s in shards[1:]:
        if s.ref.shape != first.ref.shape or s.ref.dtype != first.ref.dtype:
            raise ShapeError(
                f"{s.file.path}: tensor {s.key!r} is {s.ref.dtype} {list(s.ref.shape)}, but "
                f"{first.file.path} has {first.ref.dtype} {list(first.ref.shape)} (ranks disagree)"
            )
    kind = _tp_kind(name, gated)
    shape = first.ref.shape
    if kind == "down":
        kind = "rep" if shape and shape[0] == down_rows else "cat0"
    if kind == "rep" or size == 1:
        zeros = (0,) * len(shape)
        return Canon(
            name, dtype, shape, [_ref_chunk(first.file, first.ref, zeros, first.key)], where
        )
    if len(shards) != size:
        raise FormatError(
            f"{where}: tensor {first.key!r} found on {len(shards)} of {size} TP ranks"
        )
    chunks: list[Chunk] = []
    if kind == "cat0" or kind == "glu":
        glob = (shape[0] * size, *shape[1:])
        for s in shards:
            c = _ref_chunk(s.file, s.ref, (s.rank * shape[0], *(0,) * (len(shape) - 1)), s.key)
            if kind == "cat0":
                chunks.append(c)
                continue
            if shape[0] % 2:
                raise ShapeError(f"{s.file.path}: gated {s.key!r} has an odd row count {shape[0]}")
            half = shape[0] // 2
            f_total = half * size
            for part, base in ((0, 0), (1, f_total)):
                chunks += _rows(
                    [c._replace(offsets=(0, *c.offsets[1:]))],
                    part * half,
                    (part + 1) * half,
                    base + s.rank * half,
                )
        return Canon(name, dtype, glob, chunks, where)
    # cat1
    glob = (shape[0], shape[1] * size, *shape[2:])
    for s in shards:
        offs = (0, s.rank * shape[1], *(0,) * (len(shape) - 2))
        chunks.append(_ref_chunk(s.file, s.ref, offs, s.key))
    return Canon(name, dtype, glob, chunks, where)


# --------------------------------------------------------------------------------------------
# reading


def _model_chunks(f: _File, vp: int | None) -> list[dict[str, Any]]:
    obj = f.obj
    if not isinstance(obj, dict):
        raise FormatError(f"{f.path}: not a Megatron checkpoint (no dict at the top)")
    if vp:
        missing = [f"model{v}" for v in range(vp) if not isinstance(obj.get(f"model{v}"), dict)]
        if missing:
            raise FormatError(
                f"{f.path}: args say virtual pipeline size {vp} but {missing[0]!r} is missing "
                "(args disagree with the files)"
            )
        return [obj[f"model{v}"] for v in range(vp)]
    if not isinstance(obj.get("model"), dict):
        extra = " (a virtual-pipeline save: args lack its size)" if "model0" in obj else ""
        raise FormatError(f"{f.path}: no 'model' state dict{extra}")
    return [obj["model"]]


def _layers_of(state: dict[str, Any]) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := _LAYER.match(str(k)))})


def _layer_offsets(
    directory: Path,
    args: Args,
    lay: _Layout,
    chunks_per_file: dict[tuple[int, int, int], list[dict[str, Any]]],
) -> dict[tuple[int, int], int]:
    """``(virtual stage, pipeline rank)`` -> the global number of its first layer.

    Chunks count in (virtual stage, pipeline rank) order, on their lowest ``(tp, ep)`` rank file;
    the total must match ``args.num_layers``.
    """
    offsets: dict[tuple[int, int], int] = {}
    total = 0
    for v in range(lay.vp or 1):
        for pp in range(lay.pp):
            ref_key = min(k for k in chunks_per_file if k[1] == pp)
            offsets[(v, pp)] = total
            total += len(_layers_of(chunks_per_file[ref_key][v]))
    declared = args.int("num_layers", total)
    if declared != total:
        raise FormatError(
            f"{directory}: args say {declared} layers, the rank files hold {total} "
            "(args disagree with the files)"
        )
    return offsets


def _entry_items(
    f: _File,
    key: str,
    name: str,
    ref: TensorRef,
    layer_offset: int,
    ep: int,
    e_local: int,
    hidden: int,
) -> list[tuple[str, TensorRef, bool]]:
    """One state-dict entry -> ``(canonical name, tensor, is an expert)`` items.

    Layer and expert numbers become global; grouped experts (``linear_fc1.weight{e}``, legacy
    ``GroupedMLP`` ``weight1`` / ``weight2``) become one item per local expert.
    """
    m = _LAYER.match(name)
    if not m:
        return [(name, ref, False)]
    layer = int(m.group(1)) + layer_offset
    rest = m.group(2)
    g = _GROUPED_EXPERT.match(rest)
    if g:
        rest = f"mlp.experts.local_experts.{g.group(3)}.{g.group(1)}.{g.group(2)}"
    lg = _LEGACY_GROUPED.match(rest)
    parts = (
        _grouped_mlp(ref, lg.group(1), e_local, hidden, str(f.path), key) if lg else [(rest, ref)]
    )
    items = []
    for rest, part in parts:
        e = _LOCAL_EXPERT.match(rest)
        if e:
            if not e_local:
                raise FormatError(f"{f.path}: expert {key!r} but args say no experts")
            rest = f"mlp.experts.local_experts.{ep * e_local + int(e.group(1))}."
            rest += e.group(2)
        items.append((f"decoder.layers.{layer}.{rest}", part, bool(e)))
    return items


def _read_legacy(directory: Path) -> tuple[Args, dict[str, Canon], list[str]]:
    dirs = sorted(p for p in os.listdir(directory) if _MP_RANK.match(p))
    if not dirs:
        raise FormatError(f"{directory}: no mp_rank_* directories")
    first_path = directory / dirs[0] / RANK_FILE
    first = _load_zip(first_path)
    if not isinstance(first.obj, dict) or "args" not in first.obj:
        raise FormatError(f"{first_path}: no 'args' in the checkpoint (not a Megatron save?)")
    version = first.obj.get("checkpoint_version", 0)
    if not isinstance(version, int | float) or version < 3:
        raise FormatError(
            f"{first_path}: checkpoint_version {version!r} < 3.0 (older QKV row order) is not "
            "supported"
        )
    args = Args(first.obj["args"], str(first_path))
    lay = _layout(args)
    files = _rank_dirs(directory, lay)
    loaded = {k: (first if p == first_path else _load_zip(p)) for k, p in files.items()}
    gated = bool(args.get("swiglu", False) or args.get("gated_linear_unit", False))
    num_experts = args.int("num_experts", 0) or args.int("num_moe_experts", 0)
    e_local = num_experts // lay.ep if num_experts else 0
    hidden = args.int("hidden_size", 0)
    down_rows = (args.int("q_lora_rank", 0), args.int("kv_lora_rank", 0) + args.int(
        "qk_pos_emb_head_dim", 0))  # fmt: skip

    chunks_per_file = {k: _model_chunks(f, lay.vp) for k, f in loaded.items()}
    offsets = _layer_offsets(directory, args, lay, chunks_per_file)

    shards: dict[str, list[_Shard]] = defaultdict(list)
    kinds: dict[str, str] = {}
    for (tp, pp, ep), f in loaded.items():
        for v, state in enumerate(chunks_per_file[(tp, pp, ep)]):
            for key, ref in state.items():
                key = str(key)
                name = _canonical(key)
                if name is None:
                    continue
                if not isinstance(ref, TensorRef):
                    raise FormatError(f"{f.path}: entry {key!r} is not a tensor ({ref!r})")
                items = _entry_items(f, key, name, ref, offsets[(v, pp)], ep, e_local, hidden)
                for name, part, expert in items:
                    rank = tp % lay.etp if expert else tp
                    if any(s.rank == rank for s in shards[name]):
                        continue  # dense tensors repeat on every EP rank; experts on ETP groups
                    shards[name].append(_Shard(f, part, key, rank))
                    kinds[name] = "expert" if expert else "dense"
    canon: dict[str, Canon] = {}
    for name, group in shards.items():
        group.sort(key=lambda s: s.rank)
        size = lay.etp if kinds[name] == "expert" else lay.tp
        rows = down_rows[1] if name.endswith("linear_kv_down_proj.weight") else down_rows[0]
        canon[name] = _merge(name, group, size, gated, rows)
    notes = [
        f"Megatron legacy checkpoint: TP={lay.tp}, PP={lay.pp}, EP={lay.ep}, "
        f"VP={lay.vp or 1}, {len(loaded)} rank files"
    ]
    return args, canon, notes
