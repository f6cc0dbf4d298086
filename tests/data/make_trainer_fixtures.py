"""Write real transformers ``Trainer`` output_dirs for ``tests/test_trainer_runs.py``.

A tiny Llama (from a config) trained on CPU by ``transformers.Trainer`` for 8 steps with
``save_steps=2``, ``eval_steps=2``, ``metric_for_best_model="eval_loss"`` and a learning rate
high enough that the evaluation loss turns back up, so the best checkpoint is not the last:
``OUT/run/checkpoint-{2,4,6,8}/`` (``model.safetensors``, ``optimizer.pt``, ``scheduler.pt``,
``rng_state.pth``, ``training_args.bin``, ``trainer_state.json``, ``config.json``), all written
by the Trainer's own code.

The same training again under FSDP1 (``fsdp=True``, ``fsdp_config`` with ``version=1`` and
``state_dict_type="SHARDED_STATE_DICT"``; without ``load_best_model_at_end``) on two CPU gloo
ranks: ``OUT/fsdp1/run/checkpoint-{2,4,6,8}/`` hold
``pytorch_model_fsdp_0/`` and ``optimizer_0/`` (DCP, ``ShardedTensor``s) beside the Trainer's
other files. On CPU accelerate never selects FSDP, so the Trainer's Accelerator is given the
distributed type FSDP and its plugin after it is made and after each ``prepare`` (the patch the
issue describes). ``OUT/fsdp1/ref/checkpoint-N/model.safetensors`` holds the full model at each
save (``get_model_state_dict``, ``full_state_dict=True``), ``OUT/fsdp1/ref/config.json`` the
config. ``OUT/done.json`` is written last.

Usage::

    OMP_NUM_THREADS=1 python tests/data/make_trainer_fixtures.py OUT
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


class _Data(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (torch.arange(8) * (i + 1)) % 67
        return {"input_ids": ids, "labels": ids}


def _config() -> LlamaConfig:
    return LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64)  # fmt: skip


def _args(run: Path, **more: Any) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(run), max_steps=8, save_steps=2, eval_strategy="steps",
        eval_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        report_to=[], use_cpu=True, logging_steps=1, metric_for_best_model="eval_loss",
        learning_rate=float(os.environ.get("LR", "0.6")), seed=3, data_seed=3,
        **{"load_best_model_at_end": True, **more},
    )  # fmt: skip


class _FullModelAtSave(TrainerCallback):  # type: ignore[misc]
    """Writes the full model state at each save, beside the run (rank 0)."""

    def __init__(self, ref: Path) -> None:
        self.ref = ref

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        if args.process_index == 0:
            where = self.ref / f"checkpoint-{state.global_step}"
            where.mkdir(parents=True)
            save_file({k: v.clone() for k, v in sd.items()}, where / "model.safetensors")


def _patch_accelerator_for_cpu_fsdp() -> None:
    """The Trainer's Accelerator keeps FSDP (and its plugin) on CPU."""
    import transformers.trainer as trainer_module
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    base = trainer_module.Accelerator

    class _CpuFsdpAccelerator(base):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, fsdp_plugin: Any = None, **kw: Any) -> None:
            super().__init__(*a, fsdp_plugin=fsdp_plugin, **kw)
            self._fsdp = fsdp_plugin
            self._force_fsdp()

        def _force_fsdp(self) -> None:
            state = AcceleratorState()
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = self._fsdp

        def prepare(self, *a: Any, **kw: Any) -> Any:
            self._force_fsdp()
            result = super().prepare(*a, **kw)
            self._force_fsdp()  # prepare() resets it
            return result

    trainer_module.Accelerator = _CpuFsdpAccelerator


def _fsdp1_worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      ACCELERATE_TORCH_DEVICE="cpu")  # fmt: skip
    _patch_accelerator_for_cpu_fsdp()
    torch.manual_seed(3)
    config = _config()
    fsdp_config = {"version": 1, "state_dict_type": "SHARDED_STATE_DICT",
                   "sync_module_states": "false", "cpu_ram_efficient_loading": "false"}  # fmt: skip
    # Loading the best model back at the end is left out: on CPU ranks it sometimes hangs up (one
    # rank loads while the other has left); the checkpoints and trainer_state.json are complete.
    args = _args(out / "run", fsdp=True, fsdp_config=fsdp_config, load_best_model_at_end=False)
    Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=_Data(),
            eval_dataset=_Data(), callbacks=[_FullModelAtSave(out / "ref")]).train()  # fmt: skip
    if rank == 0:
        config.save_pretrained(out / "ref")
    dist.barrier()  # no rank leaves while the other still talks to it
    dist.destroy_process_group()


def main() -> int:
    out = Path(sys.argv[1])
    torch.manual_seed(3)
    Trainer(model=LlamaForCausalLM(_config()), args=_args(out / "run"), train_dataset=_Data(),
            eval_dataset=_Data()).train()  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp1_worker, args=(port, out / "fsdp1"), nprocs=2)
    (out / "done.json").write_text(json.dumps({"torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
