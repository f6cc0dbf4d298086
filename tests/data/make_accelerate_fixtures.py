"""Write real ``accelerate`` ``save_state()`` folders (FSDP1 and FSDP2) for
``tests/test_accelerate.py``.

Two CPU gloo ranks, a tiny Llama (transformers, from a config), ``Accelerator(fsdp_plugin=
FullyShardedDataParallelPlugin(fsdp_version=V, state_dict_type="SHARDED_STATE_DICT"))``, one
AdamW step, then ``accelerator.save_state(OUT/fsdpV/state)``: accelerate's own code writes
``pytorch_model_fsdp_0/`` and ``optimizer_0/`` (DCP; FSDP1 hands it ``ShardedTensor``s, FSDP2
``DTensor``s) and ``random_states_R.pkl``. On CPU accelerate never selects FSDP, so the
distributed type is set to FSDP after the Accelerator is made (and again after ``prepare``,
which resets it), as the issue describes. Both versions are made in one run, one after the
other, in the same gloo group (the accelerate state is reset in between).

``OUT/fsdpV/ref/model.safetensors`` and ``OUT/fsdpV/ref/optimizer.safetensors`` hold the full
model and optimizer state (``get_model_state_dict`` / ``get_optimizer_state_dict`` with
``full_state_dict=True``, which serve FSDP1 as well; optimizer entries named
``state.<fqn>.<name>``), ``OUT/fsdpV/ref/config.json`` the config. ``OUT/done.json`` is written
last.

Usage::

    OMP_NUM_THREADS=1 python tests/data/make_accelerate_fixtures.py OUT
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
from _gloo import run_on_ranks

VERSIONS = (1, 2)


def _same_as_fsdp1_full_state_dict(
    model: torch.nn.Module, optimizer: Any, model_sd: dict[str, Any], optim_sd: Any
) -> None:
    """The reference is what FSDP1's own ``FULL_STATE_DICT`` gives, tensor for tensor."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT):
        fsdp_model = model.state_dict()
        fsdp_optim = FSDP.optim_state_dict(model, optimizer)
    assert sorted(fsdp_model) == sorted(model_sd), (sorted(fsdp_model), sorted(model_sd))
    for name, t in fsdp_model.items():
        assert torch.equal(t, model_sd[name]) and t.dtype == model_sd[name].dtype, name
    assert sorted(fsdp_optim["state"]) == sorted(optim_sd["state"])
    for fqn, d in fsdp_optim["state"].items():
        for k, t in d.items():
            assert torch.equal(t, optim_sd["state"][fqn][k]), (fqn, k)


def _save(rank: int, out: Path, version: int) -> None:
    """One ``save_state()`` folder and its full-state reference, for FSDP ``version``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from transformers import LlamaConfig, LlamaForCausalLM

    AcceleratorState._reset_state()  # the previous version's plugin and type; the group stays
    GradientState._reset_state()
    config = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(99)
    model = LlamaForCausalLM(config)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=version, state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False
    )
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    if version == 1:  # FSDP1 replaces the parameters: the optimizer is made after (its docs)
        model = accelerator.prepare(model)
        optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=1e-3))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, optimizer = accelerator.prepare(model, optimizer)
    AcceleratorState().distributed_type = DistributedType.FSDP  # prepare() reset it
    ids = torch.arange(16).reshape(2, 8) % 67
    accelerator.backward(model(input_ids=ids, labels=ids).loss)
    optimizer.step()
    case = out / f"fsdp{version}"
    accelerator.save_state(str(case / "state"))
    full = StateDictOptions(full_state_dict=True)
    model_sd = get_model_state_dict(model, options=full)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=full)
    if version == 1:
        _same_as_fsdp1_full_state_dict(model, optimizer, model_sd, optim_sd)
    if rank == 0:
        ref = case / "ref"
        ref.mkdir()
        save_file({k: v.clone() for k, v in model_sd.items()}, ref / "model.safetensors")
        state_items = optim_sd["state"].items()
        flat = {f"state.{fqn}.{k}": t.clone() for fqn, d in state_items for k, t in d.items()}
        save_file(flat, ref / "optimizer.safetensors")
        config.save_pretrained(ref)
    dist.barrier()


def _worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      ACCELERATE_TORCH_DEVICE="cpu")  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for version in VERSIONS:
        _save(rank, out, version)
    dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(run_on_ranks(_worker))
