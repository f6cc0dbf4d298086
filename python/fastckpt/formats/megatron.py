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
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastckpt._core import FormatError, MappingError, ShapeError
from fastckpt.catalog import Catalogue, Chunk, TensorEntry, TensorMeta
from fastckpt.formats import Format
from fastckpt.formats.dcp import load_metadata, read_dcp
from fastckpt.safeio import item_path
from fastckpt.side_files import TORCH_DTYPE_NAMES, find_side_files
from fastckpt.unpickle import (
    TORCH_TO_ST,
    MetadataIndex,
    Stub,
    StubbingUnpickler,
    TensorRef,
    TorchZip,
    open_fd,
    torch_itemsize,
)

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
_MP_RANK = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")
_LEGACY_GROUPED = re.compile(r"^mlp\.experts\.weight([12])$")
MAX_PICKLE_BYTES = 1 << 30

#: norm aliases (TE fused names -> standalone names), ``shared/formats/megatron.md`` §3.1
_NORM_ALIASES = (
    ("self_attention.linear_qkv.layer_norm_", "input_layernorm."),
    ("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."),
    ("self_attention.linear_q_up_proj.layer_norm_", "self_attention.q_layernorm."),
    ("self_attention.linear_kv_up_proj.layer_norm_", "self_attention.kv_layernorm."),
)


# --------------------------------------------------------------------------------------------
# architectures: one table entry each


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face architecture names Megatron's canonical tensors.

    Attributes:
        architecture: the HF model class (``config.json`` ``architectures``).
        model_type: the HF ``model_type``.
        q_norm: HF names of ``q_layernorm`` / ``k_layernorm`` (under ``self_attn.``).
        moe: prefix of the router and experts (``mlp`` or ``block_sparse_moe``); None for dense
            families, whose routers and experts are then unknown names.
        experts: HF names of an expert's gate, up and down projections.
        shared: prefix of the shared expert (``mlp.shared_expert``); None where HF has none.
        shared_gate: prefix of the shared expert's sigmoid gate (``mlp.shared_expert_gate``).
        moe_config: for MoE families, the ``config.json`` keys of the expert count and the expert
            FFN size (a derived config); None for dense families.
        norm_topk: the ``config.json`` key that says whether the top-k routing weights are
            renormalised (Megatron ``moe_router_pre_softmax=False``); None where they always are.
        shared_config: the ``config.json`` key of the (required) shared expert: its FFN size, or
            (``shared_count``) how many expert FFNs wide it is.
        shared_count: ``shared_config`` counts expert FFNs (DeepSeek ``n_shared_experts``).
        dense_layers: the ``config.json`` key listing dense (router-less) layers; None where every
            layer must be MoE.
        first_k_dense: ``dense_layers`` is a count of leading dense layers (DeepSeek
            ``first_k_dense_replace``), not a list.
        router: HF's score function: ``softmax`` (top-k of softmax or softmax of top-k), or
            ``sigmoid`` (DeepSeek: sigmoid scores, an expert bias that only picks the experts,
            group-limited choice, a routed scaling factor).
        attention: renames of ``self_attention.X.weight`` to ``self_attn.Y.weight`` that replace
            the fused-QKV rules (MLA; a derived config then gets the MLA ranks and head dims).
        router_bias: HF name (under ``{moe}.gate.``) of ``mlp.router.expert_bias``.
    """

    architecture: str
    model_type: str
    q_norm: tuple[str, str] = ("q_norm", "k_norm")
    moe: str | None = None
    experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared: str | None = None
    shared_gate: str | None = None
    moe_config: tuple[str, str] | None = None
    norm_topk: str | None = "norm_topk_prob"
    shared_config: str | None = None
    shared_count: bool = False
    dense_layers: str | None = "mlp_only_layers"
    first_k_dense: bool = False
    router: str = "softmax"
    attention: tuple[tuple[str, str], ...] = ()
    router_bias: str | None = None


#: Multi-latent attention (DeepSeek-V2/V3): direct copies, no rope permutation (megatron-core
#: de-interleaves the rope dims itself, as HF ``rope_interleave=True`` does)
_MLA = (
    ("linear_q_down_proj", "q_a_proj"),
    ("q_layernorm", "q_a_layernorm"),
    ("linear_q_up_proj", "q_b_proj"),
    ("linear_q_proj", "q_proj"),
    ("linear_kv_down_proj", "kv_a_proj_with_mqa"),
    ("kv_layernorm", "kv_a_layernorm"),
    ("linear_kv_up_proj", "kv_b_proj"),
)

ARCHS: dict[str, Arch] = {
    "llama": Arch("LlamaForCausalLM", "llama"),
    "mistral": Arch("MistralForCausalLM", "mistral"),
    "qwen2": Arch("Qwen2ForCausalLM", "qwen2"),
    "qwen3": Arch("Qwen3ForCausalLM", "qwen3"),
    "mixtral": Arch(
        "MixtralForCausalLM",
        "mixtral",
        moe="block_sparse_moe",
        experts=("w1", "w3", "w2"),
        moe_config=("num_local_experts", "intermediate_size"),
        norm_topk=None,
        dense_layers=None,
    ),
    "qwen2_moe": Arch(
        "Qwen2MoeForCausalLM",
        "qwen2_moe",
        moe="mlp",
        shared="mlp.shared_expert",
        shared_gate="mlp.shared_expert_gate",
        moe_config=("num_experts", "moe_intermediate_size"),
        shared_config="shared_expert_intermediate_size",
    ),
    "qwen3_moe": Arch(
        "Qwen3MoeForCausalLM",
        "qwen3_moe",
        moe="mlp",
        moe_config=("num_experts", "moe_intermediate_size"),
    ),
    "deepseek_v3": Arch(
        "DeepseekV3ForCausalLM",
        "deepseek_v3",
        moe="mlp",
        shared="mlp.shared_experts",
        moe_config=("n_routed_experts", "moe_intermediate_size"),
        shared_config="n_shared_experts",
        shared_count=True,
        dense_layers="first_k_dense_replace",
        first_k_dense=True,
        router="sigmoid",
        attention=_MLA,
        router_bias="e_score_correction_bias",
    ),
}


# --------------------------------------------------------------------------------------------
# detection


def is_legacy_dir(path: Path) -> bool:
    """True for an ``iter_NNNNNNN``/``release`` folder holding ``mp_rank_*`` directories."""
    if not path.is_dir():
        return False
    try:
        return any(_MP_RANK.match(n) and (path / n).is_dir() for n in os.listdir(path))
    except OSError:
        return False


def is_dist_dir(path: Path) -> bool:
    """True for a Megatron ``torch_dist`` folder (``metadata.json`` beside a DCP ``.metadata``)."""
    meta = path / "metadata.json"
    if not (path.is_dir() and meta.is_file()):
        return False
    try:
        backend = json.loads(meta.read_text()).get("sharded_backend")
    except (OSError, ValueError, AttributeError):
        return False
    return backend in ("torch_dist", "torch")


def _tracker_dir(path: Path) -> Path:
    """A save root with a tracker file -> the iteration folder it names."""
    tracker = path / TRACKER
    if not tracker.is_file() or is_legacy_dir(path) or is_dist_dir(path):
        return path
    text = tracker.read_text().strip()
    if text == "release":
        return path / "release"
    try:
        return path / f"iter_{int(text):07d}"
    except ValueError:
        raise FormatError(
            f"{tracker}: expected an iteration number or 'release', got {text!r}"
        ) from None


# --------------------------------------------------------------------------------------------
# pickles


class _MegatronUnpickler(StubbingUnpickler):
    """The state-dict unpickler, plus ``signal.Signals`` (``args.exit_signal``) as a stub."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "signal" and name in ("Signals", "Handlers", "Sigmasks"):
            return super().find_class("megatron_stub.signal", name)
        return super().find_class(module, name)


def _unpickle(data: bytes, source: str) -> Any:
    try:
        return _MegatronUnpickler(io.BytesIO(data), source=source).load()
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError(f"{source}: cannot read pickle ({type(exc).__name__}: {exc})") from None


@dataclass
class _File:
    path: Path
    obj: Any
    storages: dict[str, tuple[int, int]]


def _load_zip(path: Path, offset: int = 0, length: int | None = None) -> _File:
    try:
        fd = open_fd(str(path))
    except FileNotFoundError:
        raise FormatError(f"{path}: missing file") from None
    try:
        size = os.fstat(fd).st_size if length is None else length
        archive = TorchZip(str(path), fd, offset, size)
        pkl = archive.entries[archive.prefix + "data.pkl"]
        if pkl.size > MAX_PICKLE_BYTES:
            raise FormatError(f"{path}: data.pkl is implausibly large ({pkl.size} bytes)")
        obj = _unpickle(archive.read(pkl), str(path))
        storages = {
            name[len(archive.prefix) + 5 :]: (e.data_offset, e.size)
            for name, e in archive.entries.items()
            if name.startswith(archive.prefix + "data/")
        }
        return _File(path, obj, storages)
    finally:
        os.close(fd)


class Args:
    """Read-only view of a pickled ``argparse.Namespace`` (a stub), with defaults."""

    def __init__(self, obj: Any, source: str) -> None:
        fields = getattr(obj, "__dict__", None)
        if not isinstance(obj, Stub) or not isinstance(fields, dict):
            raise FormatError(f"{source}: 'args' is not an argparse.Namespace")
        self.fields = fields
        self.source = source

    def get(self, name: str, default: Any = None) -> Any:
        value = self.fields.get(name, default)
        return default if value is None else value

    def int(self, name: str, default: int) -> int:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise FormatError(f"{self.source}: args.{name} = {value!r}, expected an integer")
        return value


# --------------------------------------------------------------------------------------------
# canonical tensors


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
_ROUTER = "mlp.router.weight"


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


# --------------------------------------------------------------------------------------------
# legacy


@dataclass
class _Layout:
    tp: int
    pp: int
    ep: int
    etp: int
    vp: int | None


def _layout(args: Args) -> _Layout:
    tp = args.int("tensor_model_parallel_size", args.int("model_parallel_size", 1))
    vp_raw = args.get("virtual_pipeline_model_parallel_size")
    return _Layout(
        tp=tp,
        pp=args.int("pipeline_model_parallel_size", 1),
        ep=args.int("expert_model_parallel_size", 1),
        etp=args.int("expert_tensor_parallel_size", tp),
        vp=int(vp_raw) if vp_raw else None,
    )


def _writers(lay: _Layout) -> list[tuple[int, int]]:
    """The ``(tp, ep)`` rank directories a legacy save writes in each pipeline stage.

    Megatron-LM saves from the ranks whose expert-data-parallel rank is 0: with the default rank
    order (``tp-cp-ep-dp-pp``, CP=1) those are the in-stage ranks ``r < ETP·EP``, and rank ``r``
    writes ``mp_rank_{r % TP}_{(r // ETP) % EP}`` (``shared/formats/megatron.md`` §3.8). With
    ETP = TP that is every ``(tp, ep)`` pair; with ETP=1, TP=2, EP=2 only ``(0, 0)`` and ``(1, 1)``.
    """
    if lay.ep == 1:
        return [(tp, 0) for tp in range(lay.tp)]
    pairs = [(r % lay.tp, (r // lay.etp) % lay.ep) for r in range(lay.etp * lay.ep)]
    return sorted(set(pairs))


def _rank_dirs(directory: Path, lay: _Layout) -> dict[tuple[int, int, int], Path]:
    """``(tp, pp, ep)`` -> rank file, checked against the layout ``args`` declares."""
    if lay.ep > 1 and lay.tp % lay.etp:
        raise FormatError(
            f"{directory}: args say expert TP={lay.etp}, which does not divide TP={lay.tp}: a "
            "legacy save then writes several expert-TP ranks to one mp_rank file (not readable; "
            "use torch_dist)"
        )
    found: dict[tuple[int, int, int], Path] = {}
    for name in sorted(os.listdir(directory)):
        m = _MP_RANK.match(name)
        if not m or not (directory / name).is_dir():
            continue
        tp, a, b = int(m.group(1)), m.group(2), m.group(3)
        if b is not None:
            pp, ep = int(a), int(b)
        elif a is not None:
            pp, ep = (int(a), 0) if lay.pp > 1 else (0, int(a))
            if lay.pp == 1 and lay.ep == 1:
                raise FormatError(
                    f"{directory / name}: a pipeline or expert rank suffix, but args say "
                    "PP=1 and EP=1 (args disagree with the files)"
                )
        else:
            pp, ep = 0, 0
            if lay.pp > 1 or lay.ep > 1:
                raise FormatError(
                    f"{directory / name}: no rank suffix, but args say PP={lay.pp}, EP={lay.ep} "
                    "(args disagree with the files)"
                )
        if tp >= lay.tp or pp >= lay.pp or ep >= lay.ep:
            raise FormatError(
                f"{directory / name}: outside TP={lay.tp}, PP={lay.pp}, EP={lay.ep} from args "
                "(args disagree with the files)"
            )
        found[(tp, pp, ep)] = directory / name / RANK_FILE
    for tp, ep in _writers(lay):
        for pp in range(lay.pp):
            if (tp, pp, ep) not in found:
                name = f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if lay.pp > 1 else "")
                name += f"_{ep:03d}" if lay.ep > 1 else ""
                etp = f", ETP={lay.etp}" if lay.etp != lay.tp else ""
                raise FormatError(
                    f"{directory / name}: missing rank directory (args say TP={lay.tp}, "
                    f"PP={lay.pp}, EP={lay.ep}{etp})"
                )
    for path in found.values():
        if not path.is_file():
            raise FormatError(f"{path}: missing rank file")
    return found


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

    # layer offsets: chunks in (virtual stage, pipeline rank) order, counted on tp=0, ep=0
    chunks_per_file = {k: _model_chunks(f, lay.vp) for k, f in loaded.items()}
    offsets: dict[tuple[int, int], int] = {}
    total = 0
    for v in range(lay.vp or 1):
        for pp in range(lay.pp):
            ref_key = min(k for k in loaded if k[1] == pp)
            offsets[(v, pp)] = total
            total += len(_layers_of(chunks_per_file[ref_key][v]))
    declared = args.int("num_layers", total)
    if declared != total:
        raise FormatError(
            f"{directory}: args say {declared} layers, the rank files hold {total} "
            "(args disagree with the files)"
        )

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
                m = _LAYER.match(name)
                if not m:
                    items = [(name, ref, False)]
                else:
                    layer = int(m.group(1)) + offsets[(v, pp)]
                    rest = m.group(2)
                    g = _GROUPED_EXPERT.match(rest)
                    if g:
                        rest = f"mlp.experts.local_experts.{g.group(3)}.{g.group(1)}.{g.group(2)}"
                    lg = _LEGACY_GROUPED.match(rest)
                    parts = (
                        _grouped_mlp(ref, lg.group(1), e_local, hidden, str(f.path), key)
                        if lg
                        else [(rest, ref)]
                    )
                    items = []
                    for rest, part in parts:
                        e = _LOCAL_EXPERT.match(rest)
                        if e:
                            if not e_local:
                                raise FormatError(
                                    f"{f.path}: expert {key!r} but args say no experts"
                                )
                            rest = f"mlp.experts.local_experts.{ep * e_local + int(e.group(1))}."
                            rest += e.group(2)
                        items.append((f"decoder.layers.{layer}.{rest}", part, bool(e)))
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


# --------------------------------------------------------------------------------------------
# torch_dist


def _dist_args(directory: Path) -> Args:
    common = directory / "common.pt"
    if common.is_file():
        f = _load_zip(common)
        obj = f.obj
        source = str(common)
    else:  # megatron-core >= 0.19: BYTE_IO item common_state/shard_0_1 = torch.save([common])
        md = load_metadata(directory)
        info = None
        for idx, value in (md.storage_data or {}).items():
            if isinstance(idx, MetadataIndex) and idx.fqn == "common_state/shard_0_1":
                info = value
        if info is None:
            raise FormatError(f"{directory}: neither common.pt nor a common_state item (no args)")
        where = f"{directory / '.metadata'}: entry common_state/shard_0_1"
        path = item_path(directory, info.relative_path, where=where)
        f = _load_zip(path, int(info.offset), int(info.length))
        obj = f.obj[0] if isinstance(f.obj, list) and f.obj else f.obj
        source = f"{path} (common_state)"
    if not isinstance(obj, dict) or "args" not in obj:
        raise FormatError(f"{source}: no 'args' in the common state (Megatron-Bridge save?)")
    version = obj.get("checkpoint_version", 3.0)
    if isinstance(version, int | float) and version < 3:
        raise FormatError(f"{source}: checkpoint_version {version} < 3.0 is not supported")
    return Args(obj["args"], source)


def _explode(c: Chunk, axes: int) -> list[tuple[tuple[int, ...], Chunk]]:
    """Split a box along its ``axes`` leading (stacked) axes: ``(indices, box)`` pairs."""
    out: list[tuple[tuple[int, ...], Chunk]] = [((), c)]
    for _ in range(axes):
        nxt = []
        for idx, b in out:
            for k in range(b.sizes[0]):
                nxt.append(
                    (
                        (*idx, b.offsets[0] + k),
                        b._replace(
                            storage_offset=b.storage_offset + k * b.strides[0],
                            strides=tuple(b.strides[1:]),
                            offsets=b.offsets[1:],
                            sizes=b.sizes[1:],
                        ),
                    )
                )
        out = nxt
    return out


_SKIP_DIST = ("optimizer.", "rng_state", "common_state")


def _read_dist(directory: Path) -> tuple[Args, dict[str, Canon], list[str]]:
    args = _dist_args(directory)
    cat = read_dcp(directory)
    keys = [
        m
        for m in cat.tensors.values()
        if not m.key.startswith(_SKIP_DIST) and "_extra_state" not in m.key
    ]
    entries = cat.reader.locate(keys)
    canon: dict[str, Canon] = {}

    def add(name: str, dtype: str, shape: tuple[int, ...], chunk: Chunk, key: str) -> None:
        cname = _canonical(name)
        if cname is None:
            return
        got = canon.get(cname)
        if got is None:
            got = canon[cname] = Canon(cname, dtype, shape, [], f"{directory} ({key})")
        got.chunks.append(chunk)

    for entry in entries:
        key, shape, dtype = entry.meta.key, entry.meta.shape, entry.meta.dtype
        m = _LAYER.match(key)
        if key.startswith("decoder.layers.") and not m:
            rest = key[len("decoder.layers.") :]
            if rest.startswith("mlp.experts.experts."):
                tail = rest[len("mlp.experts.experts.") :]
                for (layer, e), c in (x for ch in entry.chunks for x in _explode(ch, 2)):
                    name = f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{tail}"
                    add(name, dtype, shape[2:], c, key)
            else:
                for (layer,), c in (x for ch in entry.chunks for x in _explode(ch, 1)):
                    add(f"decoder.layers.{layer}.{rest}", dtype, shape[1:], c, key)
        elif m and m.group(2).startswith("mlp.experts.experts."):
            tail = m.group(2)[len("mlp.experts.experts.") :]
            for (e,), c in (x for ch in entry.chunks for x in _explode(ch, 1)):
                name = f"decoder.layers.{m.group(1)}.mlp.experts.local_experts.{e}.{tail}"
                add(name, dtype, shape[1:], c, key)
        else:
            for c in entry.chunks:
                add(key, dtype, shape, c, key)
    notes = [f"Megatron torch_dist checkpoint ({len(entries)} sharded tensors)"]
    return args, canon, notes


# --------------------------------------------------------------------------------------------
# mapping to Hugging Face


@dataclass
class _Dims:
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int  # rows the HF tensors get
    tied: bool


def _dims(args: Args, config: dict[str, Any] | None, canon: dict[str, Canon]) -> _Dims:
    heads = args.int("num_attention_heads", 0)
    hidden = args.int("hidden_size", 0)
    if not heads or not hidden:
        raise FormatError(f"{args.source}: args lack num_attention_heads / hidden_size")
    groups = args.int("num_query_groups", heads) if args.get("group_query_attention") else heads
    head_dim = args.int("kv_channels", hidden // heads)
    padded = args.int("padded_vocab_size", 0)
    emb = canon.get("embedding.word_embeddings.weight")
    if emb is not None and padded and emb.shape[0] != padded:
        raise ShapeError(
            f"{emb.source}: embedding has {emb.shape[0]} rows, args.padded_vocab_size is {padded} "
            "(args disagree with the files)"
        )
    stored = emb.shape[0] if emb is not None else padded
    vocab = stored
    if config and isinstance(config.get("vocab_size"), int):
        vocab = int(config["vocab_size"])
    elif args.get("vocab_size"):
        vocab = args.int("vocab_size", stored)
    tied = not bool(args.get("untie_embeddings_and_output_weights", False))
    if config is not None and "tie_word_embeddings" in config:
        tied = bool(config["tie_word_embeddings"])
    return _Dims(heads, groups, head_dim, args.int("ffn_hidden_size", 0), vocab, tied)


def detect_arch(args: Args, config: dict[str, Any] | None) -> str:
    """The architecture key of :data:`ARCHS`: from the HF config, else from ``args``."""
    if config:
        model_type = config.get("model_type")
        if isinstance(model_type, str) and model_type in ARCHS:
            return model_type
        for name in config.get("architectures") or []:
            for key, arch in ARCHS.items():
                if arch.architecture == name:
                    return key
    experts = args.int("num_experts", 0) or args.int("num_moe_experts", 0)
    qk_norm = bool(args.get("qk_layernorm", False))
    if args.get("multi_latent_attention", False):
        return "deepseek_v3"
    if experts:
        if args.get("moe_shared_expert_intermediate_size") or args.get("add_qkv_bias", False):
            return "qwen2_moe"
        return "qwen3_moe" if qk_norm else "mixtral"
    if qk_norm:
        return "qwen3"
    if args.get("add_qkv_bias", False):
        return "qwen2"
    return "llama"


@dataclass
class _Out:
    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: list[Chunk]
    key: str


def _map(canon: dict[str, Canon], arch: Arch, d: _Dims, source: str) -> list[_Out]:
    out: list[_Out] = []
    used: set[str] = set()

    def put(hf: str, c: Canon, shape: tuple[int, ...], chunks: list[Chunk]) -> None:
        out.append(_Out(hf, c.dtype, shape, chunks, c.name))
        used.add(c.name)

    def copy(hf: str, c: Canon) -> None:
        put(hf, c, c.shape, list(c.chunks))

    def vocab(hf: str, c: Canon) -> None:
        if d.vocab > c.shape[0]:
            raise MappingError(
                f"{c.source}: {c.name!r} has {c.shape[0]} rows but config.vocab_size is "
                f"{d.vocab}; zero-padding is not supported (set vocab_size to {c.shape[0]})"
            )
        put(hf, c, (d.vocab, *c.shape[1:]), _rows(c.chunks, 0, d.vocab, 0))

    def qkv(prefix: str, suffix: str, c: Canon) -> None:
        qpg, hd, ng = d.heads // d.groups, d.head_dim, d.groups
        if c.shape[0] != ng * (qpg + 2) * hd:
            raise ShapeError(
                f"{c.source}: {c.name!r} has {c.shape[0]} rows, expected {ng}·({qpg}+2)·{hd} "
                "(heads, query groups, kv_channels from args)"
            )
        rest = c.shape[1:]
        q, k, v = [], [], []
        for g in range(ng):
            base = g * (qpg + 2) * hd
            q += _rows(c.chunks, base, base + qpg * hd, g * qpg * hd)
            k += _rows(c.chunks, base + qpg * hd, base + (qpg + 1) * hd, g * hd)
            v += _rows(c.chunks, base + (qpg + 1) * hd, base + (qpg + 2) * hd, g * hd)
        put(f"{prefix}q_proj.{suffix}", c, (ng * qpg * hd, *rest), q)
        put(f"{prefix}k_proj.{suffix}", c, (ng * hd, *rest), k)
        put(f"{prefix}v_proj.{suffix}", c, (ng * hd, *rest), v)

    def glu(gate: str, up: str, c: Canon) -> None:
        if c.shape[0] % 2:
            raise ShapeError(f"{c.source}: gated {c.name!r} has an odd row count {c.shape[0]}")
        f = c.shape[0] // 2
        put(gate, c, (f, *c.shape[1:]), _rows(c.chunks, 0, f, 0))
        put(up, c, (f, *c.shape[1:]), _rows(c.chunks, f, 2 * f, 0))

    ge, ue, de = arch.experts
    layer_rules: dict[str, Callable[[str, Canon], None]] = {
        "input_layernorm.weight": lambda p, c: copy(p + "input_layernorm.weight", c),
        "pre_mlp_layernorm.weight": lambda p, c: copy(p + "post_attention_layernorm.weight", c),
        "self_attention.linear_qkv.weight": lambda p, c: qkv(p + "self_attn.", "weight", c),
        "self_attention.linear_qkv.bias": lambda p, c: qkv(p + "self_attn.", "bias", c),
        "self_attention.q_layernorm.weight": lambda p, c: copy(
            f"{p}self_attn.{arch.q_norm[0]}.weight", c
        ),
        "self_attention.k_layernorm.weight": lambda p, c: copy(
            f"{p}self_attn.{arch.q_norm[1]}.weight", c
        ),
        "self_attention.linear_proj.weight": lambda p, c: copy(p + "self_attn.o_proj.weight", c),
        "mlp.linear_fc1.weight": lambda p, c: glu(
            p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", c
        ),
        "mlp.linear_fc2.weight": lambda p, c: copy(p + "mlp.down_proj.weight", c),
    }
    if arch.moe is not None:
        layer_rules["mlp.router.weight"] = lambda p, c: copy(f"{p}{arch.moe}.gate.weight", c)
    if arch.shared is not None:
        sh = arch.shared
        layer_rules["mlp.shared_experts.linear_fc1.weight"] = lambda p, c: glu(
            f"{p}{sh}.gate_proj.weight", f"{p}{sh}.up_proj.weight", c
        )
        layer_rules["mlp.shared_experts.linear_fc2.weight"] = lambda p, c: copy(
            f"{p}{sh}.down_proj.weight", c
        )
    if arch.router_bias is not None:
        rb = f"{arch.moe}.gate.{arch.router_bias}"
        layer_rules["mlp.router.expert_bias"] = lambda p, c: copy(p + rb, c)

    def rename(hf: str) -> Callable[[str, Canon], None]:
        return lambda p, c: copy(f"{p}self_attn.{hf}.weight", c)

    for meg, hf in arch.attention:
        layer_rules[f"self_attention.{meg}.weight"] = rename(hf)
    if arch.shared_gate is not None:
        sg = arch.shared_gate
        layer_rules["mlp.shared_experts.gate_weight"] = lambda p, c: copy(f"{p}{sg}.weight", c)
    for name, c in canon.items():
        if name == "embedding.word_embeddings.weight":
            vocab("model.embed_tokens.weight", c)
        elif name == "output_layer.weight":
            if d.tied:
                used.add(name)  # the duplicate head a tied PP>1 save keeps
            else:
                vocab("lm_head.weight", c)
        elif name == "decoder.final_layernorm.weight":
            copy("model.norm.weight", c)
        elif m := _LAYER.match(name):
            prefix, rest = f"model.layers.{m.group(1)}.", m.group(2)
            e = _LOCAL_EXPERT.match(rest)
            if e and arch.moe and e.group(2) in ("linear_fc1.weight", "linear_fc2.weight"):
                ep = f"{prefix}{arch.moe}.experts.{e.group(1)}."
                if e.group(2) == "linear_fc1.weight":
                    glu(f"{ep}{ge}.weight", f"{ep}{ue}.weight", c)
                else:
                    copy(f"{ep}{de}.weight", c)
            elif rest in layer_rules:
                layer_rules[rest](prefix, c)
    unknown = [n for n in canon if n not in used]
    if unknown:
        shown = ", ".join(unknown[:12]) + (
            f" (+{len(unknown) - 12} more)" if len(unknown) > 12 else ""
        )
        raise MappingError(
            f"{source}: no Hugging Face name for {len(unknown)} Megatron tensor(s) with "
            f"arch {arch.model_type!r}: {shown}"
        )
    if (
        not d.tied
        and "output_layer.weight" not in canon
        and "embedding.word_embeddings.weight" in canon
    ):
        raise MappingError(f"{source}: untied embeddings, but no output_layer.weight was saved")
    return out


def _moe_fields(args: Args, arch_key: str, moe_layers: list[int]) -> dict[str, Any]:
    """The MoE part of a derived ``config.json``; refuses routing HF cannot express."""
    arch = ARCHS[arch_key]
    experts = args.int("num_experts", 0) or args.int("num_moe_experts", 0)
    if arch.moe_config is None:
        raise MappingError(
            f"{args.source}: args say {experts} experts but arch {arch_key!r} is dense; pass "
            "--arch (mixtral, qwen2_moe, qwen3_moe, deepseek_v3) or --config-from DIR"
        )
    layers = args.int("num_layers", 0)
    dense = [i for i in range(layers) if i not in set(moe_layers)]
    pre_softmax = bool(args.get("moe_router_pre_softmax", False))
    shared = args.int("moe_shared_expert_intermediate_size", 0)
    ffn = args.int("moe_ffn_hidden_size", args.int("ffn_hidden_size", 0))
    topk = args.int("moe_router_topk", 2)
    score = args.get("moe_router_score_function", "softmax")
    scale = args.get("moe_router_topk_scaling_factor")
    fields: dict[str, Any] = {}
    problems = []
    if arch.router == "softmax":
        if score != "softmax":
            problems.append(f"moe_router_score_function={score!r}")
        if scale is not None and float(scale) != 1.0:
            problems.append(f"moe_router_topk_scaling_factor={scale!r}")
        for flag in ("moe_router_enable_expert_bias", "moe_router_num_groups"):
            if args.get(flag):
                problems.append(f"{flag}={args.get(flag)!r}")
        if arch.norm_topk is None and pre_softmax:
            problems.append("moe_router_pre_softmax=True (HF renormalises the top-k weights)")
        if arch.norm_topk is not None:
            fields[arch.norm_topk] = not pre_softmax
    else:  # sigmoid (DeepSeek); moe_router_pre_softmax does not matter there
        problems += _sigmoid_problems(args, experts, topk, score, fields)
        fields["routed_scaling_factor"] = float(scale) if scale else 1.0
        if arch.norm_topk is not None:  # Megatron's sigmoid path renormalises unless k == 1
            fields[arch.norm_topk] = topk > 1
    if arch.shared_config is None and shared:
        problems.append(f"a shared expert (moe_shared_expert_intermediate_size={shared})")
    gated = bool(args.get("moe_shared_expert_gate"))
    if arch.shared_config is not None and arch.shared_gate is not None and not (shared and gated):
        problems.append("no gated shared expert (HF always has one)")
    if arch.shared_config is not None and arch.shared_gate is None:
        if not shared:
            problems.append("moe_shared_expert_intermediate_size unset (HF always has one)")
        elif gated:
            problems.append("moe_shared_expert_gate=True (HF has no shared-expert gate)")
        elif arch.shared_count and (not ffn or shared % ffn):
            problems.append(
                f"moe_shared_expert_intermediate_size={shared} is not a multiple of "
                f"moe_ffn_hidden_size={ffn}"
            )
    if dense and arch.dense_layers is None:
        problems.append(f"dense layers {dense}")
    if arch.first_k_dense and dense != list(range(len(dense))):
        problems.append(
            f"dense layers {dense} (moe_layer_freq={args.get('moe_layer_freq')!r}; HF makes only "
            "the first k layers dense)"
        )
    if problems:
        raise MappingError(
            f"{args.source}: cannot derive a {arch.architecture} config.json: "
            f"{'; '.join(problems)} (no equivalent there); pass --config-from DIR"
        )
    count_key, ffn_key = arch.moe_config
    fields.update({count_key: experts, "num_experts_per_tok": topk, ffn_key: ffn})
    if arch.dense_layers is not None and arch.first_k_dense:
        fields[arch.dense_layers] = len(dense)
    elif arch.dense_layers is not None:
        fields["decoder_sparse_step"] = 1
        fields[arch.dense_layers] = dense
    if arch.shared_config is not None:
        fields[arch.shared_config] = shared // ffn if arch.shared_count else shared
    return fields


def _sigmoid_problems(
    args: Args, experts: int, topk: int, score: object, fields: dict[str, Any]
) -> list[str]:
    """DeepSeek routing: what HF cannot express; sets ``n_group`` / ``topk_group``."""
    problems = []
    if score != "sigmoid":
        problems.append(f"moe_router_score_function={score!r} (HF routes by sigmoid)")
    if not args.get("moe_router_enable_expert_bias"):
        problems.append(
            "moe_router_enable_expert_bias unset (HF always adds e_score_correction_bias)"
        )
    groups = args.int("moe_router_num_groups", 0)
    group_topk = args.int("moe_router_group_topk", 0)
    fields["n_group"], fields["topk_group"] = 1, 1  # Megatron: no group limit without group_topk
    if group_topk:
        # Megatron ranks a group by the sum of its top (topk // group_topk) scores, HF by its top 2
        if not groups or experts % groups:
            problems.append(f"moe_router_num_groups={groups!r} with {experts} experts")
        elif topk // group_topk != 2 or experts // groups < 2:
            problems.append(
                f"moe_router_group_topk={group_topk} with moe_router_topk={topk} (Megatron ranks "
                f"groups by their top {topk // group_topk} scores, HF by their top 2)"
            )
        fields["n_group"], fields["topk_group"] = groups, group_topk
    return problems


def _yarn_mscale(scale: float, mscale: float) -> float:
    """megatron-core's ``_yarn_get_mscale`` (and HF's ``get_mscale``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _mla_fields(args: Args, d: _Dims) -> dict[str, Any]:
    """The MLA part of a derived DeepSeek-V3 ``config.json``; refuses what HF cannot express."""
    need = ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
    missing = [k for k in need if not args.int(k, 0)]
    if missing:
        raise MappingError(f"{args.source}: MLA args lack {', '.join(missing)}")
    problems = []
    eps = float(args.get("layernorm_epsilon", args.get("norm_epsilon", 1e-5)))
    if not args.get("qk_layernorm"):
        problems.append("qk_layernorm unset (HF always norms the q / kv latents)")
    elif eps != 1e-6:
        problems.append(f"layernorm_epsilon={eps!r} (HF's q_a / kv_a_layernorm always use 1e-6)")
    percent = float(args.get("rotary_percent", 1.0) or 1.0)
    if percent != 1.0:
        problems.append(f"rotary_percent={percent!r}")
    if args.get("rotary_interleaved"):
        problems.append("rotary_interleaved=True")
    rope_type = args.get("rope_type") or "yarn"  # Megatron-LM: MLA takes yarn when unset
    if rope_type not in ("rope", "yarn"):
        problems.append(f"rope_type={rope_type!r}")
    if problems:
        raise MappingError(
            f"{args.source}: cannot derive a DeepseekV3ForCausalLM config.json: "
            f"{'; '.join(problems)} (no equivalent there); pass --config-from DIR"
        )
    q_lora = args.get("q_lora_rank")
    fields: dict[str, Any] = {
        "num_key_value_heads": d.heads,
        "head_dim": args.int("qk_pos_emb_head_dim", 0),  # as HF's config sets it
        "q_lora_rank": int(q_lora) if q_lora else None,  # None: linear_q_proj
        "kv_lora_rank": args.int("kv_lora_rank", 0),
        "qk_nope_head_dim": args.int("qk_head_dim", 0),
        "qk_rope_head_dim": args.int("qk_pos_emb_head_dim", 0),
        "v_head_dim": args.int("v_head_dim", 0),
        "rope_interleave": True,  # megatron-core de-interleaves the rope dims itself
        "num_nextn_predict_layers": 0,  # MTP layers are not mapped (refused as unknown names)
    }
    factor = float(args.get("rotary_scaling_factor") or 1.0)
    if rope_type == "yarn" and factor > 1.0:  # factor 1: YaRN is plain rope
        mscale = float(args.get("mscale", 1.0))
        all_dim = float(args.get("mscale_all_dim", 0.0))
        original = args.get("original_max_position_embeddings") or args.get(
            "yarn_original_max_position_embeddings", 4096
        )
        fields["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": int(original),
            "beta_fast": float(args.get("beta_fast", args.get("yarn_beta_fast", 32.0))),
            "beta_slow": float(args.get("beta_slow", args.get("yarn_beta_slow", 1.0))),
            "mscale": mscale,
            "mscale_all_dim": all_dim,
            # megatron-core's cos/sin factor (HF infers it from both mscales only when both set)
            "attention_factor": _yarn_mscale(factor, mscale) / _yarn_mscale(factor, all_dim),
        }
    return fields


def derive_config(
    args: Args, arch_key: str, d: _Dims, dtype: str, moe_layers: list[int] | None = None
) -> dict[str, Any]:
    """A ``config.json`` from ``args`` (when no HF config was given).

    Args:
        args: the pickled Megatron ``args``.
        arch_key: a key of :data:`ARCHS`.
        d: the attention / vocabulary dimensions.
        dtype: the safetensors dtype of the embedding.
        moe_layers: the global layers that hold a router (MoE families).
    """
    arch = ARCHS[arch_key]
    experts = args.get("num_experts") or args.get("num_moe_experts")
    if arch.moe_config is not None and not experts:
        raise MappingError(
            f"{args.source}: arch {arch_key!r} is a MoE family but args say no experts; pass "
            "--arch or --config-from DIR"
        )
    eps = args.get("layernorm_epsilon", args.get("norm_epsilon", 1e-5))
    cfg: dict[str, Any] = {
        "architectures": [arch.architecture],
        "model_type": arch.model_type,
        "hidden_size": args.int("hidden_size", 0),
        "intermediate_size": d.ffn,
        "num_hidden_layers": args.int("num_layers", 0),
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.groups,
        "head_dim": d.head_dim,
        "vocab_size": d.vocab,
        "max_position_embeddings": args.int(
            "max_position_embeddings", args.int("seq_length", 4096)
        ),
        "rms_norm_eps": float(eps),
        "rope_theta": float(args.get("rotary_base", 10000)),
        "hidden_act": "silu",
        "tie_word_embeddings": d.tied,
        "attention_bias": False,
        "torch_dtype": TORCH_DTYPE_NAMES.get(dtype, "float32"),
        "dtype": TORCH_DTYPE_NAMES.get(dtype, "float32"),
    }
    if arch_key in ("qwen2", "qwen2_moe", "mixtral"):
        del cfg["attention_bias"]  # Qwen2 always has q/k/v biases; Mixtral has none
    if arch.attention:
        cfg.update(_mla_fields(args, d))
    if experts:
        cfg.update(_moe_fields(args, arch_key, moe_layers or []))
    return cfg


# --------------------------------------------------------------------------------------------
# catalogue


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
