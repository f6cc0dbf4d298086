"""Write real Megatron-Core checkpoints (legacy ``mp_rank_*`` and ``torch_dist``) of tiny HF models.

Run with a Python that has torch, transformers and megatron-core (``tests/test_megatron.py`` makes
a venv under /tmp for it)::

    torchrun --nproc_per_node 4 tests/data/make_megatron_fixtures.py OUT_DIR

Recipe: ``shared/formats/megatron.md`` §5. Every rank builds the same tiny HF model (fixed seed),
builds a real ``GPTModel`` (local spec, CPU, gloo) for each parallel layout, loads the HF weights
into it through the inverse of the HF mapping, and saves it:

* ``legacy``: the model's real ``state_dict_for_save_checkpoint()`` in Megatron-LM's directory
  layout (``iter_0000010/mp_rank_TT[_PPP]/model_optim_rng.pt``, written by DP rank 0 only, with an
  ``args`` Namespace, ``checkpoint_version`` 3.0, the iteration and an RNG state, as
  ``megatron.training.checkpointing`` writes them; ``args`` is built here, not by ``parse_args``,
  because megatron-core ships without ``megatron.training``);
* ``dist``: ``megatron.core.dist_checkpointing.save`` of the model's ``sharded_state_dict()`` plus
  the common state (``common.pt``), as Megatron-LM's ``torch_dist`` format.

With PP == 1 Megatron's own forward is checked against the HF model's logits, which proves the
inverse mapping (and so the reference) right. Small patches make megatron-core save on CPU/gloo:
``torch.cuda.synchronize`` is a no-op, ``torch.cuda.current_device`` returns ``"cpu"``,
``Tensor.cuda`` returns the tensor (tied embeddings with PP > 1), the CUDA RNG tracker's ``fork`` is
a null context.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

warnings.filterwarnings("ignore")

H, L, NH, NG, VOCAB, FFN = 64, 4, 8, 2, 250, 96

# (name, family, dtype, tied, tp, pp, vp)
CASES = [
    ("llama_fp32_tp2", "llama", "float32", False, 2, 1, None),
    ("llama_fp32_tp2pp2", "llama", "float32", False, 2, 2, None),
    ("llama_fp32_pp2vp2", "llama", "float32", False, 1, 2, 2),
    ("llama_tied_fp32_tp2", "llama", "float32", True, 2, 1, None),
    ("llama_tied_fp32_tp2pp2", "llama", "float32", True, 2, 2, None),
    ("qwen2_bf16_tp2", "qwen2", "bfloat16", False, 2, 1, None),
    ("qwen2_bf16_tp2pp2", "qwen2", "bfloat16", False, 2, 2, None),
    ("qwen3_fp32_tp2", "qwen3", "float32", False, 2, 1, None),
    ("qwen3_tied_bf16_pp2vp2", "qwen3", "bfloat16", True, 1, 2, 2),
]


def patch_cuda() -> None:
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.fork = lambda *a, **k: contextlib.nullcontext()


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
    model = model.to(dtype).eval()
    return model


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
    for i in range(L):
        p = f"model.layers.{i}."
        m = f"decoder.layers.{i}."
        for suffix in ("weight", "bias"):
            q = sd.get(p + f"self_attn.q_proj.{suffix}")
            if q is None:
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
        if family == "qwen3":
            out[m + "self_attention.q_layernorm.weight"] = sd[p + "self_attn.q_norm.weight"]
            out[m + "self_attention.k_layernorm.weight"] = sd[p + "self_attn.k_norm.weight"]
        out[m + "mlp.linear_fc1.weight"] = (
            sd[p + "mlp.gate_proj.weight"],
            sd[p + "mlp.up_proj.weight"],
        )
        out[m + "mlp.linear_fc2.weight"] = sd[p + "mlp.down_proj.weight"]
    return out


def shard(name: str, value, tp: int, rank: int):  # type: ignore[no-untyped-def]
    """This TP rank's shard of a canonical global tensor (the legacy TP split)."""
    if isinstance(value, tuple):  # gated fc1: rank r holds [gate_r; up_r]
        gate, up = value
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight")) or (
        name == "output_layer.weight"
    ):
        return value.chunk(tp)[rank]
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return value.chunk(tp, dim=1)[rank]
    return value


def build(case, world_rank: int, out_root: Path) -> None:  # type: ignore[no-untyped-def]
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    name, family, dtype_name, tied, tp, pp, vp = case
    dtype = getattr(torch, dtype_name)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
    )
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    hf = hf_model(family, dtype, tied)
    hd = head_dim(hf)
    padded = padded_vocab(tp)
    gen = torch.Generator().manual_seed(99)
    pad_rows = torch.randn(padded - VOCAB, H, generator=gen)
    glob = megatron_global(hf, family, pad_rows)

    config = TransformerConfig(
        num_layers=L,
        hidden_size=H,
        num_attention_heads=NH,
        num_query_groups=NG,
        kv_channels=hd,
        ffn_hidden_size=FFN,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        add_bias_linear=False,
        add_qkv_bias=family == "qwen2",
        qk_layernorm=family == "qwen3",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=family == "qwen3")
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
            rotary_base=int(getattr(hf.config, "rope_theta", None) or 10000),
            vp_stage=v,
        )
        model = model.to(dtype).eval()
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
    args = argparse.Namespace(
        num_layers=L,
        hidden_size=H,
        ffn_hidden_size=FFN,
        num_attention_heads=NH,
        group_query_attention=True,
        num_query_groups=NG,
        kv_channels=hd,
        swiglu=True,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        padded_vocab_size=padded,
        vocab_size=VOCAB,
        make_vocab_size_divisible_by=128,
        untie_embeddings_and_output_weights=not tied,
        position_embedding_type="rope",
        rotary_base=int(getattr(hf.config, "rope_theta", None) or 10000),
        rotary_percent=1.0,
        max_position_embeddings=128,
        seq_length=128,
        add_bias_linear=False,
        add_qkv_bias=family == "qwen2",
        qk_layernorm=family == "qwen3",
        num_experts=None,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        expert_model_parallel_size=1,
        expert_tensor_parallel_size=tp,
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

    # legacy: iter_0000010/mp_rank_TT[_PPP]/model_optim_rng.pt, DP rank 0 only
    legacy = case_dir / "legacy"
    if dp_rank == 0:
        rank_dir = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
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
                "tp": tp, "pp": pp, "vp": vp}  # fmt: skip
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
