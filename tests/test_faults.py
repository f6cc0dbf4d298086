"""Fault tests: sources that shrink mid-run, SIGKILL at random instants and at each rename,
concurrent conversions into one destination, a full disk, ``--overwrite`` over a non-model folder,
and retention killed mid-removal (issue 9, findings 8-11; ``docs/SECURITY.md``).

Conversions that may be killed (or, before the SIGBUS guard, die) run the CLI in a subprocess.
``FASTCKPT_TEST_ITEM_DELAY_MS`` slows each copy item so that a kill or a truncation lands while the
conversion copies; ``FASTCKPT_TEST_KILL_AT`` kills at a named point (see ``fastckpt.fsops``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fastckpt
import numpy as np
import pytest
from conftest import Case
from fastckpt.fsops import check_replaceable, reclaim_stale
from fastckpt.runs import listing, scan_run
from fastckpt.runs.manager import CheckpointManager
from safetensors.numpy import load_file, save_file

CLI = "from fastckpt.cli import main; main()"


def _source(root: Path, n: int = 6) -> Path:
    """A small safetensors folder of ``n`` float32 tensors (one copy item each)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tensors = {
        f"model.layers.{i}.weight": rng.standard_normal((64, 64), np.float32) for i in range(n)
    }
    save_file(tensors, str(root / "model.safetensors"))
    return root


def _cli(
    *args: str, delay_ms: int = 0, kill_at: str | None = None, **env: str
) -> subprocess.Popen[bytes]:
    e = dict(os.environ, FASTCKPT_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", **env)
    if delay_ms:
        e["FASTCKPT_TEST_ITEM_DELAY_MS"] = str(delay_ms)
    if kill_at:
        e["FASTCKPT_TEST_KILL_AT"] = kill_at
    return subprocess.Popen(
        [sys.executable, "-c", CLI, *args, "--quiet", "--no-fsync"],
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _finish(p: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, str]:
    _out, err = p.communicate(timeout=timeout)
    return p.returncode, err.decode()


def _temps(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".fastckpt-" in n)


def _dtype_of(folder: Path) -> str:
    """The dtype of a complete output (every tensor readable), else fail."""
    got = load_file(str(folder / "model.safetensors"))
    assert len(got) == 6, sorted(got)
    dtypes = {str(a.dtype) for a in got.values()}
    assert len(dtypes) == 1, dtypes
    return dtypes.pop()


def _wait_for(cond: Any, p: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if p.poll() is not None:
            pytest.fail(
                f"exited (rc={p.returncode}) before {what}: {p.stderr.read().decode()[-2000:]}"
            )  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


# ---------------------------------------------------------------- finding 8: shrinking sources


def test_source_truncated_mid_run_is_a_clean_error(cases: dict[str, Case], tmp_path: Path) -> None:
    """A .distcp truncated while a --dtype bf16 conversion reads it: one error line naming the
    file, exit 1, no temporary left (was: SIGBUS, exit 135, .OUT.fastckpt-tmp-* left behind)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(cases["llama_odd_fp32_ws3"].dcp(), ckpt)
    out = tmp_path / "out"
    p = _cli("convert", str(ckpt), str(out), "--dtype", "bf16", delay_ms=150)

    def staged() -> bool:
        return any(
            n.startswith(".out.fastckpt-tmp-") and os.listdir(tmp_path / n)
            for n in os.listdir(tmp_path)
        )

    _wait_for(staged, p, "the output files were created")
    for f in ckpt.glob("*.distcp"):
        os.truncate(f, 0)
    rc, err = _finish(p)
    assert rc == 1, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ".distcp" in lines[0] and "shrank" in lines[0], err
    assert not out.exists()
    assert _temps(tmp_path) == []


# ---------------------------------------------------------------- findings 9 and 10: kills


@pytest.mark.parametrize("overwrite", [False, True])
def test_sigkill_at_random_instants(tmp_path: Path, overwrite: bool) -> None:
    """Killed anywhere, a conversion leaves the destination absent or complete (with
    --overwrite: the old or the new folder, never neither), and the next run reclaims its
    temporary folders and says so."""
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    rng = random.Random(9 + overwrite)
    for i in range(4):
        if overwrite:
            shutil.rmtree(out, ignore_errors=True)
            fastckpt.convert(src, out, fsync=False)  # the old folder: float32
        args = ["convert", str(src), str(out), "--dtype", "fp16"]
        p = _cli(*args, *(["--overwrite"] if overwrite else []), delay_ms=60)
        time.sleep(rng.uniform(0.0, 1.2) if i else 0.9)
        p.send_signal(signal.SIGKILL)
        rc, _err = _finish(p)
        if out.exists():
            assert _dtype_of(out) in (("float32", "float16") if overwrite else ("float16",))
        else:
            assert not overwrite and rc != 0
        # the next run into the same parent removes the dead run's temporaries, and says so
        left = [n for n in _temps(tmp_path) if "-tmp-" in n or "-old-" in n]
        q = _cli("convert", str(src), str(tmp_path / f"next{i}"))
        rc2, err2 = _finish(q)
        assert rc2 == 0, err2
        for n in left:
            assert n in err2, (n, err2)
        assert _temps(tmp_path) == []


@pytest.mark.parametrize(
    ("point", "no_renameat2", "want"),
    [
        ("staged", False, "float32"),
        ("exchanged", False, "float16"),
        ("parked", True, "float32"),
    ],
)
def test_sigkill_at_each_rename_of_overwrite(
    tmp_path: Path, point: str, no_renameat2: bool, want: str
) -> None:
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    fastckpt.convert(src, out, fsync=False)
    env = {"FASTCKPT_TEST_NO_RENAMEAT2": "1"} if no_renameat2 else {}
    p = _cli("convert", str(src), str(out), "--dtype", "fp16", "--overwrite", kill_at=point, **env)
    rc, err = _finish(p)
    assert rc == -signal.SIGKILL, err
    if point == "parked":
        # the fallback path's one window with no destination: the next run puts it back
        assert not out.exists()
        notes = reclaim_stale(tmp_path)
        assert any("put back" in n for n in notes), notes
    else:
        notes = reclaim_stale(tmp_path)
        assert notes, "the killed run's temporary folder should be reclaimed"
    assert _dtype_of(out) == want
    assert _temps(tmp_path) == []
    # and the fallback replace works end to end
    p = _cli("convert", str(src), str(out), "--dtype", "fp16", "--overwrite", **env)
    assert _finish(p)[0] == 0
    assert _dtype_of(out) == "float16"
    assert _temps(tmp_path) == []


def test_live_owner_is_not_reclaimed(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    p = _cli("convert", str(src), str(tmp_path / "slow"), delay_ms=200)
    _wait_for(lambda: any("-tmp-" in n for n in _temps(tmp_path)), p, "its temporary folder")
    assert reclaim_stale(tmp_path) == []
    assert _finish(p)[0] == 0
    assert _dtype_of(tmp_path / "slow") == "float32"
    # an unowned temporary folder (fastckpt < 0.2) is reported, never removed
    legacy = tmp_path / ".x.fastckpt-tmp-0123abcd"
    legacy.mkdir()
    notes = reclaim_stale(tmp_path)
    assert legacy.exists() and len(notes) == 1 and "no owner record" in notes[0]


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_conversions_into_one_destination(tmp_path: Path, overwrite: bool) -> None:
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    extra = ["--overwrite"] if overwrite else []
    procs = [
        _cli("convert", str(src), str(out), "--dtype", d, *extra, delay_ms=50)
        for d in ("fp16", "fp32")
    ]
    results = [_finish(p) for p in procs]
    rcs = sorted(rc for rc, _ in results)
    if overwrite:
        assert rcs == [0, 0], results
    else:
        assert rcs == [0, 1], results
        err = next(e for rc, e in results if rc == 1)
        assert "appeared while converting" in err or "already exists" in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert _dtype_of(out) in ("float16", "float32")
    assert _temps(tmp_path) == []


# ---------------------------------------------------------------- finding 9: what may be replaced


def test_overwrite_refuses_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret")
    (home / "notes.txt").write_text("mine")
    with pytest.raises(fastckpt.FastckptError, match=r"refusing to overwrite .*notes\.txt"):
        fastckpt.convert(src, home, overwrite=True)
    with pytest.raises(fastckpt.FastckptError, match=r"id_ed25519"):
        fastckpt.convert(src, home / ".ssh", overwrite=True)
    assert (home / ".ssh" / "id_ed25519").read_text() == "secret"
    assert sorted(os.listdir(home)) == [".ssh", "notes.txt"]
    assert _temps(tmp_path) == []
    # a model folder, a fastckpt output and an empty folder are replaceable
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    check_replaceable(tmp_path / "model")
    (tmp_path / "empty").mkdir()
    fastckpt.convert(src, tmp_path / "empty", overwrite=True)
    fastckpt.convert(src, tmp_path / "empty", overwrite=True, dtype="fp16")
    assert _dtype_of(tmp_path / "empty") == "float16"


def test_overwrite_refuses_a_symlinked_destination(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    real = tmp_path / "real"
    fastckpt.convert(src, real)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(fastckpt.FastckptError, match="symbolic link"):
        fastckpt.convert(src, link, overwrite=True, dtype="fp16")
    assert link.is_symlink() and _dtype_of(real) == "float32"
    assert _temps(tmp_path) == []


# ---------------------------------------------------------------- disk full


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    return r.returncode == 0


def test_disk_full(tmp_path: Path) -> None:
    src = _source(tmp_path / "src", n=6)  # 96 KiB of tensors, 48 KiB as fp16
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "32k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount)")
    try:
        for dtype in ("keep", "fp16"):
            p = _cli("convert", str(src), str(small / "out"), "--dtype", dtype)
            rc, err = _finish(p)
            assert rc == 1, err
            assert len(err.strip().splitlines()) == 1 and "no space" in err.lower(), err
            assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


# ---------------------------------------------------------------- finding 11: retention


def _nemo_step(root: Path, step: int, reward: float) -> None:
    """A finished NeMo RL step whose weights look like a DCP save."""
    w = root / f"step_{step}" / "policy" / "weights"
    w.mkdir(parents=True)
    (root / f"step_{step}" / "training_info.json").write_text(json.dumps({"val:reward": reward}))
    for name in ("__0_0.distcp", "__1_0.distcp"):
        (w / name).write_bytes(os.urandom(256))
    (w / ".metadata").write_bytes(b"meta")


RETENTION = """
import sys
from pathlib import Path
from fastckpt.runs.manager import CheckpointManager
root = Path(sys.argv[1])
mgr = CheckpointManager(checkpoint_dir=root, metric_name="val:reward", keep_top_k=1)
path = mgr.init_tmp_checkpoint(3, {"val:reward": 0.9})
(path / "policy" / "weights").mkdir(parents=True)
(path / "policy" / "weights" / "__0_0.distcp").write_bytes(b"x")
(path / "policy" / "weights" / ".metadata").write_bytes(b"m")
mgr.finalize_checkpoint(path)
"""


@pytest.mark.parametrize("point", ["retention-renamed", "retention-rmtree"])
def test_retention_killed_mid_removal(tmp_path: Path, point: str) -> None:
    root = tmp_path / "run"
    _nemo_step(root, 1, 0.1)
    _nemo_step(root, 2, 0.2)
    env = dict(os.environ, FASTCKPT_TEST_KILL_AT=point)
    r = subprocess.run([sys.executable, "-c", RETENTION, str(root)], env=env, capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    # step_1 went first: it is gone from the run's namespace, never listed half deleted
    assert not (root / "step_1").exists()
    run = scan_run(root)
    assert [s.step for s in run.complete] == [2, 3]
    doc = listing(root)
    assert any("interrupted removal" in w for w in doc["warnings"]), doc["warnings"]
    with pytest.raises(fastckpt.FastckptError, match="no step 1"):
        run.by_number(1)
    # a new manager removes the leftover (and finishes the retention on its next save)
    CheckpointManager(checkpoint_dir=root, metric_name="val:reward", keep_top_k=1)
    assert sorted(os.listdir(root)) == ["step_2", "step_3"]


def test_half_deleted_step_is_not_complete(tmp_path: Path) -> None:
    """What a step removed in place leaves (fastckpt < 0.2, or `rm -r` killed): only
    policy/weights/.metadata. It is listed as incomplete and never chosen."""
    root = tmp_path / "run"
    _nemo_step(root, 1, 0.1)
    _nemo_step(root, 2, 0.2)
    for f in (root / "step_2" / "policy" / "weights").glob("*.distcp"):
        f.unlink()
    (root / "step_2" / "training_info.json").unlink()
    run = scan_run(root)
    assert [s.step for s in run.complete] == [1]
    step2 = next(s for s in run.steps if s.step == 2)
    assert "without .distcp" in (step2.reason or "")
    with pytest.raises(fastckpt.FastckptError, match="incomplete"):
        run.by_number(2)


def test_prune_renames_out_first(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for i in (1, 2, 3):
        _nemo_step(root, i, i / 10)
    (root / ".step_0.fastckpt-deleting").mkdir()  # a leftover of a killed prune
    r = subprocess.run(
        [sys.executable, "-c", CLI, "prune", str(root), "--keep-top-k", "1"],
        capture_output=True,
    )
    assert r.returncode == 0, r.stderr.decode()
    assert sorted(os.listdir(root)) == ["step_3"]
