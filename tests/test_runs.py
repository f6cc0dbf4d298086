"""Training runs: discovery, latest/best/N, roles, incomplete saves, ``fastckpt ls`` and ``prune``.

The runs are written by ``tests/data/make_runs.py`` with real torch saves (single-process DCP,
per-rank ``torch.save``), one per framework layout: steps 10..40 with different weights, best
``val:reward`` at 20, latest 40 (which lacks the metric), and incomplete saves of each kind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import fastckpt
import pytest
from conftest import generated
from fastckpt.cli import app
from fastckpt.runs import is_run_dir, resolve_source, scan_run
from typer.testing import CliRunner

HERE = Path(__file__).parent
GENERATOR = HERE / "data" / "make_runs.py"
DCP_RUNS = ["nemo", "rlinf", "prime"]
ALL_RUNS = ["nemo", "verl", "rlinf", "prime", "openrlhf"]


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated(
        tmp_path_factory, "runs", GENERATOR, keep_env="FASTCKPT_RUNS_FIXTURES", timeout=600
    )


@pytest.fixture
def runs(runs_root: Path, tmp_path: Path) -> Path:
    """A private copy (tests that prune modify it)."""
    dst = tmp_path / "runs"
    shutil.copytree(runs_root, dst, symlinks=True)
    return dst


def ref(root: Path, run: str, step: int) -> Path:
    return root / "refs" / run / f"{step}.safetensors"


def _convertible(root: Path, run: str) -> bool:
    """DCP layouts convert today; torch.save layouts once their reader is in."""
    try:
        fastckpt.inspect(scan_run(root / run).latest().weights or root)
    except fastckpt.FastckptError:
        return False
    return True


# ---------------------------------------------------------------- discovery


@pytest.mark.parametrize("run", [*ALL_RUNS, "verl_megatron", "megatron"])
def test_discovery_latest_and_best(runs_root: Path, run: str) -> None:
    manifest = json.loads((runs_root / "manifest.json").read_text())[run]
    r = scan_run(runs_root / run)
    assert r.latest().step == manifest["latest"]
    if manifest["best"] is not None:
        best, _ = r.best()
        assert best.step == manifest["best"]
    # incomplete saves are listed, never chosen
    assert any(not s.complete for s in r.steps)
    assert all(s.weights is not None and s.weights.exists() for s in r.complete)


def test_nemo_layout_details(runs_root: Path) -> None:
    r = scan_run(runs_root / "nemo")
    assert r.layout == "nemo-rl" and r.role == "policy"
    steps = {s.step: s for s in r.steps}
    assert sorted(steps) == [10, 20, 30, 40, 50, 60]
    assert not steps[50].complete and "tmp_step_50" in (steps[50].reason or "")
    assert not steps[60].complete and ".metadata" in (steps[60].reason or "")
    assert steps[20].weights == runs_root / "nemo" / "step_20" / "policy" / "weights"
    assert steps[20].format == "dcp" and steps[20].size > 0
    assert steps[20].metrics["val:reward"] == 0.9
    assert r.default_metric == "val:reward"


def test_best_skips_missing_metric_with_warning(runs_root: Path) -> None:
    best, warnings = scan_run(runs_root / "nemo").best("val:reward")
    assert best.step == 20
    assert len(warnings) == 1 and "step 40" in warnings[0]


def test_lower_is_better_and_other_metric(runs_root: Path) -> None:
    r = scan_run(runs_root / "nemo")
    # train:loss = 1/step: lowest at the highest complete step (incomplete 50/60 never chosen)
    assert r.best("train:loss", higher_is_better=False)[0].step == 40
    assert r.best("train:loss", higher_is_better=True)[0].step == 10
    assert r.best("val:reward", higher_is_better=False)[0].step == 10
    with pytest.raises(fastckpt.FastckptError, match="no complete step has metric"):
        r.best("val:nothing")


def test_a_loss_ranks_ascending_by_default(runs_root: Path, tmp_path: Path) -> None:
    """Without a direction, lower is better for a loss/perplexity/error metric only."""
    from fastckpt.runs.model import higher_is_better_for

    r = scan_run(runs_root / "nemo")
    assert r.best("train:loss")[0].step == 40  # the lowest loss
    assert r.best("train:loss", higher_is_better=True)[0].step == 10  # overridable
    assert r.best("val:reward")[0].step == 20  # anything else: higher is better
    lower = ["eval_loss", "train/loss_mean", "val:perplexity", "val_ppl", "eval/wer", "nll_loss"]
    higher = ["val:reward", "eval_accuracy", "lower_bound", "answer_rate", "val/score"]
    assert [n for n in lower if higher_is_better_for(n)] == []
    assert [n for n in higher if not higher_is_better_for(n)] == []
    res = CliRunner().invoke(
        app,
        ["convert", str(runs_root / "nemo"), str(tmp_path / "o"), "--step", "best",
         "--metric", "train:loss"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "step 40 (best by train:loss = 0.025, lower is better)" in res.output
    assert fastckpt.verify(ref(runs_root, "nemo", 40), tmp_path / "o").ok
    res = CliRunner().invoke(app, ["ls", str(runs_root / "nemo"), "--metric", "train:loss"])
    assert "best by train:loss (lower is better): 40" in res.output
    res = CliRunner().invoke(
        app, ["ls", str(runs_root / "nemo"), "--metric", "train:loss", "--higher-is-better"]
    )
    assert "best by train:loss (higher is better): 10" in res.output


def test_ties_go_to_the_higher_step(runs: Path) -> None:
    info = runs / "nemo" / "step_30" / "training_info.json"
    doc = json.loads(info.read_text())
    doc["val:reward"] = 0.9  # ties with step 20
    info.write_text(json.dumps(doc))
    assert scan_run(runs / "nemo").best("val:reward")[0].step == 30
    assert scan_run(runs / "nemo").best("val:reward", higher_is_better=False)[0].step == 10


def test_roles(runs_root: Path) -> None:
    assert scan_run(runs_root / "nemo", role="critic").role == "value"
    assert scan_run(runs_root / "nemo", role="actor").role == "policy"
    assert scan_run(runs_root / "verl", role="critic").complete[0].weights == (
        runs_root / "verl" / "global_step_10" / "critic"
    )
    assert scan_run(runs_root / "openrlhf", role="critic").role == "_critic"
    assert scan_run(runs_root / "prime", role="policy").role == "trainer"
    with pytest.raises(fastckpt.FastckptError, match="no critic role"):
        scan_run(runs_root / "prime", role="critic")
    with pytest.raises(fastckpt.FastckptError, match="unknown role"):
        scan_run(runs_root / "nemo", role="judge")


def test_trackers(runs_root: Path) -> None:
    verl = {s.step: s for s in scan_run(runs_root / "verl").steps}
    assert not verl[50].complete and "latest_checkpointed_iteration" in (verl[50].reason or "")
    vm = {s.step: s for s in scan_run(runs_root / "verl_megatron").steps}
    assert not vm[30].complete and "ckpt_contents.json" in (vm[30].reason or "")
    assert vm[20].weights == runs_root / "verl_megatron/global_step_20/actor/model/dist_ckpt"
    ds = {s.step: s for s in scan_run(runs_root / "openrlhf").steps}
    assert not ds[50].complete and "latest" in (ds[50].reason or "")
    assert ds[20].metrics == {"eval_reward": 0.9}
    meg = scan_run(runs_root / "megatron")
    assert meg.tracker == 40 and meg.latest().weights == runs_root / "megatron" / "iter_0000040"
    # Megatron without its tracker: nothing is complete, nothing is chosen
    none = scan_run(runs_root / "megatron_notracker")
    assert not none.complete
    with pytest.raises(fastckpt.FastckptError, match="no complete checkpoint"):
        none.latest()


def test_tracker_pointing_at_incomplete_step_falls_back(runs: Path) -> None:
    # the tracker says 30 but step 30 lost its manifest: latest is the highest complete step
    assert scan_run(runs / "verl_megatron").latest().step == 20


def test_step_number_and_errors(runs_root: Path) -> None:
    r = scan_run(runs_root / "nemo")
    assert r.select(30)[0].step == 30 and r.select("10")[0].step == 10
    with pytest.raises(fastckpt.FastckptError, match="incomplete"):
        r.select(50)
    with pytest.raises(fastckpt.FastckptError, match="no step 70"):
        r.select(70)
    with pytest.raises(fastckpt.FastckptError, match="invalid step"):
        r.select("newest")


def test_checkpoint_is_not_a_run(runs_root: Path) -> None:
    weights = runs_root / "nemo" / "step_20" / "policy" / "weights"
    assert not is_run_dir(weights) and is_run_dir(runs_root / "nemo")
    assert resolve_source(weights).weights == weights
    with pytest.raises(fastckpt.FastckptError, match="need a run directory"):
        resolve_source(weights, step="best")


# ---------------------------------------------------------------- convert


@pytest.mark.parametrize("run", ALL_RUNS)
@pytest.mark.parametrize(("step", "expected"), [("best", 20), ("latest", 40), (30, 30), (None, 40)])
def test_convert_run_step(
    runs_root: Path, tmp_path: Path, run: str, step: Any, expected: int
) -> None:
    if run not in DCP_RUNS and not _convertible(runs_root, run):
        # discovery works; the reader for this layout's weights is not in yet
        with pytest.raises(fastckpt.FastckptError):
            fastckpt.convert(runs_root / run, tmp_path / "out", step=step)
        return
    report = fastckpt.convert(runs_root / run, tmp_path / "out", step=step)
    assert fastckpt.verify(ref(runs_root, run, expected), tmp_path / "out").ok
    other = 10 if expected != 10 else 20
    assert not fastckpt.verify(ref(runs_root, run, other), tmp_path / "out").ok
    assert f"step {expected}" in report.notes[0]
    if step == "best":
        assert any("step 40 has no metric" in w for w in report.warnings)


def test_convert_critic_and_lower_is_better(runs_root: Path, tmp_path: Path) -> None:
    fastckpt.convert(runs_root / "nemo", tmp_path / "critic", role="critic", step=10)
    assert fastckpt.verify(ref(runs_root, "nemo-critic", 10), tmp_path / "critic").ok
    fastckpt.convert(
        runs_root / "nemo",
        tmp_path / "low",
        step="best",
        metric="val:reward",
        higher_is_better=False,
    )
    assert fastckpt.verify(ref(runs_root, "nemo", 10), tmp_path / "low").ok


def test_cli_convert_run(runs_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "best"
    res = CliRunner().invoke(
        app,
        ["convert", str(runs_root / "prime"), str(out), "--step", "best", "--metric", "val:reward"],
    )
    assert res.exit_code == 0, res.output
    assert "step 20" in res.output and "no metric" in res.output
    assert fastckpt.verify(ref(runs_root, "prime", 20), out).ok
    res = CliRunner().invoke(
        app, ["convert", str(runs_root / "prime"), str(tmp_path / "x"), "--step", "50"]
    )
    assert res.exit_code == 1 and "incomplete" in res.output
    assert not (tmp_path / "x").exists()
    res = CliRunner().invoke(
        app,
        [
            "convert",
            str(runs_root / "nemo"),
            str(tmp_path / "y"),
            "--step",
            "best",
            "--metric",
            "val:reward",
            "--lower-is-better",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert fastckpt.verify(ref(runs_root, "nemo", 10), tmp_path / "y").ok


# ---------------------------------------------------------------- ls


def test_ls_json(runs_root: Path) -> None:
    res = CliRunner().invoke(app, ["ls", str(runs_root / "nemo"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["layout"] == "nemo-rl" and doc["metric"] == "val:reward"
    assert doc["best"] == 20 and doc["latest"] == 40
    by = {s["step"]: s for s in doc["steps"]}
    assert by[20]["best"] and by[40]["latest"] and not by[50]["complete"]
    assert by[20]["format"] == "dcp" and by[20]["size"] > 0
    assert by[30]["metrics"]["val:reward"] == 0.7


def test_ls_table(runs_root: Path) -> None:
    res = CliRunner().invoke(app, ["ls", str(runs_root / "openrlhf")])
    assert res.exit_code == 0, res.output
    assert "eval_reward" in res.output and "best" in res.output and "latest" in res.output
    assert "step 50 incomplete" in res.output
    res = CliRunner().invoke(app, ["ls", str(runs_root / "refs")])
    assert res.exit_code == 1 and "not a training run" in res.output


# ---------------------------------------------------------------- prune


def test_prune_dry_run_then_prune(runs: Path) -> None:
    nemo = runs / "nemo"
    before = sorted(p.name for p in nemo.iterdir())
    res = CliRunner().invoke(
        app, ["prune", str(nemo), "--keep-top-k", "1", "--metric", "val:reward", "--dry-run"]
    )
    assert res.exit_code == 0, res.output
    assert "would remove" in res.output and "step_10" in res.output and "step_30" in res.output
    assert sorted(p.name for p in nemo.iterdir()) == before
    res = CliRunner().invoke(
        app, ["prune", str(nemo), "--keep-top-k", "1", "--metric", "val:reward"]
    )
    assert res.exit_code == 0, res.output
    # kept: best (20), latest (40, also lacking the metric), incomplete saves (50, 60)
    assert sorted(p.name for p in nemo.iterdir()) == [
        "step_20",
        "step_40",
        "step_60",
        "tmp_step_50",
    ]


def test_prune_openrlhf_removes_every_role(runs: Path) -> None:
    res = CliRunner().invoke(
        app, ["prune", str(runs / "openrlhf"), "--keep-top-k", "2", "--metric", "eval_reward"]
    )
    assert res.exit_code == 0, res.output
    for role in ("_actor", "_critic"):
        names = sorted(p.name for p in (runs / "openrlhf" / role).iterdir() if p.is_dir())
        assert names == ["global_step20", "global_step30", "global_step40", "global_step50"]


def test_prune_by_recency_keeps_the_latest(runs: Path) -> None:
    res = CliRunner().invoke(app, ["prune", str(runs / "megatron"), "--keep-top-k", "1"])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in (runs / "megatron").iterdir() if p.is_dir())
    assert names == ["iter_0000040", "iter_0000050"]  # 50 is a save in progress
