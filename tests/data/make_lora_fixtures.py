"""Write real PEFT LoRA + optimizer checkpoints for ``tests/test_lora.py`` / ``test_optimizer.py``.

On a CPU gloo group at world size 2, each case builds a tiny Llama from a config, wraps it with
PEFT's ``get_peft_model`` (``LoraConfig(r=4, lora_alpha=8)``, and an rsLoRA bf16 variant), shards
it with FSDP2 (``fully_shard`` per layer and at the root), trains one AdamW step (so ``lora_B`` is
non-zero and the optimizer has ``exp_avg``/``exp_avg_sq``/``step``) and saves it three ways:

- ``dcp/``: ``dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(...)})``
  (FQN-keyed ``optim.state.<fqn>.exp_avg``);
- ``verl/``: veRL's layout, ``torch.save(model.state_dict())`` and
  ``torch.save(optim.state_dict())`` per rank (``model_world_size_2_rank_R.pt``,
  ``optim_world_size_2_rank_R.pt``), with
  ``fsdp_config.json``, ``lora_train_meta.json`` (fp32 case only) and ``huggingface/``;
- ``full/pytorch_model.bin``: the unsharded PEFT state dict (rank 0).

References written by rank 0 from the unsharded model (``get_model_state_dict`` /
``get_optimizer_state_dict`` with ``full_state_dict=True``): ``ref/peft.safetensors`` (every PEFT
tensor), ``ref/merged.safetensors`` (PEFT's own ``merge_and_unload``), ``ref/adapter/`` (PEFT's
``save_pretrained``), ``ref/optim.safetensors`` + ``ref/optim.json``, logits of the PEFT model.

Refusal cases: ``int_optim/`` (a DCP of the plain int-keyed ``optim.state_dict()``) and
``fsdp1_flat/`` (veRL rank files of FSDP1 ``use_orig_params=False``: flat optimizer states).

Usage::

    OMP_NUM_THREADS=1 python tests/data/make_lora_fixtures.py OUT
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
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

SEED = 1234
WS = 2
INPUT_IDS = [[1, 5, 9, 17, 33, 2, 60, 66], [7, 3, 11, 50, 45, 6, 12, 1]]
TARGETS = ["q_proj", "v_proj", "up_proj"]
CASES = {
    "lora_fp32": {"dtype": "float32", "rslora": False, "meta": True},
    "lora_rs_bf16": {"dtype": "bfloat16", "rslora": True, "meta": False},
}


def _config(dtype: str) -> Any:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=67,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    config.dtype = dtype
    config.architectures = ["LlamaForCausalLM"]
    return config


def _peft_model(dtype: str, rslora: bool) -> tuple[Any, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = _config(dtype)
    torch.manual_seed(SEED)
    base = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, use_rslora=rslora,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(base, lora), config


def _flat(optim_sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        f"state.{fqn}.{name}": value.detach().clone().contiguous()
        for fqn, states in optim_sd["state"].items()
        for name, value in states.items()
    }


def write_case(root: Path, name: str, dtype: str, rslora: bool, meta: bool) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    case = root / name
    model, config = _peft_model(dtype, rslora)
    mesh = init_device_mesh("cpu", (WS,), mesh_dim_names=("fsdp",))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor(INPUT_IDS)
    model(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    optim.zero_grad()

    if rank == 0:
        for sub in ("verl", "ref"):
            (case / sub).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = model.state_dict()
    osd = get_optimizer_state_dict(model, optim)
    dcp.save({"model": state, "optim": osd}, checkpoint_id=str(case / "dcp"))
    torch.save(state, case / "verl" / f"model_world_size_{WS}_rank_{rank}.pt")
    torch.save(optim.state_dict(), case / "verl" / f"optim_world_size_{WS}_rank_{rank}.pt")
    if name == "lora_fp32":  # refused: int-keyed optimizer state in DCP
        dcp.save({"model": state, "optim": optim.state_dict()},
                 checkpoint_id=str(root / "int_optim"))  # fmt: skip

    full_opts = StateDictOptions(full_state_dict=True)
    full = get_model_state_dict(model, options=full_opts)
    full_osd = get_optimizer_state_dict(model, optim, options=full_opts)
    if rank == 0:
        full = {k: v.detach().clone().contiguous() for k, v in full.items()}
        verl = case / "verl"
        (verl / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": WS}))
        if meta:
            (verl / "lora_train_meta.json").write_text(
                json.dumps({"r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM"})
            )
        config.save_pretrained(verl / "huggingface")
        if not meta:  # the training's PEFT config (use_rslora=True) beside the weights
            model.peft_config["default"].save_pretrained(str(verl / "huggingface"))
            model.peft_config["default"].save_pretrained(str(case / "huggingface"))
        (case / "full").mkdir()
        torch.save(full, case / "full" / "pytorch_model.bin")
        config.save_pretrained(case / "full")
        save_file(full, str(case / "ref" / "peft.safetensors"))
        save_file(_flat(full_osd), str(case / "ref" / "optim.safetensors"))
        groups = full_osd["param_groups"]
        (case / "ref" / "optim.json").write_text(json.dumps({"param_groups": groups}, default=str))

        fresh, _ = _peft_model(dtype, rslora)
        fresh.load_state_dict(full, strict=True)
        fresh.eval()
        with torch.no_grad():
            torch.save(fresh(input_ids=ids).logits, case / "ref" / "logits.pt")
        fresh.save_pretrained(case / "ref" / "adapter")
        merged = fresh.merge_and_unload()
        save_file(
            {k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()},
            str(case / "ref" / "merged.safetensors"),
        )
        (case / "meta.json").write_text(
            json.dumps(
                {
                    "dtype": dtype,
                    "rslora": rslora,
                    "r": 4,
                    "alpha": 8,
                    "targets": TARGETS,
                    "input_ids": INPUT_IDS,
                }
            )
        )
    dist.barrier()


def write_fsdp1_flat(root: Path) -> None:
    """veRL FSDP1 (use_orig_params=False): flat-parameter optimizer states (refused)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType
    from transformers import AutoModelForCausalLM

    rank = dist.get_rank()
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(_config("float32"))
    mesh = init_device_mesh("cpu", (WS,), mesh_dim_names=("fsdp",))
    wrapped = FSDP(model, device_mesh=mesh, use_orig_params=False, device_id=torch.device("cpu"))
    optim = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    ids = torch.tensor(INPUT_IDS)
    wrapped(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    with FSDP.state_dict_type(wrapped, StateDictType.SHARDED_STATE_DICT):
        state = wrapped.state_dict()
    case = root / "fsdp1_flat"
    if rank == 0:
        case.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    torch.save(state, case / f"model_world_size_{WS}_rank_{rank}.pt")
    torch.save(optim.state_dict(), case / f"optim_world_size_{WS}_rank_{rank}.pt")
    dist.barrier()


def _worker(rank: int, port: int, root: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WS)  # fmt: skip
    try:
        for name, opts in CASES.items():
            write_case(Path(root), name, **opts)
        write_fsdp1_flat(Path(root))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WS, join=True)
    (out / "done.json").write_text(json.dumps({"torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
