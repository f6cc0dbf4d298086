"""Write ``tests/data/verl_fsdp1[_mesh]/`` with veRL's own FSDP checkpoint manager (FSDP1).

Two CPU gloo ranks build a tiny Llama (transformers, from a config; vocabulary 67 and
intermediate size 45 so that FSDP1's row chunks are uneven), wrap it in FSDP1 the way veRL's
FSDP engine does (``verl/workers/engine/fsdp/transformer_impl.py``: veRL's own
``get_fsdp_wrap_policy`` around each decoder layer, ``FULL_SHARD``, bf16 ``MixedPrecision`` with
fp32 masters, ``use_orig_params=False``, veRL's default), take one AdamW step, and call veRL's
``FSDPCheckpointManager.save_checkpoint`` (verl 0.9.1) into ``OUT/global_step_1/actor/``, as
``RayPPOTrainer._save_checkpoint`` does, which then writes
``OUT/latest_checkpointed_iteration.txt``. veRL writes, per rank,
``model_world_size_2_rank_R.pt`` (``SHARDED_STATE_DICT``), ``optim_…`` (FSDP1 flat-parameter
state) and ``extra_state_…``, and on rank 0 ``fsdp_config.json`` and ``huggingface/`` (the config
and the tokenizer passed as ``processing_class``).

Without ``--mesh`` FSDP1 gets no device mesh and the model files hold ``ShardedTensor`` values
(``tests/data/verl_fsdp1/``); with ``--mesh`` it gets the 1-D ``fsdp`` mesh that veRL 0.9.1's
engine always passes (``create_device_mesh``), and they hold DTensors
(``tests/data/verl_fsdp1_mesh/``).

``OUT/ref/model.safetensors`` holds the full state dict gathered in the same run with veRL's
``get_fsdp_full_state_dict`` (``StateDictType.FULL_STATE_DICT``), ``OUT/ref/versions.json`` the
verl and transformers versions. ``OUT/done.json`` is written last.

Not veRL's own: ``device_id=torch.device("cpu")`` where veRL passes ``get_device_id()`` (veRL's
platform lookup reports CUDA on a host without a GPU and then fails to initialise it), the mesh
built on "cpu" for the same reason (and left out without ``--mesh``), weights built on
every rank from one seed instead of veRL's meta-device ``init_fn`` and ``sync_module_states=True``
(FSDP1 refuses that option for CPU parameters). Nothing in veRL is patched.

veRL is not a test dependency: the output is committed. To regenerate, verl 0.9.1 and what
importing its checkpoint package pulls in (ray; tensordict, whose ``pyvers`` pins
``packaging<26``, hence ``--no-deps``; ``datasets`` and ``pillow`` through ``verl.utils.dataset``),
pinned to the installed torch/transformers/numpy::

    python -m venv --system-site-packages /tmp/verl-venv
    pip freeze | grep -E '^(torch|numpy|transformers|accelerate|peft|ray)==' > /tmp/pins.txt
    /tmp/verl-venv/bin/pip install verl==0.9.1 --no-deps
    /tmp/verl-venv/bin/pip install --no-deps tensordict==0.10.0 'pyvers<0.2'
    /tmp/verl-venv/bin/pip install -c /tmp/pins.txt ray cloudpickle importlib_metadata orjson \\
        codetiming omegaconf hydra-core datasets pillow
    rm -rf tests/data/verl_fsdp1 tests/data/verl_fsdp1_mesh
    export OMP_NUM_THREADS=1 GEN=tests/data/make_verl_fsdp1_fixtures.py
    /tmp/verl-venv/bin/python $GEN tests/data/verl_fsdp1
    /tmp/verl-venv/bin/python $GEN tests/data/verl_fsdp1_mesh --mesh
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
from _gloo import run_on_ranks

MESH = "FASTCKPT_VERL_FSDP1_MESH"  # set by ``--mesh`` for the spawned ranks
SENTENCES = ["the quick brown fox jumps over the lazy dog", "a tiny llama saved by verl"]


def _tokenizer():  # type: ignore[no-untyped-def]
    """A small word-level tokenizer (no download): veRL saves the training tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", *sorted({w for s in SENTENCES for w in s.split()})]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def _fsdp1(model: torch.nn.Module, mesh: bool) -> torch.nn.Module:
    """FSDP1 as veRL's FSDP engine wraps the actor; with ``mesh``, on the 1-D ``fsdp`` mesh that
    veRL's ``create_device_mesh`` builds (on "cpu" where veRL asks its platform for the device)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from verl.utils.fsdp_utils import get_fsdp_wrap_policy

    mixed = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                           buffer_dtype=torch.float32)  # fmt: skip
    return FSDP(
        model,
        auto_wrap_policy=get_fsdp_wrap_policy(module=model, config=None, is_lora=False),
        device_id=torch.device("cpu"),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        mixed_precision=mixed,
        use_orig_params=False,
        device_mesh=init_device_mesh("cpu", (2,), mesh_dim_names=["fsdp"]) if mesh else None,
    )


def _worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, get_constant_schedule_with_warmup
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager
    from verl.utils.fsdp_utils import get_fsdp_full_state_dict

    config = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=45,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(1234)
    model = _fsdp1(LlamaForCausalLM(config), os.environ.get(MESH) == "1")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=2)
    ids = torch.randint(0, 67, (2, 8), generator=torch.Generator().manual_seed(rank))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()

    manager = FSDPCheckpointManager(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                    processing_class=_tokenizer())  # fmt: skip
    manager.save_checkpoint(str(out / "global_step_1" / "actor"), global_step=1)
    full = get_fsdp_full_state_dict(model, offload_to_cpu=True, rank0_only=True)
    if rank == 0:
        (out / "ref").mkdir()
        save_file({k: v.clone() for k, v in full.items()}, out / "ref" / "model.safetensors")
        (out / "latest_checkpointed_iteration.txt").write_text("1")  # RayPPOTrainer, last
        versions = {"verl": _version("verl"), "transformers": _version("transformers")}
        (out / "ref" / "versions.json").write_text(json.dumps(versions))
    dist.barrier()
    dist.destroy_process_group()


def _version(dist_name: str) -> str:
    from importlib.metadata import version

    return version(dist_name)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ[MESH] = "1" if sys.argv[2:] == ["--mesh"] else "0"
    raise SystemExit(run_on_ranks(_worker))
