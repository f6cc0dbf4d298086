"""A transformers ``Trainer`` output_dir is a run: ``ls``, ``--step latest|best|N``.

``tests/data/make_trainer_fixtures.py`` trains a tiny Llama with the Trainer itself (CPU, 8
steps, a checkpoint every 2) once per session, plainly (``model.safetensors`` per checkpoint)
and under FSDP1 with ``SHARDED_STATE_DICT`` on two gloo ranks (``pytorch_model_fsdp_0/`` and
``optimizer_0/`` per checkpoint, the full model at each save beside the run); every test runs
for both.
"""

from __future__ import annotations

import json
from pathlib import Path

import fastckpt
import pytest
from conftest import assert_bit_equal, generated
from fastckpt.cli import app
from fastckpt.runs import listing
from typer.testing import CliRunner

GENERATOR = Path(__file__).parent / "data" / "make_trainer_fixtures.py"


@pytest.fixture(scope="session")
def trainer_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated(tmp_path_factory, "trainer", GENERATOR, keep_env="FASTCKPT_TRAINER_FIXTURES")


@pytest.fixture(params=["plain", "fsdp1"])
def trainer_run(trainer_root: Path, request: pytest.FixtureRequest) -> Path:
    return trainer_root / "run" if request.param == "plain" else trainer_root / "fsdp1" / "run"


def _load(path: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return dict(load_file(path))


def _state(run: Path) -> dict[str, object]:
    return dict(json.loads((run / "checkpoint-8" / "trainer_state.json").read_text()))


def test_ls_lists_checkpoints_with_eval_metrics(trainer_run: Path) -> None:
    doc = listing(trainer_run)
    assert doc["layout"] == "trainer"
    assert [s["step"] for s in doc["steps"]] == [2, 4, 6, 8]
    assert all(s["complete"] for s in doc["steps"])
    assert all("eval_loss" in s["metrics"] for s in doc["steps"])
    assert doc["latest"] == 8
    assert doc["best"] == _state(trainer_run)["best_global_step"]
    r = CliRunner().invoke(app, ["ls", str(trainer_run)])
    assert r.exit_code == 0, r.output
    assert "eval_loss" in r.stdout and "…" not in r.stdout  # never squeezed when piped


@pytest.mark.parametrize("step", ["latest", "best", "4"])
def test_step_selection(trainer_run: Path, tmp_path: Path, step: str) -> None:
    want = {"latest": 8, "best": _state(trainer_run)["best_global_step"], "4": 4}[step]
    out = tmp_path / "out"
    ckpt = trainer_run / f"checkpoint-{want}"
    if (ckpt / "model.safetensors").exists():  # the plain run: the Trainer's own file
        report = fastckpt.convert(trainer_run, out, step=step, fsync=False)
        assert any(f"step {want} " in n for n in report.notes), report.notes
        assert (out / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
        assert (out / "config.json").read_bytes() == (ckpt / "config.json").read_bytes()
        return
    # FSDP1: the full model the ranks held at that save (the checkpoints carry no config.json)
    ref = trainer_run.parent / "ref"
    report = fastckpt.convert(trainer_run, out, step=step, config_from=ref, fsync=False)
    assert any(f"step {want} " in n for n in report.notes), report.notes
    model = _load(ref / f"checkpoint-{want}" / "model.safetensors")
    got = _load(out / "model.safetensors")
    assert sorted(got) == sorted(model) and report.n_tensors == len(model)
    for name, t in model.items():
        assert_bit_equal(got[name], t, name)
    assert (out / "config.json").read_bytes() == (ref / "config.json").read_bytes()


def test_best_by_a_named_metric_agrees_with_the_trainer(trainer_run: Path) -> None:
    """eval_loss, lower is better (what the Trainer used): the same step it recorded."""
    doc = listing(trainer_run, metric="eval_loss", higher_is_better=False)
    assert doc["best"] == _state(trainer_run)["best_global_step"]
    doc = listing(trainer_run, metric="eval_loss")  # a loss: lower is better by default
    assert doc["best"] == _state(trainer_run)["best_global_step"]
    assert doc["higher_is_better"] is False


def test_a_checkpoint_without_trainer_state_is_incomplete(
    trainer_run: Path, tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trainer_run, run)
    (run / "checkpoint-8" / "trainer_state.json").unlink()  # killed before the state was saved
    doc = listing(run)
    assert [s["step"] for s in doc["steps"] if not s["complete"]] == [8]
    assert doc["latest"] == 6
    r = CliRunner().invoke(app, ["convert", str(run), str(run / "checkpoint-9"), "-q"])
    assert r.exit_code == 1 and "would look like a step" in r.output
