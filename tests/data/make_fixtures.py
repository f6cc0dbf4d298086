"""Write real PyTorch Distributed Checkpoints for the fastckpt test suite.

Every checkpoint here is written by torch itself: ``torch.distributed.checkpoint.save`` on a CPU
gloo group, with models wrapped by FSDP2 ``fully_shard`` (one AdamW step, so optimizer state
exists) or with explicit DTensors on 1-D and 2-D device meshes. Next to each checkpoint, rank 0
writes the references the tests compare against:

- ``reference.safetensors``: the full, unsharded state dict (``full_state_dict=True``), written by
  ``safetensors.torch.save_file`` (tied weights cloned, so both names are present);
- ``hf/`` (or the NeMo RL ``tokenizer/`` folder): ``config.json``, ``generation_config.json`` with
  a multi-EOS list, and a real tiny tokenizer with a chat template;
- ``logits.pt``: logits of the unsharded model (loaded from the full state dict) on ``input_ids``;
- ``meta.json``: what the case is (arch, dtype, tied, world size, wrapper, DCP folders).

Usage::

    OMP_NUM_THREADS=1 python tests/data/make_fixtures.py OUT [--ws 1 2 3 4]

One process group per world size (``torch.multiprocessing.spawn``, gloo on 127.0.0.1 with a free
port) writes all the checkpoints of that world size. ``OUT/done.json`` is written last.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

SEED = 1234
INPUT_IDS = [[1, 5, 9, 17, 33, 2, 64, 100], [7, 3, 11, 90, 45, 6, 12, 1]]
STEP_DIR = "step_3"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a checkpoint is a set of tensors written by many ranks",
    "fastckpt converts distributed checkpoints into hugging face folders",
    "every byte must match the tensors torch wrote",
    "hello world hello tensors hello ranks",
]


# ---------------------------------------------------------------------------------------------
# Case descriptions
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelCase:
    """A tiny transformers model trained one step under FSDP2 and saved with DCP."""

    name: str
    arch: str  # "llama" | "qwen2"
    dtype: str  # "float32" | "bfloat16"
    tied: bool
    wrapper: str  # "nemo" | "rlinf" | "prime"
    hidden: int = 32
    vocab: int = 128
    intermediate: int = 88
    layout: str = "plain"  # "plain": case/<variant>/ + case/hf/; "nemo": step_3/policy/...
    # DCP folder name -> writer options ("thread_count", "single_file_per_rank",
    # "use_collectives")
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"dcp": {}})
    extra_rng: bool = False


@dataclass
class DTensorCase:
    """Explicit DTensors (1-D and, at world size 4, 2-D meshes) and odd plain tensors."""

    name: str
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"dcp": {}})


CASES: dict[int, list[ModelCase | DTensorCase]] = {
    1: [ModelCase("llama_tied_fp32_ws1", "llama", "float32", tied=True, wrapper="nemo")],
    2: [
        ModelCase(
            "nemo_llama_untied_fp32_ws2",
            "llama",
            "float32",
            tied=False,
            wrapper="nemo",
            layout="nemo",
            extra_rng=True,
        ),
        ModelCase(
            "llama_tied_bf16_ws2",
            "llama",
            "bfloat16",
            tied=True,
            wrapper="nemo",
            variants={
                "dcp": {},
                "dcp_threads2": {"thread_count": 2},
                "dcp_per_item": {"single_file_per_rank": False},
                "dcp_nocoll": {"use_collectives": False},
            },
        ),
        ModelCase("rlinf_llama_untied_bf16_ws2", "llama", "bfloat16", tied=False, wrapper="rlinf"),
    ],
    3: [
        ModelCase(
            "llama_odd_fp32_ws3",
            "llama",
            "float32",
            tied=False,
            wrapper="nemo",
            hidden=48,
            vocab=130,
            intermediate=88,
        ),
        ModelCase(
            "prime_qwen2_tied_fp32_ws3",
            "qwen2",
            "float32",
            tied=True,
            wrapper="prime",
            hidden=48,
            vocab=130,
            intermediate=88,
        ),
        ModelCase("qwen2_untied_bf16_ws3", "qwen2", "bfloat16", tied=False, wrapper="nemo"),
        DTensorCase("dtensor_ws3"),
    ],
    4: [DTensorCase("dtensor_ws4", variants={"dcp": {}, "dcp_nocoll": {"use_collectives": False}})],
}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _save(state: dict[str, Any], path: Path, options: dict[str, Any]) -> None:
    opts = dict(options)
    use_collectives = opts.pop("use_collectives", True)
    writer = dcp.FileSystemWriter(str(path), **opts)
    dcp.save(state, storage_writer=writer, use_collectives=use_collectives)
    dist.barrier()


def _write_reference(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # clone: tied weights share storage, which save_file refuses; contiguous: transposed views
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path))


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=100, special_tokens=specials)
    tok.train_from_iterator(SENTENCES, trainer=trainer)
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


def _write_side_files(config: Any, hf_dir: Path) -> None:
    from transformers import GenerationConfig

    hf_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(hf_dir)
    _tokenizer().save_pretrained(hf_dir)
    gen = GenerationConfig(bos_token_id=2, eos_token_id=[3, 5], pad_token_id=0, max_new_tokens=16)
    gen.save_pretrained(hf_dir)
    if not (hf_dir / "chat_template.jinja").exists():  # older transformers keep it in the json
        (hf_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def _make_config(case: ModelCase) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=case.vocab,
        hidden_size=case.hidden,
        intermediate_size=case.intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=case.tied,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    config = LlamaConfig(**common) if case.arch == "llama" else Qwen2Config(**common)
    config.dtype = case.dtype
    return config


def _model_class(arch: str) -> Any:
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    return LlamaForCausalLM if arch == "llama" else Qwen2ForCausalLM


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def write_model_case(case: ModelCase, ws: int, root: Path) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    dtype = getattr(torch, case.dtype)
    config = _make_config(case)
    torch.manual_seed(SEED)
    model = _model_class(case.arch)(config).to(dtype)

    mesh = init_device_mesh("cpu", (ws,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1.0 / (step + 1))
    gen = torch.Generator().manual_seed(SEED + 1)
    batch = torch.randint(0, case.vocab, (2, 12), generator=gen)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optim.step()
    sched.step()
    optim.zero_grad()

    model_sd, optim_sd = get_state_dict(model, optim)
    if case.wrapper == "nemo":
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd, "sched": sched.state_dict()}
        if case.extra_rng:
            state["extra"] = {"rng": torch.get_rng_state(), "step": 3}
    elif case.wrapper == "rlinf":
        state = {
            "fsdp_checkpoint": {
                "model": model_sd,
                "optimizers": optim_sd,
                "lr_schedulers": sched.state_dict(),
                "fsdp_version": 2,
            }
        }
    elif case.wrapper == "prime":
        state = {
            "app": {
                "model": model_sd,
                "optimizers": optim_sd,
                "scheduler": sched.state_dict(),
                "progress": {"step": 3, "total_tokens": 1024},
            }
        }
    else:
        raise ValueError(case.wrapper)

    case_dir = root / case.name
    if case.layout == "nemo":
        policy = case_dir / STEP_DIR / "policy"
        dcp_dirs = {"dcp": policy / "weights"}
        hf_dir = policy / "tokenizer"
    else:
        dcp_dirs = {v: case_dir / v for v in case.variants}
        hf_dir = case_dir / "hf"
    variants = {"dcp": {}} if case.layout == "nemo" else case.variants
    for vname, options in variants.items():
        _save(state, dcp_dirs[vname], options)

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if rank == 0:
        _write_reference(full, case_dir / "reference.safetensors")
        _write_side_files(config, hf_dir)
        plain = _model_class(case.arch)(config).to(dtype)
        missing, unexpected = plain.load_state_dict(full, strict=True)
        assert not missing and not unexpected, (missing, unexpected)
        plain.eval()
        with torch.no_grad():
            logits = plain(input_ids=torch.tensor(INPUT_IDS)).logits
        torch.save(logits, case_dir / "logits.pt")
        meta = {
            "kind": "model",
            "name": case.name,
            "arch": case.arch,
            "dtype": case.dtype,
            "tied": case.tied,
            "wrapper": case.wrapper,
            "world_size": ws,
            "layout": case.layout,
            "dcp": {v: str(p.relative_to(case_dir)) for v, p in dcp_dirs.items()},
            "writer_options": {v: variants[v] for v in dcp_dirs},
            "hf": str(hf_dir.relative_to(case_dir)),
            "input_ids": INPUT_IDS,
            "model_keys": list(full),
            "checkpoint_keys": sorted(_flat_keys(state)),
        }
        (case_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    dist.barrier()


def _flat_keys(state: Any, prefix: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(state, dict):
        for k, v in state.items():
            out += _flat_keys(v, f"{prefix}{k}.")
    elif isinstance(state, list | tuple) and not isinstance(state, torch.Tensor):
        for i, v in enumerate(state):
            out += _flat_keys(v, f"{prefix}{i}.")
    else:
        out.append(prefix[:-1])
    return out


def write_dtensor_case(case: DTensorCase, ws: int, root: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(SEED + ws)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    mesh1 = init_device_mesh("cpu", (ws,))
    full: dict[str, torch.Tensor] = {
        # Shard(0), uneven: ceil(10/ws) rows per rank, the tail rank gets less
        "shard0_uneven": randn(10, 3, dtype=torch.bfloat16),
        # fewer rows than ranks at ws >= 3 -> a zero-size chunk at offset = dim size
        "few_rows": randn(ws - 1, 5),
        # Shard(1), uneven widths
        "shard1": randn(4, 10),
        "shard1_f16": randn(5, 7, dtype=torch.float16),
        "shard0_i64": torch.arange(22, dtype=torch.int64).reshape(11, 2) * 7 - 40,
    }
    placements: dict[str, tuple[Any, Any]] = {
        "shard0_uneven": (mesh1, [Shard(0)]),
        "few_rows": (mesh1, [Shard(0)]),
        "shard1": (mesh1, [Shard(1)]),
        "shard1_f16": (mesh1, [Shard(1)]),
        "shard0_i64": (mesh1, [Shard(0)]),
    }
    if ws == 4:
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        full.update(
            {
                "blocks": randn(6, 8),
                "blocks_uneven": randn(7, 9),
                "rep_s1": randn(6, 8, dtype=torch.bfloat16),
                "s0s0": randn(6, 8, dtype=torch.float16),
                "s1_rep": randn(5, 6, dtype=torch.float64),
            }
        )
        placements.update(
            {
                "blocks": (mesh2, [Shard(0), Shard(1)]),
                "blocks_uneven": (mesh2, [Shard(0), Shard(1)]),
                "rep_s1": (mesh2, [Replicate(), Shard(1)]),
                "s0s0": (mesh2, [Shard(0), Shard(0)]),
                "s1_rep": (mesh2, [Shard(1), Replicate()]),
            }
        )
    model: dict[str, Any] = {
        name: distribute_tensor(full[name], mesh, pl) for name, (mesh, pl) in placements.items()
    }

    # plain tensors, identical on every rank (written once, by whichever rank the planner picks)
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) * 0.5 - 1.0
    plain = {
        "transposed": base.t(),  # shape (4, 3), strides (1, 4): not row-major
        "sliced": torch.arange(100, dtype=torch.float32)[10:20],
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 5),
        "ids_i64": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
        "ids_i32": torch.arange(6, dtype=torch.int32) - 2,
        "mask": torch.tensor([[True, False, True], [False, False, True]]),
        "bytes_u8": torch.arange(0, 250, 10, dtype=torch.uint8),
        "half": torch.linspace(-2, 2, 9).to(torch.float16),
    }
    model.update(plain)
    full.update(plain)
    nested = {"a": {"b": randn(3, 2), "c": {"d": torch.tensor([1, 2, 3], dtype=torch.int64)}}}
    model["nested"] = nested
    full["nested.a.b"] = nested["a"]["b"]
    full["nested.a.c.d"] = nested["a"]["c"]["d"]

    state = {"model": model, "extra": {"note": "not a tensor", "step": 5, "lrs": [0.1, 0.2]}}
    case_dir = root / case.name
    for vname, options in case.variants.items():
        _save(state, case_dir / vname, options)
    if rank == 0:
        _write_reference(full, case_dir / "reference.safetensors")
        meta = {
            "kind": "dtensor",
            "name": case.name,
            "world_size": ws,
            "dcp": {v: v for v in case.variants},
            "writer_options": case.variants,
            "hf": None,
            "model_keys": list(full),
            "checkpoint_keys": sorted(_flat_keys(state)),
        }
        (case_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    dist.barrier()


# ---------------------------------------------------------------------------------------------
# Process groups
# ---------------------------------------------------------------------------------------------


def _worker(rank: int, ws: int, port: int, root: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ws)
    try:
        for case in CASES[ws]:
            if isinstance(case, ModelCase):
                write_model_case(case, ws, Path(root))
            else:
                write_dtensor_case(case, ws, Path(root))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--ws", type=int, nargs="*", default=sorted(CASES))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for ws in args.ws:
        mp.spawn(_worker, args=(ws, _free_port(), str(args.out)), nprocs=ws, join=True)
    done = {
        "torch": torch.__version__,
        "cases": [c.name for ws in args.ws for c in CASES[ws]],
    }
    (args.out / "done.json").write_text(json.dumps(done, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
