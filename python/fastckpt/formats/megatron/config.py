"""What ``args`` say about the model: dimensions, architecture, and a derived ``config.json``.

:func:`_dims` reads the attention / vocabulary dimensions the mapping needs, :func:`detect_arch`
picks an :data:`ARCHS` key, and :func:`derive_config` writes a ``config.json`` when no HF config
was given, refusing (:class:`MappingError`) what the HF family cannot express (MoE routing in
:func:`_moe_fields`, multi-latent attention in :func:`_mla_fields`).
"""

from __future__ import annotations

import math
from typing import Any

from fastckpt._core import FormatError, MappingError, ShapeError
from fastckpt.formats.megatron.canon import Canon
from fastckpt.formats.megatron.layout import Args
from fastckpt.formats.megatron.naming import ARCHS, _Dims
from fastckpt.side_files import TORCH_DTYPE_NAMES


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
