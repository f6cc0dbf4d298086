"""Write a real ``accelerate`` ``save_state()`` folder (FSDP2) for ``tests/test_accelerate.py``.

Two CPU gloo ranks, a tiny Llama (transformers, from a config), ``Accelerator(fsdp_plugin=
FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT"))``, one
AdamW step, then ``accelerator.save_state(OUT/state)``: accelerate's own code writes
``pytorch_model_fsdp_0/`` and ``optimizer_0/`` (DCP) and ``random_states_R.pkl``. On CPU
accelerate never selects FSDP, so the distributed type is set to FSDP after the Accelerator is
made (and again after ``prepare``, which resets it), as the issue describes.

``ref/model.safetensors`` and ``ref/optimizer.safetensors`` hold the full model and optimizer
state (``get_model_state_dict`` / ``get_optimizer_state_dict`` with ``full_state_dict=True``;
optimizer entries named ``state.<fqn>.<name>``), ``ref/config.json`` the config.
``OUT/done.json`` is written last.

Usage::

    OMP_NUM_THREADS=1 python tests/data/make_accelerate_fixtures.py OUT
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
from _gloo import run_on_ranks


def _worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      ACCELERATE_TORCH_DEVICE="cpu")  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(99)
    model = LlamaForCausalLM(config)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False
    )
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    AcceleratorState().distributed_type = DistributedType.FSDP  # prepare() reset it
    ids = torch.arange(16).reshape(2, 8) % 67
    accelerator.backward(model(input_ids=ids, labels=ids).loss)
    optimizer.step()
    accelerator.save_state(str(out / "state"))
    full = StateDictOptions(full_state_dict=True)
    model_sd = get_model_state_dict(model, options=full)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=full)
    if rank == 0:
        ref = out / "ref"
        ref.mkdir()
        save_file({k: v.clone() for k, v in model_sd.items()}, ref / "model.safetensors")
        state_items = optim_sd["state"].items()
        flat = {f"state.{fqn}.{k}": t.clone() for fqn, d in state_items for k, t in d.items()}
        save_file(flat, ref / "optimizer.safetensors")
        config.save_pretrained(ref)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(run_on_ranks(_worker))
