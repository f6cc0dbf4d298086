"""Megatron -> Hugging Face names: one :class:`Arch` table entry per architecture.

:func:`_map` turns the canonical tensors into HF tensors; every op (QKV split per query group,
gate/up split, vocab trim) is a row slice of boxes, so the Rust core copies straight from the
mapped rank files. A name no rule covers is refused (:class:`MappingError`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastckpt._core import MappingError, ShapeError
from fastckpt.catalog import Chunk
from fastckpt.formats.megatron.canon import _LAYER, _LOCAL_EXPERT, Canon, _rows

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
# mapping


@dataclass
class _Dims:
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int  # rows the HF tensors get
    tied: bool


@dataclass
class _Out:
    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: list[Chunk]
    key: str


#: a layer rule: (``model.layers.{i}.`` prefix, canonical tensor) -> HF tensors
_Rule = Callable[[str, Canon], None]


class _Mapper:
    """Collects the HF tensors made from canonical ones, and which canonical names were used.

    Every operation is a row slice of boxes: a copy, a vocabulary trim, the QKV split per query
    group, the gate / up split of a gated ``linear_fc1``.
    """

    def __init__(self, d: _Dims) -> None:
        self.d = d
        self.out: list[_Out] = []
        self.used: set[str] = set()

    def put(self, hf: str, c: Canon, shape: tuple[int, ...], chunks: list[Chunk]) -> None:
        self.out.append(_Out(hf, c.dtype, shape, chunks, c.name))
        self.used.add(c.name)

    def copy(self, hf: str, c: Canon) -> None:
        self.put(hf, c, c.shape, list(c.chunks))

    def vocab(self, hf: str, c: Canon) -> None:
        d = self.d
        if d.vocab > c.shape[0]:
            raise MappingError(
                f"{c.source}: {c.name!r} has {c.shape[0]} rows but config.vocab_size is "
                f"{d.vocab}; zero-padding is not supported (set vocab_size to {c.shape[0]})"
            )
        self.put(hf, c, (d.vocab, *c.shape[1:]), _rows(c.chunks, 0, d.vocab, 0))

    def qkv(self, prefix: str, suffix: str, c: Canon) -> None:
        d = self.d
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
        self.put(f"{prefix}q_proj.{suffix}", c, (ng * qpg * hd, *rest), q)
        self.put(f"{prefix}k_proj.{suffix}", c, (ng * hd, *rest), k)
        self.put(f"{prefix}v_proj.{suffix}", c, (ng * hd, *rest), v)

    def glu(self, gate: str, up: str, c: Canon) -> None:
        if c.shape[0] % 2:
            raise ShapeError(f"{c.source}: gated {c.name!r} has an odd row count {c.shape[0]}")
        f = c.shape[0] // 2
        self.put(gate, c, (f, *c.shape[1:]), _rows(c.chunks, 0, f, 0))
        self.put(up, c, (f, *c.shape[1:]), _rows(c.chunks, f, 2 * f, 0))


def _layer_rules(arch: Arch, mp: _Mapper) -> dict[str, _Rule]:
    """The rules for one layer's tensors (by name after ``decoder.layers.{i}.``), per family."""
    copy, glu, qkv = mp.copy, mp.glu, mp.qkv
    layer_rules: dict[str, _Rule] = {
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

    def rename(hf: str) -> _Rule:
        return lambda p, c: copy(f"{p}self_attn.{hf}.weight", c)

    for meg, hf in arch.attention:
        layer_rules[f"self_attention.{meg}.weight"] = rename(hf)
    if arch.shared_gate is not None:
        sg = arch.shared_gate
        layer_rules["mlp.shared_experts.gate_weight"] = lambda p, c: copy(f"{p}{sg}.weight", c)
    return layer_rules


def _map(canon: dict[str, Canon], arch: Arch, d: _Dims, source: str) -> list[_Out]:
    """Canonical Megatron tensors -> HF tensors; refuses names the family has no rule for."""
    mp = _Mapper(d)
    layer_rules = _layer_rules(arch, mp)
    ge, ue, de = arch.experts
    for name, c in canon.items():
        if name == "embedding.word_embeddings.weight":
            mp.vocab("model.embed_tokens.weight", c)
        elif name == "output_layer.weight":
            if d.tied:
                mp.used.add(name)  # the duplicate head a tied PP>1 save keeps
            else:
                mp.vocab("lm_head.weight", c)
        elif name == "decoder.final_layernorm.weight":
            mp.copy("model.norm.weight", c)
        elif m := _LAYER.match(name):
            prefix, rest = f"model.layers.{m.group(1)}.", m.group(2)
            e = _LOCAL_EXPERT.match(rest)
            if e and arch.moe and e.group(2) in ("linear_fc1.weight", "linear_fc2.weight"):
                ep = f"{prefix}{arch.moe}.experts.{e.group(1)}."
                if e.group(2) == "linear_fc1.weight":
                    mp.glu(f"{ep}{ge}.weight", f"{ep}{ue}.weight", c)
                else:
                    mp.copy(f"{ep}{de}.weight", c)
            elif rest in layer_rules:
                layer_rules[rest](prefix, c)
    unknown = [n for n in canon if n not in mp.used]
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
    return mp.out
