"""Write real DeepSpeed ZeRO checkpoints, as OpenRLHF saves them, for ``tests/test_deepspeed.py``.

DeepSpeed itself trains a tiny ``transformers`` Llama for one step on a CPU gloo group of two
spawned processes and calls ``engine.save_checkpoint(<case>/_actor, tag="global_stepN")``, exactly
as OpenRLHF's ``strategy.save_ckpt`` does: ``_actor/latest``, ``_actor/global_stepN/`` with
``mp_rank_00_model_states.pt`` (ZeRO 1/2) or ``zero_pp_rank_R_mp_rank_00_model_states.pt``
(ZeRO-3) and ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``.

The model covers what the reader must handle:

- odd element counts (hidden size 27, intermediate 45, vocabulary 67), so ZeRO-2 groups end in
  alignment padding and ZeRO-3 parameters in per-parameter padding, and parameters straddle the
  rank partitions;
- two optimizer parameter groups (decay / no decay, as OpenRLHF builds them);
- a frozen parameter (``model.layers.0.mlp.up_proj.weight``);
- tied embeddings (``lm_head.weight`` is a ``shared_params`` alias of the embedding);
- persistent buffers, one float and one int64;
- ``z2_lora_fp32``: the same model wrapped by PEFT (``LoraConfig(r=4, lora_alpha=8)`` on q/v,
  as OpenRLHF's ``--lora_rank`` does), trained under ZeRO-2; its reference is PEFT's own
  ``merge_and_unload()`` of the trained module (``ref/peft_merged.safetensors``).

Beside each run: ``ref/zero_to_fp32.safetensors`` (DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint`` on the run, each tensor cloned),
``ref/module.safetensors`` (ZeRO 1/2: ``engine.module.state_dict()`` on rank 0 after the last
step; 16-bit params under bf16), ``ref/optimizer.safetensors`` (``state.<name>.exp_avg`` and
``.exp_avg_sq`` of every trainable parameter from DeepSpeed's own
``deepspeed.utils.safe_get_full_optimizer_state`` after the last step) and ``meta.json``.
``OUT/done.json`` is written last.

DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op at ``init_distributed``
(``deepspeed.comm.torch.build_shm_op``: ~35 s with a C++ compiler, and its vector kernels need
AVX2/AVX-512). The generator replaces that hook with ``None`` so collectives go through gloo:
the saved layout is the same, no compiler is needed.

Usage::

    OMP_NUM_THREADS=1 python tests/data/make_deepspeed_fixtures.py OUT
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DS_BUILD_OPS", "0")

import torch
import torch.multiprocessing as mp

SEED = 1234
WS = 2
INPUT_IDS = [[1, 5, 9, 17, 33, 2, 60, 66], [7, 3, 11, 50, 45, 6, 12, 1]]
FROZEN = "model.layers.0.mlp.up_proj.weight"

#: name -> (zero stage, bf16, tied, steps saved)
CASES: dict[str, tuple[int, bool, bool, int]] = {
    "z1_bf16": (1, True, True, 1),
    "z2_bf16": (2, True, True, 2),
    "z3_bf16": (3, True, True, 1),
    "z2_fp32": (2, False, False, 1),
    "z3_fp32": (3, False, False, 1),
    "z2_lora_fp32": (2, False, False, 1),
}
#: cases trained as a PEFT LoRA model (OpenRLHF --lora_rank): r=4, alpha=8 on q/v projections
LORA_CASES = {"z2_lora_fp32"}
LORA_ALPHA = 8


def _config(tied: bool) -> Any:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=67,
        hidden_size=27,
        intermediate_size=45,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def _model(tied: bool, lora: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(_config(tied))
    model.model.register_buffer("fixture_scale", torch.linspace(0.5, 2.5, 5))
    model.model.register_buffer("fixture_count", torch.arange(3, dtype=torch.int64) + 7)
    model.get_parameter(FROZEN).requires_grad_(False)
    if lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=4, lora_alpha=LORA_ALPHA, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(model, cfg)
        for name, p in model.named_parameters():  # B starts at 0: make the merge visible
            if "lora_B" in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    return model


def _param_groups(model: Any) -> list[dict[str, Any]]:
    """OpenRLHF's ``get_optimizer_grouped_parameters``: no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if "norm" in name or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]


def _train_and_save(root: Path, name: str, stage: int, bf16: bool, tied: bool, steps: int) -> None:
    import deepspeed
    import torch.distributed as dist

    lora = name in LORA_CASES
    model = _model(tied, lora)
    optimizer = torch.optim.AdamW(_param_groups(model), lr=1e-2)
    ds_config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    ids = torch.tensor(INPUT_IDS)
    save_dir = root / name / "_actor"
    for step in range(1, steps + 1):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        engine.save_checkpoint(str(save_dir), tag=f"global_step{step}")
    # DeepSpeed's own view of the full (unpartitioned) Adam moments: a collective under ZeRO-3
    from deepspeed.utils import safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        # ZeRO 1/2 link each parameter to its optimizer state once, right after the first
        # group's first step, when later groups have no state yet (their fragments stay {});
        # link again now that every group has stepped (DeepSpeed's own linking function)
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    moments: dict[str, torch.Tensor] = {}
    for pname, p in [] if lora else engine.module.named_parameters():
        if not p.requires_grad:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            full = safe_get_full_optimizer_state(p, key)
            if full is None:
                raise SystemExit(f"{name}: no {key} for {pname}")
            moments[f"state.{pname}.{key}"] = full.detach().clone().contiguous()
    if dist.get_rank() == 0:
        from safetensors.torch import save_file

        ref = root / name / "ref"
        ref.mkdir(parents=True, exist_ok=True)
        if stage < 3:
            state = engine.module.state_dict()
            save_file(
                {k: v.detach().clone().contiguous() for k, v in state.items()},
                str(ref / "module.safetensors"),
            )
        if lora:  # PEFT's own merge of the trained adapters (fp32 under ZeRO-2: the masters)
            import copy

            merged = copy.deepcopy(engine.module).merge_and_unload().state_dict()
            save_file(
                {k: v.detach().clone().contiguous() for k, v in merged.items()},
                str(ref / "peft_merged.safetensors"),
            )
        else:
            save_file(moments, str(ref / "optimizer.safetensors"))
        hf = root / name / f"global_step{steps}_hf"  # OpenRLHF --ckpt.save_hf folder (config only)
        _config(tied).save_pretrained(hf)
    dist.barrier()
    del engine


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WS),
        LOCAL_SIZE=str(WS),
    )
    torch.set_num_threads(1)
    import importlib

    import deepspeed

    # ``deepspeed.comm.torch`` as an attribute is the torch module (star import): go by name
    backend = importlib.import_module("deepspeed.comm.torch")
    backend.build_shm_op = lambda: None  # gloo collectives; no JIT C++ build
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        for name, (stage, bf16, tied, steps) in CASES.items():
            _train_and_save(Path(root), name, stage, bf16, tied, steps)
    except BaseException:  # the peer would wait forever in a collective: fail loudly, now
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    finally:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reference(root: Path, name: str, stage: int, bf16: bool, tied: bool, steps: int) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    run = root / name
    state = get_fp32_state_dict_from_zero_checkpoint(str(run / "_actor"))
    save_file(
        {k: v.detach().clone().contiguous() for k, v in state.items()},
        str(run / "ref" / "zero_to_fp32.safetensors"),
    )
    fields = {
        "name": name,
        "stage": stage,
        "bf16": bf16,
        "tied": tied,
        "world_size": WS,
        "latest": f"global_step{steps}",
        "frozen": FROZEN,
        "buffers": ["model.fixture_scale", "model.fixture_count"],
        "reference_keys": list(state),
    }
    (run / "meta.json").write_text(json.dumps(fields, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(_free_port(), str(args.out)), nprocs=WS, join=True)
    for name, spec in CASES.items():
        _reference(args.out, name, *spec)
    import deepspeed

    done = {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "cases": list(CASES)}
    (args.out / "done.json").write_text(json.dumps(done, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
