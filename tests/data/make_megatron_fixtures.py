"""Write real Megatron-Core checkpoints (legacy ``mp_rank_*`` and ``torch_dist``) of tiny HF models.

Run with a Python that has torch, transformers and megatron-core (``tests/data/megatron/
regenerate.py`` makes one from the pinned ``requirements.txt``; the output is committed as
``tests/data/megatron/fixtures.tar.xz``)::

    torchrun --nproc_per_node 4 tests/data/make_megatron_fixtures.py OUT_DIR

Recipe: ``shared/formats/megatron.md`` §5. Every rank builds the same tiny HF model (fixed seed),
builds a real ``GPTModel`` (local spec, CPU, gloo) for each parallel layout, loads the HF weights
into it through the inverse of the HF mapping, and saves it:

* ``legacy``: the model's real ``state_dict_for_save_checkpoint()`` in Megatron-LM's directory
  layout (``iter_0000010/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``, written by the ranks whose
  expert-DP rank is 0 as Megatron-LM's ``save_checkpoint`` does (with TP=2, ETP=1, EP=2 on 4 ranks
  only ``mp_rank_00_000`` and ``mp_rank_01_001``), with an
  ``args`` Namespace, ``checkpoint_version`` 3.0, the iteration and an RNG state, as
  ``megatron.training.checkpointing`` writes them; ``args`` is built here, not by ``parse_args``,
  because megatron-core ships without ``megatron.training``);
* ``dist``: ``megatron.core.dist_checkpointing.save`` of the model's ``sharded_state_dict()`` plus
  the common state (``common.pt``), as Megatron-LM's ``torch_dist`` format.

With PP == 1 Megatron's own forward is checked against the HF model's logits, which proves the
inverse mapping (and so the reference) right.

MoE (Mixtral, Qwen2-MoE with a gated shared expert, Qwen3-MoE): ``MoELayer`` with SequentialMLP
experts and the allgather token dispatcher (the alltoall one creates a ``torch.cuda.Stream``),
at EP=2, TP=2/ETP=1/EP=2, TP=2/EP=2 and PP=2/EP=2. Cases ending ``_gg`` use grouped GEMM
(``moe_grouped_gemm=True``), which with the local spec is the legacy ``GroupedMLP``
(``mlp.experts.weight1`` / ``weight2``, expert-major and transposed), at EP=2 and TP=2/ETP=2/EP=2;
TEGroupedMLP needs Transformer Engine and is not covered. Small patches make megatron-core save on
CPU/gloo: ``torch.cuda.synchronize`` is a no-op, ``torch.cuda.current_device`` returns ``"cpu"``,
``Tensor.cuda`` returns the tensor (tied embeddings with PP > 1), the CUDA RNG tracker's ``fork`` is
a null context, the ``te_general_gemm`` name MoE utils lack without TE is ``None``, and the
``TELinear`` / ``TEColumnParallelLinear`` mocks MLA checks with ``isinstance`` are empty classes.
For ``GroupedMLP`` (CPU shim of the CUDA-only ``grouped_gemm`` package): in
``megatron.core.transformer.moe.grouped_gemm_util`` the availability assert is a no-op and
``ops.gmm(a, b, batch_sizes, trans_b)`` is plain torch (the rows of ``a`` of expert ``e`` times
``b[e]``, or ``b[e].T``), and since its forward asserts ``config.bf16`` (only that assert reads it
there), fp32 ``GroupedMLP`` modules get a copy of the config with ``bf16=True``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import signal
import sys
import types
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

warnings.filterwarnings("ignore")

H, L, NH, NG, VOCAB, FFN = 64, 4, 8, 2, 250, 96
E, TOPK, FFN_MOE, FFN_SHARED = 4, 2, 32, 48  # MoE: experts, top-k, expert and shared-expert FFN
MLA = ("deepseek_v3", "deepseek_v3_noqlora")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", *MLA)
# DeepSeek-V3: 2 layers (the first dense), 4 heads, MLA ranks and head dims
DS_L, DS_NH, Q_LORA, KV_LORA, NOPE, ROPE, V_HD = 2, 4, 48, 32, 16, 8, 16

# (name, family, dtype, tied, tp, pp, vp[, ep, etp])
CASES: list[tuple] = [
    ("llama_fp32_tp2", "llama", "float32", False, 2, 1, None),
    ("llama_fp32_tp2pp2", "llama", "float32", False, 2, 2, None),
    ("llama_fp32_pp2vp2", "llama", "float32", False, 1, 2, 2),
    ("llama_tied_fp32_tp2", "llama", "float32", True, 2, 1, None),
    ("llama_tied_fp32_tp2pp2", "llama", "float32", True, 2, 2, None),
    ("qwen2_bf16_tp2", "qwen2", "bfloat16", False, 2, 1, None),
    ("qwen2_bf16_tp2pp2", "qwen2", "bfloat16", False, 2, 2, None),
    ("qwen3_fp32_tp2", "qwen3", "float32", False, 2, 1, None),
    ("qwen3_tied_bf16_pp2vp2", "qwen3", "bfloat16", True, 1, 2, 2),
    # MoE (local spec, SequentialMLP experts): EP=2 on 4 ranks (expert DP=2), and TP=2 with
    # ETP=1, EP=2, where only mp_rank_00_000 and mp_rank_01_001 exist
    ("mixtral_fp32_ep2", "mixtral", "float32", False, 1, 1, None, 2, 1),
    ("mixtral_bf16_tp2etp1ep2", "mixtral", "bfloat16", False, 2, 1, None, 2, 1),
    ("qwen2_moe_fp32_tp2etp1ep2", "qwen2_moe", "float32", False, 2, 1, None, 2, 1),
    ("qwen2_moe_bf16_ep2", "qwen2_moe", "bfloat16", False, 1, 1, None, 2, 1),
    ("qwen3_moe_fp32_tp2ep2", "qwen3_moe", "float32", False, 2, 1, None, 2, 2),
    ("qwen3_moe_fp32_tp2etp1ep2", "qwen3_moe", "float32", False, 2, 1, None, 2, 1),
    ("qwen3_moe_bf16_ep2", "qwen3_moe", "bfloat16", False, 1, 1, None, 2, 1),
    # PP=2 x EP=2: mp_rank_TT_PPP_EEE, stage-local layers and EP-local experts together
    ("qwen3_moe_fp32_pp2ep2", "qwen3_moe", "float32", False, 1, 2, None, 2, 1),
    # legacy GroupedMLP (moe_grouped_gemm=True, local spec): weight1 / weight2, expert-major and
    # transposed, at EP=2 (expert DP=2) and TP=2 x ETP=2 x EP=2
    ("qwen3_moe_fp32_ep2_gg", "qwen3_moe", "float32", False, 1, 1, None, 2, 1),
    ("qwen3_moe_fp32_tp2ep2_gg", "qwen3_moe", "float32", False, 2, 1, None, 2, 2),
    # DeepSeek-V3 (MLA, local spec: column-split down projections; layer 0 dense, layer 1 MoE with
    # sigmoid routing, expert bias and a shared expert), with and without q_lora_rank
    ("deepseek_v3_fp32_tp2ep2", "deepseek_v3", "float32", False, 2, 1, None, 2, 2),
    ("deepseek_v3_noqlora_fp32_tp2", "deepseek_v3_noqlora", "float32", False, 2, 1, None),
]


def patch_cuda() -> None:
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.fork = lambda *a, **k: contextlib.nullcontext()
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):  # 0.16.1 names it even without TE
        moe_utils.te_general_gemm = None
    from megatron.core.transformer import multi_latent_attention as mla

    for te_name in ("TELinear", "TEColumnParallelLinear"):  # MagicMocks without TE
        setattr(mla, te_name, type(f"No{te_name}", (), {}))
    from megatron.core.transformer.moe import grouped_gemm_util

    grouped_gemm_util.assert_grouped_gemm_is_available = lambda: None
    grouped_gemm_util.ops = types.SimpleNamespace(gmm=gmm)


def gmm(
    a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False
) -> torch.Tensor:
    """``grouped_gemm.ops.gmm`` in plain torch: rows of ``a`` per expert ``e`` times ``b[e]``."""
    parts = torch.split(a, [int(n) for n in batch_sizes.tolist()])
    return torch.cat([x @ (b[e].T if trans_b else b[e]) for e, x in enumerate(parts)])


def hf_model(family: str, dtype: torch.dtype, tied: bool):  # type: ignore[no-untyped-def]
    import transformers as tf

    common = dict(
        hidden_size=H,
        intermediate_size=FFN,
        num_hidden_layers=L,
        num_attention_heads=NH,
        num_key_value_heads=NG,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
    )
    if family == "llama":
        cfg = tf.LlamaConfig(**common, head_dim=H // NH)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=16)
    elif family == "mixtral":
        cfg = tf.MixtralConfig(
            **{**common, "intermediate_size": FFN_MOE},
            head_dim=H // NH,
            num_local_experts=E,
            num_experts_per_tok=TOPK,
        )
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(
            **common,
            num_experts=E,
            num_experts_per_tok=TOPK,
            moe_intermediate_size=FFN_MOE,
            shared_expert_intermediate_size=FFN_SHARED,
            norm_topk_prob=False,
        )
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            **common,
            head_dim=16,
            num_experts=E,
            num_experts_per_tok=TOPK,
            moe_intermediate_size=FFN_MOE,
            norm_topk_prob=True,
        )
    elif family in MLA:
        cfg = tf.DeepseekV3Config(
            # eps 1e-6 as DeepSeek's: HF's q_a/kv_a_layernorm ignore rms_norm_eps (fixed 1e-6),
            # Megatron's q/kv_layernorm use layernorm_epsilon
            **{
                **common,
                "num_hidden_layers": DS_L,
                "num_attention_heads": DS_NH,
                "num_key_value_heads": DS_NH,
                "rms_norm_eps": 1e-6,
            },
            n_routed_experts=E,
            n_shared_experts=1,
            num_experts_per_tok=TOPK,
            moe_intermediate_size=FFN_MOE,
            routed_scaling_factor=2.5,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            q_lora_rank=Q_LORA if family == "deepseek_v3" else None,
            kv_lora_rank=KV_LORA,
            qk_nope_head_dim=NOPE,
            qk_rope_head_dim=ROPE,
            v_head_dim=V_HD,
            rope_interleave=True,
        )
    else:
        raise ValueError(family)
    torch.manual_seed(1234)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.rand_like(p))  # non-trivial norms
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)  # DeepSeek-V3 expert bias: it changes which experts win
    model = model.to(dtype).eval()
    return model


def rope_theta(model) -> int:  # type: ignore[no-untyped-def]
    """transformers v5 keeps it in ``rope_parameters`` (Mixtral: 1e6)."""
    params = getattr(model.config, "rope_parameters", None) or {}
    return int(params.get("rope_theta") or getattr(model.config, "rope_theta", None) or 10000)


def head_dim(model) -> int:  # type: ignore[no-untyped-def]
    return int(getattr(model.config, "head_dim", None) or H // NH)


def padded_vocab(tp: int) -> int:
    div = 128 * tp
    return -(-VOCAB // div) * div


def megatron_global(model, family: str, pad_rows: torch.Tensor):  # type: ignore[no-untyped-def]
    """HF state dict -> Megatron canonical global tensors (fc1 kept as per-name [gate; up])."""
    sd = model.state_dict()
    hd = head_dim(model)
    qpg = NH // NG
    out = {}
    emb = sd["model.embed_tokens.weight"]
    out["embedding.word_embeddings.weight"] = torch.cat([emb, pad_rows.to(emb.dtype)])
    head = (
        sd["model.embed_tokens.weight"]
        if model.config.tie_word_embeddings
        else sd["lm_head.weight"]
    )
    out["output_layer.weight"] = torch.cat([head, pad_rows.to(emb.dtype)])
    out["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        m = f"decoder.layers.{i}."
        for meg, hf_name in _MLA_NAMES if family in MLA else ():
            if p + f"self_attn.{hf_name}.weight" in sd:
                out[m + f"self_attention.{meg}.weight"] = sd[p + f"self_attn.{hf_name}.weight"]
        for suffix in ("weight", "bias"):
            q = sd.get(p + f"self_attn.q_proj.{suffix}")
            if q is None or family in MLA:
                continue
            k = sd[p + f"self_attn.k_proj.{suffix}"]
            v = sd[p + f"self_attn.v_proj.{suffix}"]
            rest = q.shape[1:]
            qkv = torch.cat(
                [
                    q.reshape(NG, qpg * hd, *rest),
                    k.reshape(NG, hd, *rest),
                    v.reshape(NG, hd, *rest),
                ],
                dim=1,
            ).reshape(NG * (qpg + 2) * hd, *rest)
            out[m + f"self_attention.linear_qkv.{suffix}"] = qkv
        out[m + "self_attention.linear_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[m + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
        if family in ("qwen3", "qwen3_moe"):
            out[m + "self_attention.q_layernorm.weight"] = sd[p + "self_attn.q_norm.weight"]
            out[m + "self_attention.k_layernorm.weight"] = sd[p + "self_attn.k_norm.weight"]
        if family in MOE and p + "mlp.gate.weight" in sd:
            # transformers v5 keeps experts fused in memory: gate_up_proj [E, 2F, H] = [gate; up],
            # down_proj [E, H, F] (save_pretrained writes them per expert)
            out[m + "mlp.router.weight"] = sd[p + "mlp.gate.weight"]
            gate_up = sd[p + "mlp.experts.gate_up_proj"]
            down = sd[p + "mlp.experts.down_proj"]
            for e in range(E):
                x = f"{m}mlp.experts.local_experts.{e}."
                out[x + "linear_fc1.weight"] = (gate_up[e, :FFN_MOE], gate_up[e, FFN_MOE:])
                out[x + "linear_fc2.weight"] = down[e]
            if family == "qwen2_moe":
                s = f"{m}mlp.shared_experts."
                out[s + "linear_fc1.weight"] = (
                    sd[p + "mlp.shared_expert.gate_proj.weight"],
                    sd[p + "mlp.shared_expert.up_proj.weight"],
                )
                out[s + "linear_fc2.weight"] = sd[p + "mlp.shared_expert.down_proj.weight"]
                out[s + "gate_weight"] = sd[p + "mlp.shared_expert_gate.weight"]
            if family in MLA:
                s = f"{m}mlp.shared_experts."
                out[s + "linear_fc1.weight"] = (
                    sd[p + "mlp.shared_experts.gate_proj.weight"],
                    sd[p + "mlp.shared_experts.up_proj.weight"],
                )
                out[s + "linear_fc2.weight"] = sd[p + "mlp.shared_experts.down_proj.weight"]
                out[m + "mlp.router.expert_bias"] = sd[p + "mlp.gate.e_score_correction_bias"]
            continue
        out[m + "mlp.linear_fc1.weight"] = (
            sd[p + "mlp.gate_proj.weight"],
            sd[p + "mlp.up_proj.weight"],
        )
        out[m + "mlp.linear_fc2.weight"] = sd[p + "mlp.down_proj.weight"]
    return out


_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.")
#: MLA: Megatron ``self_attention.X`` <- HF ``self_attn.Y`` (direct copies, no rope permutation)
_MLA_NAMES = (
    ("linear_q_down_proj", "q_a_proj"),
    ("q_layernorm", "q_a_layernorm"),
    ("linear_q_up_proj", "q_b_proj"),
    ("linear_q_proj", "q_proj"),
    ("linear_kv_down_proj", "kv_a_proj_with_mqa"),
    ("kv_layernorm", "kv_a_layernorm"),
    ("linear_kv_up_proj", "kv_b_proj"),
)


def moe_config(family: str) -> dict:
    """TransformerConfig MoE fields (HF routing: Mixtral / Qwen3-MoE renormalise the top-k,
    i.e. softmax over the top-k logits; Qwen2-MoE takes the top-k of the full softmax)."""
    if family not in MOE:
        return {}
    cfg = dict(
        num_moe_experts=E,
        moe_router_topk=TOPK,
        moe_ffn_hidden_size=FFN_MOE,
        moe_router_pre_softmax=family == "qwen2_moe",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather",  # alltoall makes a torch.cuda.Stream
    )
    if family == "qwen2_moe":
        cfg.update(moe_shared_expert_intermediate_size=FFN_SHARED, moe_shared_expert_gate=True)
    if family in MLA:  # DeepSeek-V3: sigmoid scores, expert bias for the choice, scaled top-k
        cfg.update(
            moe_shared_expert_intermediate_size=FFN_MOE,
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_topk_scaling_factor=2.5,
            moe_layer_freq=[0] + [1] * (DS_L - 1),
        )
    return cfg


def mla_config(family: str) -> dict:
    """MLATransformerConfig fields (plain rope: HF ``rope_scaling`` is None)."""
    if family not in MLA:
        return {}
    return dict(
        q_lora_rank=Q_LORA if family == "deepseek_v3" else None,
        kv_lora_rank=KV_LORA,
        qk_head_dim=NOPE,
        qk_pos_emb_head_dim=ROPE,
        v_head_dim=V_HD,
        rope_type="rope",
        rotary_base=10000,
        qk_layernorm=True,
    )


class SDPA(torch.nn.Module):
    """Causal core attention for MLA: the local ``DotProductAttention`` takes no ``k_channels``
    (MLA's q/k head dim differs from v's), and TE's is not installed."""

    def __init__(self, config, layer_number, *args, softmax_scale=None, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__()
        self.scale = softmax_scale

    def forward(self, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def shard(name: str, value, tp: int, rank: int):  # type: ignore[no-untyped-def]
    """This TP rank's shard of a canonical global tensor (the legacy TP split)."""
    if isinstance(value, tuple):  # gated fc1: rank r holds [gate_r; up_r]
        gate, up = value
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    column = ("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "q_proj.weight",
              "down_proj.weight", "up_proj.weight")  # fmt: skip
    if name.endswith(column) or name == "output_layer.weight":
        return value.chunk(tp)[rank]
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return value.chunk(tp, dim=1)[rank]
    return value


def build(case, world_rank: int, out_root: Path) -> None:  # type: ignore[no-untyped-def]
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
    )
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig,
        TransformerConfig,
    )

    name, family, dtype_name, tied, tp, pp, vp, *moe_par = case
    ep, etp = moe_par or (1, tp)
    moe = family in MOE
    grouped = name.endswith("_gg")  # legacy GroupedMLP experts
    dtype = getattr(torch, dtype_name)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    edp_rank = parallel_state.get_expert_data_parallel_rank()
    e_local = E // ep
    hf = hf_model(family, dtype, tied)
    hd = head_dim(hf)
    padded = padded_vocab(tp)
    gen = torch.Generator().manual_seed(99)
    pad_rows = torch.randn(padded - VOCAB, H, generator=gen)
    glob = megatron_global(hf, family, pad_rows)

    mla = family in MLA
    layers = hf.config.num_hidden_layers
    heads = hf.config.num_attention_heads
    attn = (
        mla_config(family)
        if mla
        else dict(
            num_query_groups=NG, kv_channels=hd, qk_layernorm=family in ("qwen3", "qwen3_moe")
        )
    )
    config = (MLATransformerConfig if mla else TransformerConfig)(
        num_layers=layers,
        hidden_size=H,
        num_attention_heads=heads,
        **attn,
        ffn_hidden_size=FFN,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=hf.config.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=family in ("qwen2", "qwen2_moe"),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        **moe_config(family),
        moe_grouped_gemm=grouped,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    if mla:  # per-layer specs (dense first layer), the MLA core attention swapped for SDPA
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization="RMSNorm"
        )
        for layer_spec in spec.layer_specs:
            layer_spec.submodules.self_attention.submodules.core_attention = SDPA
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=E if moe else None,
            moe_grouped_gemm=grouped,  # local spec: the legacy GroupedMLP (gmm shimmed above)
            normalization="RMSNorm",
            qk_layernorm=family in ("qwen3", "qwen3_moe"),
        )
    stages = list(range(vp)) if vp else [None]
    models = []
    for v in stages:
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v)
        model = GPTModel(
            config,
            spec,
            vocab_size=padded,
            max_sequence_length=128,
            pre_process=pre,
            post_process=post,
            share_embeddings_and_output_weights=tied,
            position_embedding_type="rope",
            rotary_base=rope_theta(hf),
            vp_stage=v,
        )
        model = model.to(dtype).eval()
        for module in model.modules():
            if type(module).__name__ == "GroupedMLP" and not module.config.bf16:
                module.config = copy.copy(module.config)  # its forward asserts bf16 only
                module.config.bf16 = True
        # load HF weights: global layer = layer_number - 1
        layer_of = {
            f"decoder.layers.{j}.": f"decoder.layers.{layer.layer_number - 1}."
            for j, layer in enumerate(model.decoder.layers)
        }
        with torch.no_grad():
            for key, param in model.state_dict().items():
                if key.endswith("_extra_state"):
                    continue
                gkey = key
                for local, g in layer_of.items():
                    if key.startswith(local):
                        gkey = g + key[len(local) :]
                        break
                x = _EXPERT.search(gkey)
                grp = re.search(r"mlp\.experts\.weight([12])$", gkey)
                if grp:  # GroupedMLP: local experts' [out, in] shards, transposed, expert-major
                    fc = "linear_fc1" if grp.group(1) == "1" else "linear_fc2"
                    base = gkey[: grp.start()] + "mlp.experts.local_experts."
                    parts = [
                        shard(f"{base}{ep_rank * e_local + j}.{fc}.weight",
                              glob[f"{base}{ep_rank * e_local + j}.{fc}.weight"], etp, etp_rank).T
                        for j in range(e_local)
                    ]  # fmt: skip
                    stacked = torch.stack(parts)  # [E_loc, H, 2F/ETP] or [E_loc, F/ETP, H]
                    value = stacked.reshape(H, -1) if fc == "linear_fc1" else stacked.reshape(-1, H)
                elif x:  # local expert j of this EP rank, split over expert TP
                    e = ep_rank * e_local + int(x.group(1))
                    gkey = gkey[: x.start(1)] + str(e) + gkey[x.end(1) :]
                    value = shard(gkey, glob[gkey], etp, etp_rank)
                else:
                    value = shard(gkey, glob[gkey], tp, tp_rank)
                if tuple(value.shape) != tuple(param.shape):
                    raise SystemExit(
                        f"{name}: {key} shape {tuple(param.shape)} vs {tuple(value.shape)}"
                    )
                param.copy_(value.to(param.dtype))
        models.append(model)

    if pp == 1 and vp is None:  # Megatron's own forward against HF
        ids = torch.arange(0, 40).reshape(2, 20) * 7 % VOCAB
        pos = torch.arange(20).unsqueeze(0).expand(2, -1)
        mask = torch.triu(torch.ones(1, 1, 20, 20, dtype=torch.bool), diagonal=1)
        with torch.no_grad():
            logits = models[0](ids, pos, attention_mask=mask)
            full = [torch.empty_like(logits) for _ in range(tp)]
            dist.all_gather(full, logits, group=parallel_state.get_tensor_model_parallel_group())
            ours = torch.cat(full, dim=-1)[..., :VOCAB].float()
            ref = hf(ids).logits.float()
        diff = (ours - ref).abs().max().item()
        tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
        if diff > tol:
            raise SystemExit(f"{name}: Megatron logits differ from HF by {diff}")
        if world_rank == 0:
            print(f"{name}: megatron vs hf max |dlogit| = {diff:.2e}", flush=True)

    case_dir = out_root / name
    mla_args = {
        k: getattr(config, k, None)
        for k in ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
    }
    args = argparse.Namespace(
        num_layers=layers,
        hidden_size=H,
        ffn_hidden_size=FFN,
        num_attention_heads=heads,
        group_query_attention=not mla,
        num_query_groups=NG if not mla else heads,
        kv_channels=hd if not mla else None,
        swiglu=True,
        normalization="RMSNorm",
        layernorm_epsilon=hf.config.rms_norm_eps,
        padded_vocab_size=padded,
        vocab_size=VOCAB,
        make_vocab_size_divisible_by=128,
        untie_embeddings_and_output_weights=not tied,
        position_embedding_type="rope",
        rotary_base=rope_theta(hf),
        rotary_percent=1.0,
        max_position_embeddings=128,
        seq_length=128,
        add_bias_linear=False,
        add_qkv_bias=family in ("qwen2", "qwen2_moe"),
        qk_layernorm=config.qk_layernorm,
        multi_latent_attention=mla,
        **mla_args,
        num_experts=config.num_moe_experts,
        moe_ffn_hidden_size=config.moe_ffn_hidden_size,
        moe_router_topk=config.moe_router_topk,
        moe_shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=config.moe_shared_expert_gate,
        moe_router_pre_softmax=config.moe_router_pre_softmax,
        moe_router_score_function=config.moe_router_score_function,
        moe_router_topk_scaling_factor=config.moe_router_topk_scaling_factor,
        moe_router_enable_expert_bias=config.moe_router_enable_expert_bias,
        moe_router_num_groups=config.moe_router_num_groups,
        moe_layer_freq=config.moe_layer_freq,
        moe_grouped_gemm=grouped,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        context_parallel_size=1,
        bf16=dtype == torch.bfloat16,
        fp16=False,
        params_dtype=dtype,
        transformer_impl="local",
        attention_backend=AttnBackend.auto,
        exit_signal=signal.Signals.SIGTERM,
        iteration=10,
    )
    common = {"args": args, "checkpoint_version": 3.0, "iteration": 10}

    # legacy: iter_0000010/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt, written (as Megatron-LM's
    # save_checkpoint does) by the ranks whose expert-DP rank is 0 (the DP rank 0 without experts)
    legacy = case_dir / "legacy"
    if edp_rank == 0:
        rank_dir = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
        rank_dir += f"_{ep_rank:03d}" if ep > 1 else ""
        target = legacy / "iter_0000010" / rank_dir
        target.mkdir(parents=True, exist_ok=True)
        state = dict(common)
        state["rng_state"] = [{"random_rng_state": __import__("random").getstate(),
                               "torch_rng_state": torch.get_rng_state()}]  # fmt: skip
        if vp:
            for v, m in enumerate(models):
                state[f"model{v}"] = m.state_dict_for_save_checkpoint()
        else:
            state["model"] = models[0].state_dict_for_save_checkpoint()
        torch.save(state, target / "model_optim_rng.pt")
    dist.barrier()
    if world_rank == 0:
        (legacy / "latest_checkpointed_iteration.txt").write_text("10")

    # torch_dist
    dist_dir = case_dir / "dist" / "iter_0000010"
    if world_rank == 0:
        dist_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    sharded: dict = dict(common)
    if vp:
        for v, m in enumerate(models):
            sharded[f"model{v}"] = m.sharded_state_dict()
    else:
        sharded["model"] = models[0].sharded_state_dict()
    dist_checkpointing.save(sharded, str(dist_dir))
    dist.barrier()
    if world_rank == 0:
        (case_dir / "dist" / "latest_checkpointed_iteration.txt").write_text("10")
        hf.save_pretrained(case_dir / "hf")
        meta = {"name": name, "family": family, "dtype": dtype_name, "tied": tied,
                "tp": tp, "pp": pp, "vp": vp, "ep": ep, "etp": etp}  # fmt: skip
        (case_dir / "meta.json").write_text(json.dumps(meta))
    dist.barrier()


def main() -> None:
    out = Path(sys.argv[1])
    only = set(sys.argv[2:])
    dist.init_process_group("gloo")
    patch_cuda()
    rank = dist.get_rank()
    for case in CASES:
        if only and case[0] not in only:
            continue
        build(case, rank, out)
    dist.barrier()
    if rank == 0:
        (out / "done.json").write_text(
            json.dumps([c[0] for c in CASES if not only or c[0] in only])
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
