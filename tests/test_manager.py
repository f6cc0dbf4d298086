"""``fastckpt.CheckpointManager``: NeMo RL-compatible saves, atomic finalize, retention, crashes.

Crash tests run a real trainer-like subprocess (torch DCP saves through the manager) and kill it
with SIGKILL at a chosen point, then check what a reader (the manager, ``scan_run``, ``convert``)
sees.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fastckpt
import numpy as np
import pytest
from fastckpt.runs import scan_run
from fastckpt.runs.manager import CheckpointManager

TRAINER = textwrap.dedent(
    """
    import os, sys, time, shutil, warnings
    from pathlib import Path
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    import fastckpt.runs.manager as m

    root, plan = Path(sys.argv[1]), sys.argv[2]
    mgr = m.CheckpointManager({"checkpoint_dir": str(root), "metric_name": "val:reward",
                               "higher_is_better": True, "keep_top_k": 3})

    def save(step, seed):
        sd = {"model.embed_tokens.weight": torch.randn(16, 4, generator=torch.Generator()
              .manual_seed(seed)), "lm_head.weight": torch.full((16, 4), float(seed))}
        path = mgr.init_tmp_checkpoint(step, {"step": step, "val:reward": seed / 100})
        dcp.save({"model": sd}, checkpoint_id=str(path / "policy" / "weights"))
        save_file(sd, str(root.parent / f"ref_{step}_{seed}.safetensors"))
        return path

    def hang(*a, **k):
        (root.parent / "ready").write_text("1")
        time.sleep(600)

    mgr.finalize_checkpoint(save(10, 1))
    if plan == "before_rename":
        save(20, 2)
        hang()
    elif plan == "after_exchange":           # replacing step_10: crash after the swap
        path = save(10, 3)
        m.shutil.rmtree = hang
        mgr.finalize_checkpoint(path)
    elif plan == "fallback_between_renames":  # no RENAME_EXCHANGE: crash between the renames
        path = save(10, 4)
        m._exchange = lambda a, b: False
        real = os.rename
        def rename(a, b):
            real(a, b)
            if Path(b).name.startswith("old_step_"):
                hang()
        m.os.rename = rename
        mgr.finalize_checkpoint(path)
    """
)


def run_and_kill(root: Path, plan: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    ready = root.parent / "ready"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(root), plan],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"trainer exited early (rc={proc.returncode}):\n{err[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("trainer never reached the crash point")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def weights(root: Path, step: int) -> Path:
    return root / f"step_{step}" / "policy" / "weights"


def test_crash_between_write_and_rename(tmp_path: Path) -> None:
    root = tmp_path / "run"
    run_and_kill(root, "before_rename")
    # the previous checkpoint is intact and the half-written one is not complete anywhere
    assert sorted(p.name for p in root.iterdir()) == ["step_10", "tmp_step_20"]
    mgr = CheckpointManager(checkpoint_dir=root, metric_name="val:reward")
    assert mgr.get_latest_checkpoint_path() == str(root / "step_10")
    assert mgr.get_best_checkpoint_path() == str(root / "step_10")
    assert fastckpt.verify(tmp_path / "ref_10_1.safetensors", weights(root, 10)).ok
    run = scan_run(root)
    assert [s.step for s in run.complete] == [10]
    assert not next(s for s in run.steps if s.step == 20).complete
    fastckpt.convert(root, tmp_path / "out")  # latest
    assert fastckpt.verify(tmp_path / "ref_10_1.safetensors", tmp_path / "out").ok
    # the trainer restarts and saves step 20 again: the leftover is replaced
    path = mgr.init_tmp_checkpoint(20, {"val:reward": 0.5})
    assert not (path / "policy").exists()
    (path / "policy" / "weights").mkdir(parents=True)
    for f in weights(root, 10).iterdir():
        (path / "policy" / "weights" / f.name).write_bytes(f.read_bytes())
    mgr.finalize_checkpoint(path)
    assert sorted(p.name for p in root.iterdir()) == ["step_10", "step_20"]


def test_crash_while_replacing_a_step_keeps_a_step(tmp_path: Path) -> None:
    root = tmp_path / "run"
    run_and_kill(root, "after_exchange")
    # step_10 exists at every instant: here it already holds the new save
    assert fastckpt.verify(tmp_path / "ref_10_3.safetensors", weights(root, 10)).ok
    assert [s.step for s in scan_run(root).complete] == [10]
    assert CheckpointManager(checkpoint_dir=root).get_latest_checkpoint_path() == str(
        root / "step_10"
    )


def test_crash_between_fallback_renames_is_recovered(tmp_path: Path) -> None:
    root = tmp_path / "run"
    run_and_kill(root, "fallback_between_renames")
    assert not (root / "step_10").exists() and (root / "old_step_10").exists()
    # the next manager puts the previous checkpoint back
    mgr = CheckpointManager(checkpoint_dir=root)
    assert mgr.get_latest_checkpoint_path() == str(root / "step_10")
    assert fastckpt.verify(tmp_path / "ref_10_1.safetensors", weights(root, 10)).ok
    assert not (root / "old_step_10").exists()


# ---------------------------------------------------------------- API


def make(mgr: CheckpointManager, step: int, info: dict[str, object]) -> Path:
    path = mgr.init_tmp_checkpoint(step, info, {"policy": {"model_name": "tiny"}})
    (path / "policy" / "weights").mkdir(parents=True)
    (path / "policy" / "weights" / "payload").write_bytes(str(step).encode())
    mgr.finalize_checkpoint(path)
    return path.parent / f"step_{step}"


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_init_and_finalize(tmp_path: Path) -> None:
    mgr = CheckpointManager({"checkpoint_dir": str(tmp_path), "metric_name": "val:reward"})
    path = mgr.init_tmp_checkpoint(
        5, {"val:reward": np.float32(0.25), "step": np.int64(5)}, {"a": {"b": 1}}
    )
    assert path == (tmp_path / "tmp_step_5").absolute()
    info = json.loads((path / "training_info.json").read_text())
    assert info == {"val:reward": 0.25, "step": 5}
    assert "b: 1" in (path / "config.yaml").read_text()
    assert mgr.get_latest_checkpoint_path() is None
    mgr.finalize_checkpoint(path)
    assert names(tmp_path) == ["step_5"]
    assert mgr.load_training_info(tmp_path / "step_5") == info
    assert mgr.load_training_info(None) is None
    with pytest.raises(fastckpt.FastckptError, match="tmp_step_N"):
        mgr.finalize_checkpoint(tmp_path / "step_5")


def test_replace_existing_step(tmp_path: Path) -> None:
    mgr = CheckpointManager(checkpoint_dir=tmp_path)
    make(mgr, 3, {"val:reward": 0.1})
    path = mgr.init_tmp_checkpoint(3, {"val:reward": 0.2})
    (path / "new").write_text("x")
    mgr.finalize_checkpoint(path)
    assert names(tmp_path) == ["step_3"]
    assert (tmp_path / "step_3" / "new").exists()
    assert mgr.load_training_info(tmp_path / "step_3") == {"val:reward": 0.2}


def test_keep_top_k_higher_is_better_latest_kept(tmp_path: Path) -> None:
    mgr = CheckpointManager(
        checkpoint_dir=tmp_path, metric_name="val:reward", higher_is_better=True, keep_top_k=2
    )
    for step, reward in [(1, 0.9), (2, 0.5), (3, 0.8), (4, 0.1)]:
        make(mgr, step, {"val:reward": reward})
    # top 2 by reward are 1 and 3; 4 is the latest and always kept
    assert names(tmp_path) == ["step_1", "step_3", "step_4"]
    assert mgr.get_best_checkpoint_path() == str(tmp_path / "step_1")
    assert mgr.get_latest_checkpoint_path() == str(tmp_path / "step_4")


def test_keep_top_k_lower_is_better_and_ties(tmp_path: Path) -> None:
    mgr = CheckpointManager(
        checkpoint_dir=tmp_path, metric_name="loss", higher_is_better=False, keep_top_k=2
    )
    for step, loss in [(1, 0.3), (2, 0.1), (3, 0.1), (4, 0.9), (5, 0.5)]:
        make(mgr, step, {"loss": loss})
    assert names(tmp_path) == ["step_2", "step_3", "step_5"]
    assert mgr.get_best_checkpoint_path() == str(tmp_path / "step_3")  # tie: higher step


def test_a_loss_metric_ranks_ascending_unless_told(tmp_path: Path) -> None:
    mgr = CheckpointManager(checkpoint_dir=tmp_path / "a", metric_name="val_loss", keep_top_k=1)
    for step, loss in [(1, 0.1), (2, 0.5), (3, 0.9)]:
        make(mgr, step, {"val_loss": loss})
    assert names(tmp_path / "a") == ["step_1", "step_3"]  # best (lowest) and latest
    told = CheckpointManager(
        checkpoint_dir=tmp_path / "b", metric_name="val_loss", higher_is_better=True, keep_top_k=1
    )
    for step, loss in [(1, 0.1), (2, 0.5), (3, 0.4)]:
        make(told, step, {"val_loss": loss})
    assert names(tmp_path / "b") == ["step_2", "step_3"]


def test_keep_top_k_without_metric_is_recency_and_missing_metric_kept(tmp_path: Path) -> None:
    mgr = CheckpointManager(checkpoint_dir=tmp_path, keep_top_k=2)
    for step in range(1, 5):
        make(mgr, step, {})
    assert names(tmp_path) == ["step_3", "step_4"]
    ranked = CheckpointManager(checkpoint_dir=tmp_path / "b", metric_name="r", keep_top_k=1)
    make(ranked, 1, {"r": 0.1})
    make(ranked, 2, {})  # cannot be ranked: kept
    make(ranked, 3, {"r": 0.9})
    make(ranked, 4, {"r": 0.5})
    assert names(tmp_path / "b") == ["step_2", "step_3", "step_4"]


def test_best_falls_back_to_latest_without_metric(tmp_path: Path) -> None:
    mgr = CheckpointManager(checkpoint_dir=tmp_path, metric_name="val:acc")
    make(mgr, 1, {"x": 1})
    make(mgr, 2, {"x": 2})
    with pytest.warns(UserWarning, match="not found"):
        assert mgr.get_best_checkpoint_path() == str(tmp_path / "step_2")


def test_tmp_steps_are_never_listed(tmp_path: Path) -> None:
    mgr = CheckpointManager(checkpoint_dir=tmp_path, metric_name="r", keep_top_k=1)
    make(mgr, 1, {"r": 0.1})
    mgr.init_tmp_checkpoint(2, {"r": 0.9})  # a save in progress
    assert mgr.get_latest_checkpoint_path() == str(tmp_path / "step_1")
    assert mgr.get_best_checkpoint_path() == str(tmp_path / "step_1")
    make(mgr, 3, {"r": 0.2})
    assert names(tmp_path) == ["step_3", "tmp_step_2"]  # retention never touches tmp_step_2
