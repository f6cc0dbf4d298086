"""Write real FSDP1 ``ShardedTensor`` rank files for ``tests/test_sharded_tensor.py``.

Two CPU gloo ranks, a tiny Llama (transformers, from a config; vocabulary 67 and an odd
intermediate size so that FSDP1's row chunks are uneven), wrapped in
``FullyShardedDataParallel`` without a device mesh; ``StateDictType.SHARDED_STATE_DICT`` then
gives ``ShardedTensor`` values (veRL FSDP1's default, older trainers). Each rank saves
``torch.save(model.state_dict(), f"model_world_size_2_rank_{r}.pt")``, as veRL's FSDP1
checkpoint manager does, under ``OUT/llama/``; ``OUT/llama/ref/model.safetensors`` holds the
full state dict gathered with ``StateDictType.FULL_STATE_DICT`` in the same run, and
``OUT/llama/huggingface/config.json`` the config (veRL saves it there).

``OUT/small/`` holds one more pair of rank files: a ``ShardedTensor`` of shape ``[5, 3]``
(rows 0-2 on rank 0, 3-4 on rank 1; no FSDP) plus a plain tensor, small enough to edit in the
hostile-pickle tests. ``OUT/done.json`` is written last.

Usage::

    OMP_NUM_THREADS=1 python tests/data/make_sharded_tensor_fixtures.py OUT
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
from _gloo import run_on_ranks


def _llama(out: Path, rank: int) -> None:
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=45,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config)
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    with FSDP.state_dict_type(wrapped, StateDictType.SHARDED_STATE_DICT):
        sharded = wrapped.state_dict()
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT):
        full = wrapped.state_dict()
    case = out / "llama"
    if rank == 0:
        (case / "ref").mkdir(parents=True)
        save_file({k: v.clone() for k, v in full.items()}, case / "ref" / "model.safetensors")
        config.save_pretrained(case / "huggingface")
    dist.barrier()
    torch.save(sharded, case / f"model_world_size_2_rank_{rank}.pt")


def _small(out: Path, rank: int) -> None:
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, init_from_local_shards

    full = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    rows = (0, 3) if rank == 0 else (3, 5)
    local = full[rows[0] : rows[1]].clone()
    meta = ShardMetadata([rows[0], 0], list(local.shape), f"rank:{rank}/cpu")
    st = init_from_local_shards([Shard(local, meta)], [5, 3])
    assert isinstance(st, ShardedTensor)
    case = out / "small"
    if rank == 0:
        case.mkdir(parents=True)
    dist.barrier()
    state = {"w": st, "b": torch.ones(3)}
    torch.save(state, case / f"model_world_size_2_rank_{rank}.pt")


def _worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=2)
    _llama(out, rank)
    _small(out, rank)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(run_on_ranks(_worker))
