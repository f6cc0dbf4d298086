"""Real checkpoints from torch's ``HuggingFaceStorageWriter``, for ``tests/test_hf_storage.py``.

A tiny Llama (transformers, from a config, no download) under FSDP2 ``fully_shard`` on a CPU gloo
group of 2 ranks (uneven ``Shard(0)`` pieces: the vocabulary is odd), saved by
``torch.distributed.checkpoint.save`` with torch's own Hugging Face writer:

- ``distributed/``: ``save_distributed=True`` without consolidation: every rank writes
  ``shard-0000R-model-00001-of-00001.safetensors`` holding its pieces, with the global offset of
  each piece in the header's ``__metadata__["DCP_SHARDING_INFO"]`` and no index;
- ``two_files/``: the same with ``fqn_to_index_mapping`` sending the embedding and ``lm_head`` to
  file 2 of 2 (``shard-0000R-model-0000K-of-00002``);
- ``consolidated/``: ``enable_consolidation=True``: torch's consolidation writes the full tensors
  to ``model-00001-of-00001.safetensors`` + index and leaves the pieces in ``sharded/``;
- ``rank0/``: ``save_distributed=False`` of the full state dict (rank-0 checkpointing).

``ref/model.safetensors`` holds the full state dict (``get_model_state_dict(full_state_dict=True)``)
and ``config.json`` the model's config. ``OUT/done.json`` is written last.

Usage::

    OMP_NUM_THREADS=1 python tests/data/make_hf_storage_fixtures.py OUT
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
from _gloo import run_on_ranks

SEED = 777
VOCAB = 67  # odd: 34 + 33 rows on 2 ranks


def _model():  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config)


def _worker(rank: int, port: int, out: Path) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import torch.distributed.checkpoint as dcp

    model = _model()
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = get_model_state_dict(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))

    def writer(name: str, **kwargs: object) -> HuggingFaceStorageWriter:
        return HuggingFaceStorageWriter(str(out / name), **kwargs)  # type: ignore[arg-type]

    dcp.save(sharded, storage_writer=writer("distributed", save_distributed=True))
    mapping = {k: (2 if k in ("model.embed_tokens.weight", "lm_head.weight") else 1)
               for k in sharded}  # fmt: skip
    dcp.save(
        sharded,
        storage_writer=writer("two_files", save_distributed=True, fqn_to_index_mapping=mapping),
    )
    dcp.save(
        sharded,
        storage_writer=writer("consolidated", save_distributed=True, enable_consolidation=True),
    )
    if rank == 0:
        dcp.save(full, storage_writer=writer("rank0"), no_dist=True)
        (out / "ref").mkdir()
        save_file({k: v.clone() for k, v in full.items()}, out / "ref" / "model.safetensors")
        model.config.save_pretrained(out / "ref")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(run_on_ranks(_worker))
