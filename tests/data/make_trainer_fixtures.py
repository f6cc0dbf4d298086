"""Write a real transformers ``Trainer`` output_dir for ``tests/test_trainer_runs.py``.

A tiny Llama (from a config) trained on CPU by ``transformers.Trainer`` for 8 steps with
``save_steps=2``, ``eval_steps=2``, ``metric_for_best_model="eval_loss"`` and a learning rate
high enough that the evaluation loss turns back up, so the best checkpoint is not the last:
``OUT/run/checkpoint-{2,4,6,8}/`` (``model.safetensors``, ``optimizer.pt``, ``scheduler.pt``,
``rng_state.pth``, ``training_args.bin``, ``trainer_state.json``, ``config.json``), all written
by the Trainer's own code. ``OUT/done.json`` is written last.

Usage::

    OMP_NUM_THREADS=1 python tests/data/make_trainer_fixtures.py OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


class _Data(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (torch.arange(8) * (i + 1)) % 67
        return {"input_ids": ids, "labels": ids}


def main() -> int:
    out = Path(sys.argv[1])
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)  # fmt: skip
    args = TrainingArguments(
        output_dir=str(out / "run"), max_steps=8, save_steps=2, eval_strategy="steps",
        eval_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        report_to=[], use_cpu=True, logging_steps=1, metric_for_best_model="eval_loss",
        load_best_model_at_end=True, learning_rate=float(os.environ.get("LR", "0.6")),
        seed=3, data_seed=3,
    )  # fmt: skip
    Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=_Data(),
            eval_dataset=_Data()).train()  # fmt: skip
    (out / "done.json").write_text(json.dumps({"torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
