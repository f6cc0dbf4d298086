"""Write a real torchtitan 0.3 checkpoint for ``tests/test_torchtitan.py`` (committed output).

Two CPU gloo ranks, a tiny torchtitan ``Llama3Model`` (3 query heads, 1 KV head, head_dim 8, so
both FSDP shard boundaries fall inside a head), sharded with FSDP2 ``fully_shard`` on a CPU mesh;
torchtitan's own ``OptimizersContainer`` (AdamW) and ``LRSchedulersContainer`` take one training
step (FlexAttention has no backward on CPU, so
the gradients are drawn at random), then torchtitan's ``CheckpointManager.save()`` writes
``CASE/run/checkpoint/step-1/`` (a DCP: the model keys at the top level beside ``optimizer``,
``lr_scheduler``, ``train_state``). The Trainer itself needs CUDA; these parts do not. Two cases
(:data:`CASES`): ``fused`` (torchtitan 0.3's fused ``wqkv``) and ``unfused``.

``CASE/ref/`` holds what the test compares with: ``hf_model.safetensors``, torchtitan's own
``Llama3StateDictAdapter.to_hf`` applied to the full model state dict (``full_tensor()`` of each
DTensor); ``config.json``, the matching ``LlamaConfig``; ``logits.safetensors``, torchtitan's
model's logits for ``ids`` (to compare with transformers' ``LlamaForCausalLM`` on the output).
``qwen3_moe/`` and ``deepseek_v3/`` hold the same pair for torchtitan's MoE families: their real
names and their own ``to_hf`` (experts split, deepseek's MTP layer renumbered), on small
tensors saved by ``dcp.save`` in torchtitan's layout. ``OUT/done.json`` is written last.

Needs ``torchtitan==0.3.0`` (with ``spmd_types==0.2.3``, ``torch_checkpointing``, ``tyro``) and
transformers. Usage (the committed files are in ``tests/data/torchtitan/``)::

    OMP_NUM_THREADS=1 python tests/data/make_torchtitan_fixtures.py tests/data/torchtitan
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
from _gloo import run_on_ranks

DIM, HEADS, KV_HEADS, LAYERS, VOCAB, HIDDEN, THETA = 24, 3, 1, 2, 40, 40, 10000.0
#: case -> fuse_qkv: 0.3's default (one fused ``wqkv`` parameter whose state-dict hook saves whole
#: ``wq``/``wk``/``wv``), and separate ``wq``/``wk``/``wv`` parameters (FSDP-sharded row chunks,
#: as torchtitan before 0.3 saved them)
CASES = {"fused": True, "unfused": False}
#: MoE families, names real and tensors shrunk (:func:`_shrunk`)
MOE_CASES = ("qwen3_moe", "deepseek_v3")


def _config(fused: bool) -> Any:
    import torchtitan.models.llama3 as llama3

    return llama3.Llama3Model.Config(
        dim=DIM,
        vocab_size=VOCAB,
        tok_embeddings=llama3.Embedding.Config(
            num_embeddings=VOCAB, embedding_dim=DIM, param_init=llama3._EMBEDDING_INIT
        ),
        norm=llama3.RMSNorm.Config(normalized_shape=DIM, param_init=llama3._NORM_INIT),
        lm_head=llama3.Linear.Config(
            in_features=DIM, out_features=VOCAB, param_init=llama3._output_linear_init(DIM)
        ),
        layers=llama3._build_llama3_layers(
            fuse_qkv=fused,
            n_layers=LAYERS,
            dim=DIM,
            n_heads=HEADS,
            n_kv_heads=KV_HEADS,
            hidden_dim=HIDDEN,
            rope=llama3.ComplexRoPE.Config(dim=DIM // HEADS, max_seq_len=64, theta=THETA),
            attn_backend="flex",
        ),
    )


class _TrainState:
    """The Trainer's own stateful part (``train_state``): the step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])


def _forward(model: Any, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    out: torch.Tensor = model(ids, positions=pos, attention_masks=model.get_attention_masks(pos))
    return out


def _worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for case, fused in CASES.items():
        _save_case(rank, out / case, fused)
    dist.destroy_process_group()


def _save_case(rank: int, out: Path, fused: bool) -> None:
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.models.llama3 import Llama3StateDictAdapter
    from transformers import LlamaConfig

    cfg = _config(fused)
    torch.manual_seed(7)
    model = cfg.build()
    model.init_weights()
    mesh = init_device_mesh("cpu", (2,))
    layers = model.layers.values() if hasattr(model.layers, "values") else model.layers
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizers = default_adamw(lr=1e-2).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=1).build(
        optimizers=optimizers, training_steps=4
    )
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    torch.manual_seed(11)  # FlexAttention has no CPU backward: gradients drawn, same on each rank
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizers.step()
    schedulers.step()
    optimizers.zero_grad()

    ckpt = CheckpointManager(
        CheckpointManager.Config(enable=True, folder="checkpoint", interval=1, keep_latest_k=0),
        dataloader=None,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=schedulers,
        states={"train_state": _TrainState(1)},
        sd_adapter=None,
        base_folder=str(out / "run"),
    )
    assert ckpt.save(curr_step=1)
    ckpt.close()

    with torch.no_grad():
        logits = _forward(model, ids)
    full = {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.state_dict().items()
    }
    hf = Llama3StateDictAdapter(cfg, None).to_hf(full)
    if rank == 0:
        ref = out / "ref"
        ref.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in hf.items()}, ref / "hf_model.safetensors")
        save_file({"ids": ids, "logits": logits.contiguous()}, ref / "logits.safetensors")
        LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN,
                    num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5, rope_theta=THETA,
                    max_position_embeddings=64, tie_word_embeddings=False,
                    ).save_pretrained(ref)  # fmt: skip
    dist.barrier()


def _shrunk(flavor_cfg: Any, adapter: Any, model_type: str, out: Path) -> None:
    """A MoE family's real names, with small tensors: torchtitan's model built on the meta
    device gives the names and which dims are experts; each other dim is cut to 2 or 3 (the
    adapter's ``to_hf`` reads names and the expert count, never the other sizes). The state dict
    is saved in torchtitan's layout (top-level model keys beside ``train_state``) with
    ``dcp.save``; ``ref/hf_model.safetensors`` is the family's own ``to_hf`` of it."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = flavor_cfg.build()
    g = torch.Generator().manual_seed(5)
    sd = {}
    for name, t in model.state_dict().items():
        experts = "inner_experts" in name or name.endswith("expert_bias_E")
        shape = [d if experts and i == 0 else min(d, 2 + i % 2) for i, d in enumerate(t.shape)]
        sd[name] = torch.randn(shape, generator=g).to(t.dtype)
    hf = adapter(flavor_cfg, None).to_hf(dict(sd))
    dcp.save(
        {**sd, "train_state": {"step": torch.tensor(1)}},
        checkpoint_id=out / "run" / "checkpoint" / "step-1",
        no_dist=True,
    )
    (out / "ref").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in hf.items()}, out / "ref" / "hf_model.safetensors")
    (out / "ref" / "config.json").write_text(json.dumps({"model_type": model_type}) + "\n")


def _moe_cases(target: Path) -> None:
    """``qwen3_moe`` (torchtitan's ``debugmodel_moe``) and ``deepseek_v3`` (``debugmodel`` with
    one multi-token-prediction layer), shrunk (see :func:`_shrunk`)."""
    from torchtitan.models import deepseek_v3, qwen3
    from torchtitan.models.deepseek_v3.state_dict_adapter import DeepSeekV3StateDictAdapter

    _shrunk(qwen3.model_registry("debugmodel_moe").model, qwen3.Qwen3StateDictAdapter,
            "qwen3_moe", target / "qwen3_moe")  # fmt: skip
    dsv3 = deepseek_v3.deepseekv3_configs["debugmodel"](
        attn_backend="flex", moe_comm_backend="standard", num_mtp_layers=1
    )
    _shrunk(dsv3, DeepSeekV3StateDictAdapter, "deepseek_v3", target / "deepseek_v3")


def main() -> int:
    import sys

    target = Path(sys.argv[1])
    for stale in (*CASES, *MOE_CASES, "done.json"):
        if (target / stale).is_dir():
            shutil.rmtree(target / stale)
        elif (target / stale).exists():
            (target / stale).unlink()
    _moe_cases(target)
    rc = run_on_ranks(_worker)
    import torchtitan

    done = json.loads((target / "done.json").read_text())
    done["torchtitan"] = getattr(torchtitan, "__version__", "0.3.0")
    (target / "done.json").write_text(json.dumps(done) + "\n")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
