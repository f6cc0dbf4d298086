"""Write real ``torch.save`` checkpoints for ``tests/test_torch_save.py``.

Every file is written by torch itself on a CPU gloo group:

- veRL-style per-rank files: each rank calls ``torch.save(model.state_dict(),
  f"model_world_size_{W}_rank_{R}.pt")`` exactly as veRL's FSDP checkpoint manager does, for
  FSDP2 (``fully_shard``) and FSDP1 (``FullyShardedDataParallel(device_mesh=...)`` with
  ``StateDictType.SHARDED_STATE_DICT``) at world sizes 1, 2 and 3, HSDP (``("ddp", "fsdp")``) at
  4, a critic (``AutoModelForTokenClassification``, one label), with ``fsdp_config.json`` and
  ``huggingface/`` beside them;
- DTensor geometry cases (uneven and empty tail shards, ``Shard(1)``, ``Shard(-1)``, nested shards
  on a 2-D mesh, ``Replicate``, plain and 0-d replicas) and refusal cases (``Partial``, FSDP1
  ``LOCAL_STATE_DICT`` flat parameters, plain tensors that differ between ranks), and FSDP1
  ``SHARDED_STATE_DICT`` without a mesh (``ShardedTensor`` values, read);
- whole-file state dicts: RLinf ``model_state_dict/full_weights.pt`` (``_orig_mod.``,
  ``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.`` prefixes), ``pytorch_model.bin`` of a
  tied model under ``module.``, views of one storage, old prime-rl ``trainer.pt`` and
  ``trainer_{R}.pt`` (``{"model", "optimizers", "progress": <dataclass>}``).

Next to each case: ``ref/model.safetensors`` (the unsharded state dict, tensors cloned) and
``meta.json``; ``logits.pt`` where a transformers check is wanted.

Usage::

    OMP_NUM_THREADS=1 python tests/data/make_torch_save_fixtures.py OUT [--ws 1 2 3 4]

One process group per world size (``torch.multiprocessing.spawn``, gloo on 127.0.0.1) writes all
the cases of that world size. ``OUT/done.json`` is written last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import types
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SEED = 4321
INPUT_IDS = [[1, 5, 9, 17, 33, 2, 60, 66], [7, 3, 11, 50, 45, 6, 12, 1]]
VOCAB = 67  # odd: uneven Shard(0) pieces at every world size > 1


# ---------------------------------------------------------------------------------------------
# old prime-rl's Progress dataclass, importable as prime_rl.trainer.ckpt.Progress for pickling


@dataclasses.dataclass
class Progress:
    step: int = 0
    total_tokens: int = 0
    total_samples: int = 0


def _install_prime_module() -> None:
    for name in ("prime_rl", "prime_rl.trainer", "prime_rl.trainer.ckpt"):
        sys.modules.setdefault(name, types.ModuleType(name))
    mod = sys.modules["prime_rl.trainer.ckpt"]
    Progress.__module__ = "prime_rl.trainer.ckpt"
    mod.Progress = Progress  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# models


def _config(arch: str, *, tied: bool, dtype: str, labels: int | None = None) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    if labels is not None:
        common["num_labels"] = labels
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    config.dtype = dtype
    prefix = "Llama" if arch == "llama" else "Qwen2"
    config.architectures = [prefix + ("ForTokenClassification" if labels else "ForCausalLM")]
    return config


def _model(arch: str, *, tied: bool, dtype: str, critic: bool = False) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    config = _config(arch, tied=tied, dtype=dtype, labels=1 if critic else None)
    torch.manual_seed(SEED)
    cls = AutoModelForTokenClassification if critic else AutoModelForCausalLM
    model = cls.from_config(config).to(getattr(torch, dtype))
    return model, config


def _clone_sd(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _write_ref(case_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    (case_dir / "ref").mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().clone().contiguous() for k, v in tensors.items()},
        str(case_dir / "ref" / "model.safetensors"),
    )


def _write_hf(config: Any, hf_dir: Path) -> None:
    from transformers import GenerationConfig

    hf_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(hf_dir)
    GenerationConfig(bos_token_id=2, eos_token_id=[3, 5], pad_token_id=0).save_pretrained(hf_dir)
    (hf_dir / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 64, "chat_template": "{{ messages }}"}, indent=2) + "\n"
    )


def _logits(model: Any, path: Path) -> None:
    model.eval()
    with torch.no_grad():
        torch.save(model(input_ids=torch.tensor(INPUT_IDS)).logits, path)


def _meta(case_dir: Path, **fields: Any) -> None:
    (case_dir / "meta.json").write_text(json.dumps(fields, indent=2))


# ---------------------------------------------------------------------------------------------
# per-rank cases


def _rank_path(case_dir: Path, ws: int) -> Path:
    return case_dir / f"model_world_size_{ws}_rank_{dist.get_rank()}.pt"


def write_verl_case(
    root: Path,
    name: str,
    *,
    ws: int,
    fsdp: int,
    arch: str,
    tied: bool,
    dtype: str,
    critic: bool = False,
    hsdp: bool = False,
    logits: bool = False,
) -> None:
    """One veRL actor (or critic) folder: per-rank model files, fsdp_config.json, huggingface/."""
    from torch.distributed.device_mesh import init_device_mesh

    rank = dist.get_rank()
    case_dir = root / name
    model, config = _model(arch, tied=tied, dtype=dtype, critic=critic)
    reference = _clone_sd(model)
    if hsdp:
        mesh = init_device_mesh("cpu", (2, ws // 2), mesh_dim_names=("ddp", "fsdp"))
    else:
        mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("fsdp",))
    if fsdp == 2:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        state = model.state_dict()
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy, StateDictType

        strategy = ShardingStrategy.HYBRID_SHARD if hsdp else ShardingStrategy.FULL_SHARD
        wrapped = FSDP(
            model,
            device_mesh=mesh,
            use_orig_params=True,
            device_id=torch.device("cpu"),
            sharding_strategy=strategy,
        )
        with FSDP.state_dict_type(wrapped, StateDictType.SHARDED_STATE_DICT):
            state = wrapped.state_dict()
    if rank == 0:
        case_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    torch.save(state, _rank_path(case_dir, ws))
    if rank == 0:
        (case_dir / "fsdp_config.json").write_text(
            json.dumps({"FSDP_version": fsdp, "world_size": ws}, indent=4)
        )
        _write_hf(config, case_dir / "huggingface")
        _write_ref(case_dir, reference)
        if logits:
            plain, _ = _model(arch, tied=tied, dtype=dtype, critic=critic)
            plain.load_state_dict(reference, strict=True)
            _logits(plain, case_dir / "logits.pt")
        _meta(
            case_dir, kind="verl", ws=ws, fsdp=fsdp, arch=arch, tied=tied, dtype=dtype,
            critic=critic, hsdp=hsdp, input_ids=INPUT_IDS, keys=list(reference),
        )  # fmt: skip
    dist.barrier()


def write_prime_ranks(root: Path, ws: int) -> None:
    """Old prime-rl ``trainer_{R}.pt``: {"model": FSDP2 DTensors, "optimizers", "progress"}."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _install_prime_module()
    rank = dist.get_rank()
    case_dir = root / f"prime_trainer_ws{ws}"
    model, _ = _model("qwen2", tied=True, dtype="float32")
    reference = _clone_sd(model)
    mesh = init_device_mesh("cpu", (ws,))
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: weights stay the reference
    if rank == 0:
        case_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = {
        "model": model.state_dict(),
        "optimizers": [optim.state_dict()],
        "scheduler": {"last_epoch": 3},
        "progress": Progress(step=3, total_tokens=4096, total_samples=12),
    }
    torch.save(state, case_dir / f"trainer_{rank}.pt")
    if rank == 0:
        _write_ref(case_dir, reference)
        _meta(case_dir, kind="prime_ranks", ws=ws, keys=list(reference))
    dist.barrier()


def write_geometry(root: Path, ws: int) -> None:
    """Explicit DTensors: every placement geometry fastckpt supports, and refused ones."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(SEED + ws)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    mesh1 = init_device_mesh("cpu", (ws,))
    full: dict[str, torch.Tensor] = {
        "few_rows": randn(ws - 1, 5),
        "odd_rows": randn(2 * ws + 1, 3, dtype=torch.bfloat16),
        "cols": randn(4, 3 * ws - 2),
        "last_dim": randn(2, 3, ws + 2),
        "replicated": randn(3, 3),
        "plain": randn(6),
        "scalar": torch.tensor(3.25),
        "int_buffer": torch.arange(10, dtype=torch.int64),
    }
    state: dict[str, Any] = {
        "few_rows": distribute_tensor(full["few_rows"], mesh1, [Shard(0)]),
        "odd_rows": distribute_tensor(full["odd_rows"], mesh1, [Shard(0)]),
        "cols": distribute_tensor(full["cols"], mesh1, [Shard(1)]),
        "last_dim": distribute_tensor(full["last_dim"], mesh1, [Shard(-1)]),
        "replicated": distribute_tensor(full["replicated"], mesh1, [Replicate()]),
        "plain": full["plain"].clone(),
        "scalar": full["scalar"].clone(),
        "int_buffer": full["int_buffer"].clone(),
    }  # fmt: skip
    if ws == 4:
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ddp", "fsdp"))
        more = {
            "nested_rows": (randn(9, 4), [Shard(0), Shard(0)]),
            "rows_cols": (randn(5, 7), [Shard(0), Shard(1)]),
            "hsdp_cols": (randn(3, 5), [Replicate(), Shard(1)]),
            "cols_rep": (randn(6, 3), [Shard(1), Replicate()]),
            "nested_short": (randn(3, 2), [Shard(0), Shard(0)]),
        }
        for key, (tensor, placements) in more.items():
            full[key] = tensor
            state[key] = distribute_tensor(tensor, mesh2, placements)
    case_dir = root / f"geometry_ws{ws}"
    if rank == 0:
        case_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    torch.save(state, _rank_path(case_dir, ws))

    # refused: a Partial placement (unreduced values)
    bad = root / f"partial_ws{ws}"
    if rank == 0:
        bad.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    partial = DTensor.from_local(randn(2, 3), mesh1, [Partial()], run_check=False)
    torch.save({"w": partial, "ok": state["cols"]}, _rank_path(bad, ws))

    # refused at conversion: a plain tensor that differs between ranks
    diff = root / f"plain_differs_ws{ws}"
    if rank == 0:
        diff.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    torch.save({"cols": state["cols"], "buf": torch.full((4,), float(rank))}, _rank_path(diff, ws))
    if rank == 0:
        _write_ref(case_dir, full)
        _meta(case_dir, kind="geometry", ws=ws, keys=list(full))
    dist.barrier()


def write_fsdp1_flat_and_sharded(root: Path, ws: int) -> None:
    """FSDP1 state dicts saved as veRL rank files: ``LOCAL_STATE_DICT`` (``_flat_param``
    ShardedTensors, refused) and ``SHARDED_STATE_DICT`` without a device mesh (``ShardedTensor``
    values: veRL FSDP1's default, older trainers; read, with ``ref/`` from FULL_STATE_DICT)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    rank = dist.get_rank()
    for name, kind, orig_params in (
        ("flat_param", StateDictType.LOCAL_STATE_DICT, False),
        ("sharded_tensor", StateDictType.SHARDED_STATE_DICT, True),
    ):
        model, _ = _model("llama", tied=False, dtype="float32")
        wrapped = FSDP(model, use_orig_params=orig_params, device_id=torch.device("cpu"))
        with FSDP.state_dict_type(wrapped, kind):
            state = wrapped.state_dict()
        full = None
        if kind == StateDictType.SHARDED_STATE_DICT:
            with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT):
                full = wrapped.state_dict()
        case_dir = root / f"{name}_ws{ws}"
        if rank == 0:
            case_dir.mkdir(parents=True, exist_ok=True)
            if full is not None:
                _write_ref(case_dir, full)
        dist.barrier()
        torch.save(state, _rank_path(case_dir, ws))
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# whole-file state dicts (rank 0 of the world-size-1 group)


def write_full_files(root: Path) -> None:
    _install_prime_module()

    # RLinf full_weights.pt: bf16 Qwen2, torch.compile + FSDP1 + activation-checkpoint prefixes
    model, config = _model("qwen2", tied=False, dtype="bfloat16")
    sd = model.state_dict()
    case_dir = root / "rlinf_full"
    wrapped = {}
    for key, value in sd.items():
        if key.startswith("model.layers."):
            head, num, rest = key.split(".", 3)[1:]
            key = f"model.{head}.{num}._fsdp_wrapped_module._checkpoint_wrapped_module.{rest}"
        wrapped["_orig_mod." + key] = value
    (case_dir / "model_state_dict").mkdir(parents=True, exist_ok=True)
    torch.save(wrapped, case_dir / "model_state_dict" / "full_weights.pt")
    _write_hf(config, case_dir / "huggingface")
    _write_ref(case_dir, sd)
    _logits(model, case_dir / "logits.pt")
    _meta(case_dir, kind="full", file="model_state_dict/full_weights.pt", keys=list(sd),
          input_ids=INPUT_IDS)  # fmt: skip

    # pytorch_model.bin of a tied Llama under DDP's "module." (embed and lm_head share storage)
    model, config = _model("llama", tied=True, dtype="float32")
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    case_dir = root / "bin_tied"
    case_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"module." + k: v for k, v in sd.items()}, case_dir / "pytorch_model.bin")
    _write_hf(config, case_dir / "hf")
    _write_ref(case_dir, sd)
    _meta(case_dir, kind="full", file="pytorch_model.bin", keys=list(sd))

    # views of one storage: transposed, sliced with an offset, a column, an expanded row
    gen = torch.Generator().manual_seed(SEED + 7)
    base = torch.randn(6, 5, generator=gen)
    views = {
        "base": base,
        "transposed": base.t(),
        "rows_2_5": base[2:5],
        "column_1": base[:, 1],
        "every_other": base[::2, 1::2],
        "expanded": base[0:1].expand(3, 5),
        "own": torch.arange(7, dtype=torch.int32),
    }
    case_dir = root / "views"
    case_dir.mkdir(parents=True, exist_ok=True)
    torch.save(views, case_dir / "views.pt")
    _write_ref(case_dir, views)
    _meta(case_dir, kind="full", file="views.pt", keys=list(views))

    # old prime-rl trainer.pt at W=1: FSDP2 DTensors on a 1-rank mesh + optimizer + Progress
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, config = _model("llama", tied=False, dtype="float32")
    reference = _clone_sd(model)
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    optim = torch.optim.AdamW(model.parameters(), lr=0.0)
    case_dir = root / "prime_trainer"
    case_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizers": [optim.state_dict()],
            "progress": Progress(step=7, total_tokens=100, total_samples=4),
        },
        case_dir / "trainer.pt",
    )
    _write_ref(case_dir, reference)
    _meta(case_dir, kind="full", file="trainer.pt", keys=list(reference))


# ---------------------------------------------------------------------------------------------
# process groups


def _cases(ws: int, root: Path) -> None:
    if ws == 1:
        write_verl_case(root, "verl_fsdp2_llama_ws1", ws=1, fsdp=2, arch="llama", tied=True,
                        dtype="float32")  # fmt: skip
        write_verl_case(root, "verl_fsdp1_qwen2_ws1", ws=1, fsdp=1, arch="qwen2", tied=False,
                        dtype="bfloat16")  # fmt: skip
        write_full_files(root)
    elif ws == 2:
        write_verl_case(root, "verl_fsdp2_qwen2_ws2", ws=2, fsdp=2, arch="qwen2", tied=False,
                        dtype="bfloat16", logits=True)  # fmt: skip
        write_verl_case(root, "verl_fsdp1_llama_ws2", ws=2, fsdp=1, arch="llama", tied=True,
                        dtype="float32")  # fmt: skip
        write_verl_case(root, "verl_critic_ws2", ws=2, fsdp=2, arch="llama", tied=False,
                        dtype="float32", critic=True)  # fmt: skip
        write_prime_ranks(root, 2)
        write_fsdp1_flat_and_sharded(root, 2)
    elif ws == 3:
        write_verl_case(root, "verl_fsdp2_llama_ws3", ws=3, fsdp=2, arch="llama", tied=False,
                        dtype="float32", logits=True)  # fmt: skip
        write_verl_case(root, "verl_fsdp1_qwen2_ws3", ws=3, fsdp=1, arch="qwen2", tied=True,
                        dtype="float32")  # fmt: skip
        write_geometry(root, 3)
    elif ws == 4:
        write_verl_case(root, "verl_hsdp_llama_ws4", ws=4, fsdp=2, arch="llama", tied=False,
                        dtype="float32", hsdp=True)  # fmt: skip
        write_geometry(root, 4)


def _worker(rank: int, ws: int, port: int, root: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=ws)  # fmt: skip
    try:
        _cases(ws, Path(root))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--ws", type=int, nargs="*", default=[1, 2, 3, 4])
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for ws in args.ws:
        mp.spawn(_worker, args=(ws, _free_port(), str(args.out)), nprocs=ws, join=True)
    done = {"torch": torch.__version__, "world_sizes": args.ws}
    (args.out / "done.json").write_text(json.dumps(done, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
