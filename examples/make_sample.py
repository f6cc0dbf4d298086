"""Write the tiny sample checkpoint that ships in ``examples/tiny-llama-run/``.

A real PyTorch Distributed Checkpoint, made by torch itself: a tiny Llama (made from a config, no
download) trained for one AdamW step under FSDP2 ``fully_shard`` on a 2-process CPU gloo group,
saved with ``torch.distributed.checkpoint.save`` in NeMo RL's layout::

    tiny-llama-run/step_3/
      training_info.json
      policy/weights/      .metadata, __0_0.distcp, __1_0.distcp   ({"model": state dict})
      policy/tokenizer/    config.json, generation_config.json, tokenizer.json,
                           tokenizer_config.json, chat_template.jinja

The README quick start converts it with no torch installed (fastckpt finds the run's latest
complete step and the tokenizer beside it)::

    pip install . && fastckpt convert examples/tiny-llama-run /tmp/tiny-llama-hf --overwrite

Regenerate (needs torch and transformers)::

    OMP_NUM_THREADS=1 python examples/make_sample.py
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
OUT = HERE / "tiny-llama-run"
STEP = 3
WORLD_SIZE = 2
SEED = 0

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a checkpoint is a set of tensors written by many ranks",
    "fastckpt turns distributed checkpoints into hugging face folders",
]


def _tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        SENTENCES, trainer=trainers.WordLevelTrainer(vocab_size=64, special_tokens=specials)
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        pad_token="[PAD]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _portable_tokenizer_config(path: Path) -> None:
    """Make the saved tokenizer config load in transformers 4.x as well as 5.x.

    transformers 5 names the class ``TokenizersBackend`` (unknown to 4.x) and writes the extra
    special tokens as an ``extra_special_tokens`` list (4.x expects a dict there); both majors
    read ``PreTrainedTokenizerFast`` and ``additional_special_tokens``.
    """
    doc = json.loads(path.read_text())
    doc["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = doc.pop("extra_special_tokens", None)
    if extra:
        doc["additional_special_tokens"] = extra
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _worker(rank: int, port: int) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    config.dtype = "float32"
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(SEED))
    model(input_ids=batch, labels=batch).loss.backward()
    optim.step()

    policy = OUT / f"step_{STEP}" / "policy"
    # NeMo RL (DTensor policy, v1): the weights DCP holds {"model": state dict}
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=policy / "weights")
    dist.barrier()
    if rank == 0:
        tok_dir = policy / "tokenizer"
        config.save_pretrained(tok_dir)
        _tokenizer().save_pretrained(tok_dir)
        _portable_tokenizer_config(tok_dir / "tokenizer_config.json")
        GenerationConfig(bos_token_id=2, eos_token_id=[3, 5], pad_token_id=0).save_pretrained(
            tok_dir
        )
        info = {"consumed_samples": 2 * STEP, "current_step": STEP, "total_steps": STEP}
        (OUT / f"step_{STEP}" / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    dist.destroy_process_group()


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port,), nprocs=WORLD_SIZE, join=True)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
