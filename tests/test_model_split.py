"""Which DCP entries are model weights: never a trainer group, and a refusal (whose advice works)
when it cannot be told.

The checkpoints are written by ``torch.distributed.checkpoint.save`` in the shape torchtitan's
``CheckpointManager`` gives it: the model's keys at the top level beside ``optimizer``,
``lr_scheduler``, ``train_state`` and ``dataloader`` groups (the minimal case of the issue; a
checkpoint from torchtitan's own code is still to come).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastckpt
import pytest
from conftest import assert_bit_equal, load_output
from fastckpt import FormatError
from fastckpt.cli import app
from typer.testing import CliRunner


def _model() -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(5)
    return {
        "tok_embeddings.weight": torch.randn(11, 4, generator=g),
        "layers.0.attention.wq.weight": torch.randn(4, 4, generator=g),
        "norm.weight": torch.randn(4, generator=g).to(torch.bfloat16),
        "output.weight": torch.randn(11, 4, generator=g),
    }


def _titan_like(tmp_path: Path, step: int = 3) -> tuple[Path, dict[str, Any]]:
    import torch
    import torch.distributed.checkpoint as dcp

    model = _model()
    state = {
        **model,
        "optimizer": {
            "state": {
                k: {"exp_avg": torch.zeros_like(v), "step": torch.tensor(3.0)}
                for k, v in model.items()
            },
            "param_groups": [{"lr": 1e-3, "params": list(model)}],
        },
        "lr_scheduler": {"last_epoch": step, "base_lrs": torch.tensor([1e-3])},
        "train_state": {"step": torch.tensor(3)},
        "dataloader": {"cursor": torch.tensor([7, 9])},
    }
    src = tmp_path / "checkpoint" / f"step-{step}"
    dcp.save(state, checkpoint_id=src, no_dist=True)
    return src, model


def test_trainer_groups_are_never_model_weights(tmp_path: Path) -> None:
    """It used to write the optimizer moments and train_state.step into model.safetensors."""
    src, model = _titan_like(tmp_path)
    out = tmp_path / "out"
    report = fastckpt.convert(src, out, fsync=False)
    got = load_output(out)
    assert sorted(got) == sorted(model)
    assert report.n_tensors == len(model)
    for name, t in model.items():
        assert_bit_equal(got[name], t, name)
    skipped = fastckpt.inspect(src).skipped
    assert any(k.startswith("optimizer.state.") for k in skipped)
    assert "train_state.step" in skipped


def _unclear(tmp_path: Path) -> Path:
    import torch
    import torch.distributed.checkpoint as dcp

    state = {
        "encoder": {"w": torch.ones(2, 2)},
        "decoder": {"w": torch.zeros(3)},
        "optimizer": {"state": {"encoder.w": {"exp_avg": torch.ones(2, 2)}}},
    }
    src = tmp_path / "unclear"
    dcp.save(state, checkpoint_id=src, no_dist=True)
    return src


def test_unclear_split_is_refused_and_include_works(tmp_path: Path) -> None:
    src = _unclear(tmp_path)
    with pytest.raises(FormatError, match=r"cannot tell .*groups: decoder, encoder, optimizer"):
        fastckpt.convert(src, tmp_path / "out", fsync=False)
    assert not (tmp_path / "out").exists()
    # the advice of the message works, in the API and on the command line
    report = fastckpt.convert(src, tmp_path / "api", include=[r"^(encoder|decoder)\."], fsync=False)
    assert report.n_tensors == 2
    assert sorted(load_output(tmp_path / "api")) == ["decoder.w", "encoder.w"]
    r = CliRunner().invoke(
        app,
        [
            "convert",
            str(src),
            str(tmp_path / "cli"),
            "--include",
            ".*",
            "--exclude",
            "^optimizer",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    assert sorted(load_output(tmp_path / "cli")) == ["decoder.w", "encoder.w"]
    info = fastckpt.inspect(src)
    assert not info.tensors and any("cannot tell" in n for n in info.notes)


def test_torchtitan_run_latest_with_optimizer_and_a_name_warning(tmp_path: Path) -> None:
    """dump_folder/checkpoint/step-N/ is a run; the optimizer comes from optimizer.state.*; the
    names stay torchtitan's, and the report says so."""
    _titan_like(tmp_path, step=3)
    _, model = _titan_like(tmp_path, step=6)
    doc = fastckpt.runs.listing(tmp_path)
    assert doc["layout"] == "torchtitan" and doc["latest"] == 6
    out = tmp_path / "out"
    report = fastckpt.convert(tmp_path, out, with_optimizer=True, fsync=False)
    assert any("step 6" in n for n in report.notes)
    assert any("torchtitan's" in w and "cannot load" in w for w in report.warnings)
    from safetensors.torch import load_file

    assert sorted(load_file(out / "model.safetensors")) == sorted(model)
    optim = load_file(out / "optimizer.safetensors")
    assert sorted(optim) == sorted(f"state.{k}.{n}" for k in model for n in ("exp_avg", "step"))
