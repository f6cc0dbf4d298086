"""Write real training-run directories, one per framework layout, with real torch saves.

Usage: python tests/data/make_runs.py OUT

Every run has steps 10, 20, 30, 40 with different weights and ``val:reward`` 0.5, 0.9, 0.7 and
(missing) at step 40: best is 20, latest is 40. Each layout also has incomplete saves of its
framework's kind (step 50/60). ``OUT/refs/<run>/<step>.safetensors`` holds each step's model
weights (``safetensors.torch.save_file``) for comparison. ``OUT/manifest.json`` lists the runs.

Layouts (``formats/torch-pickles.md`` §5): NeMo RL (DCP ``{"model": sd}``), veRL FSDP (per-rank
``torch.save``), veRL Megatron (DCP under ``model/dist_ckpt`` + ``ckpt_contents.json``), RLinf (DCP
``{"fsdp_checkpoint": {"model": sd}}``), prime-rl (DCP ``{"app": {"model": sd}}``), OpenRLHF
(DeepSpeed-shaped ``mp_rank_00_model_states.pt``, ``metric.json``, ``latest``), Megatron (DCP
iteration folders + tracker). DCP saves are single-process ``torch.distributed.checkpoint.save``.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

warnings.filterwarnings("ignore")

STEPS = {10: 0.5, 20: 0.9, 30: 0.7, 40: None}


def state_dict(seed: int, *, critic: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "model.embed_tokens.weight": torch.randn(32, 8, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=g),
        "model.norm.weight": torch.randn(8, generator=g),
    }
    if critic:
        sd["score.weight"] = torch.randn(1, 8, generator=g)
    else:
        sd["lm_head.weight"] = torch.randn(32, 8, generator=g)
    return sd


def save_dcp(state: dict[str, object], path: Path, *, drop_metadata: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(state, checkpoint_id=str(path))
    if drop_metadata:
        (path / ".metadata").unlink()


def info(path: Path, step: int, metric: float | None, key: str = "val:reward") -> None:
    doc: dict[str, object] = {"step": step, "consumed_samples": step * 64, "train:loss": 1.0 / step}
    if metric is not None:
        doc[key] = metric
    path.mkdir(parents=True, exist_ok=True)
    (path / "training_info.json").write_text(json.dumps(doc))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    refs = out / "refs"
    manifest: dict[str, dict[str, object]] = {}

    def ref(run: str, step: int, sd: dict[str, torch.Tensor]) -> None:
        (refs / run).mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in sd.items()}, str(refs / run / f"{step}.safetensors")
        )

    # NeMo RL: step_N/{policy,value}/weights (DCP v1), tmp_step_50, a step without .metadata
    root = out / "nemo"
    for n, metric in STEPS.items():
        sd, vd = state_dict(1000 + n), state_dict(2000 + n, critic=True)
        save_dcp({"model": sd}, root / f"step_{n}" / "policy" / "weights")
        save_dcp({"model": vd}, root / f"step_{n}" / "value" / "weights")
        info(root / f"step_{n}", n, metric)
        ref("nemo", n, sd)
        ref("nemo-critic", n, vd)
    save_dcp({"model": state_dict(1050)}, root / "tmp_step_50" / "policy" / "weights")
    info(root / "tmp_step_50", 50, 0.99)
    save_dcp(
        {"model": state_dict(1060)}, root / "step_60" / "policy" / "weights", drop_metadata=True
    )
    info(root / "step_60", 60, 0.98)
    manifest["nemo"] = {"root": str(root), "latest": 40, "best": 20}

    # veRL FSDP: global_step_N/{actor,critic}/model_world_size_1_rank_0.pt, tracker 40
    root = out / "verl"
    for n, metric in {**STEPS, 50: 0.99}.items():
        sd = state_dict(3000 + n)
        for role, d in (("actor", sd), ("critic", state_dict(4000 + n, critic=True))):
            rd = root / f"global_step_{n}" / role
            rd.mkdir(parents=True)
            torch.save(d, rd / "model_world_size_1_rank_0.pt")
            (rd / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))
        info(root / f"global_step_{n}", n, metric)
        ref("verl", n, sd)
    (root / "latest_checkpointed_iteration.txt").write_text("40")
    manifest["verl"] = {"root": str(root), "latest": 40, "best": 20}

    # veRL Megatron (schema v2): ckpt_contents.json written last; step 30 lacks it
    root = out / "verl_megatron"
    for n, metric in {10: 0.5, 20: 0.9, 30: 0.95}.items():
        sd = state_dict(5000 + n)
        rd = root / f"global_step_{n}" / "actor"
        save_dcp({"model": sd}, rd / "model" / "dist_ckpt")
        if n != 30:
            (rd / "ckpt_contents.json").write_text(json.dumps({"schema_version": 2}))
        info(root / f"global_step_{n}", n, metric)
        ref("verl_megatron", n, sd)
    (root / "latest_checkpointed_iteration.txt").write_text("30")
    manifest["verl_megatron"] = {"root": str(root), "latest": 20, "best": 20}

    # RLinf: checkpoints/global_step_N/actor/dcp_checkpoint (fsdp_checkpoint.model.*)
    root = out / "rlinf"
    for n, metric in STEPS.items():
        sd = state_dict(6000 + n)
        save_dcp(
            {"fsdp_checkpoint": {"model": sd}},
            root / "checkpoints" / f"global_step_{n}" / "actor" / "dcp_checkpoint",
        )
        info(root / "checkpoints" / f"global_step_{n}", n, metric)
        ref("rlinf", n, sd)
    save_dcp(
        {"fsdp_checkpoint": {"model": state_dict(6050)}},
        root / "checkpoints" / "global_step_50" / "actor" / "dcp_checkpoint",
        drop_metadata=True,
    )
    manifest["rlinf"] = {"root": str(root), "latest": 40, "best": 20}

    # prime-rl: checkpoints/step_N/trainer (app.model.*)
    root = out / "prime"
    for n, metric in STEPS.items():
        sd = state_dict(7000 + n)
        save_dcp({"app": {"model": sd}}, root / "checkpoints" / f"step_{n}" / "trainer")
        info(root / "checkpoints" / f"step_{n}", n, metric)
        ref("prime", n, sd)
    save_dcp(
        {"app": {"model": state_dict(7050)}},
        root / "checkpoints" / "step_50" / "trainer",
        drop_metadata=True,
    )
    (root / "configs").mkdir()
    (root / "configs" / "trainer.json").write_text(json.dumps({"model": {"impl": "hf"}}))
    manifest["prime"] = {"root": str(root), "latest": 40, "best": 20}

    # OpenRLHF + DeepSpeed: _actor/global_stepN/, metric.json, latest; step 50 newer than latest
    root = out / "openrlhf"
    for n, metric in {**STEPS, 50: 0.99}.items():
        sd = state_dict(8000 + n)
        for role, d in (("_actor", sd), ("_critic", state_dict(8500 + n, critic=True))):
            tag = root / role / f"global_step{n}"
            tag.mkdir(parents=True)
            torch.save(
                {
                    "module": d,
                    "buffer_names": [],
                    "dp_world_size": 1,
                    "mp_world_size": 1,
                    "param_shapes": [{k: v.shape for k, v in d.items()}],
                    "ds_version": "0.16.0",
                },
                tag / "mp_rank_00_model_states.pt",
            )
            if metric is not None:
                (tag / "metric.json").write_text(
                    json.dumps({"metric_key": "eval_reward", "metric_value": metric})
                )
        ref("openrlhf", n, sd)
    for role in ("_actor", "_critic"):
        (root / role / "latest").write_text("global_step40")
    manifest["openrlhf"] = {"root": str(root), "latest": 40, "best": 20}

    # Megatron torch_dist-shaped iterations: tracker 40, iter 50 in progress; a run with no tracker
    for name, tracker in (("megatron", "40"), ("megatron_notracker", None)):
        root = out / name
        for n in (10, 20, 30, 40, 50):
            it = root / f"iter_{n:07d}"
            save_dcp(state_dict(9000 + n), it)
            (it / "metadata.json").write_text(
                json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1})
            )
        if tracker is not None:
            (root / "latest_checkpointed_iteration.txt").write_text(tracker)
    manifest["megatron"] = {"root": str(out / "megatron"), "latest": 40, "best": None}

    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (out / "done.json").write_text(json.dumps({"torch": torch.__version__}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
