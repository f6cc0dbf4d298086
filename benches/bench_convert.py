"""pytest-benchmark: fastckpt.convert against a plain file copy, plus the CI smoke gate.

Benchmarks are disabled by default (``--benchmark-disable`` in pyproject), so CI runs each once as
a smoke test; measure with ``pytest benches --benchmark-enable``. Speed is never asserted as a
wall-clock limit, only as a ratio to a plain copy of the same bytes in the same minute
(PERFORMANCE.md section 5, CI smoke gate on the S checkpoint):

- any mismatch against ``fastckpt verify`` or against ``safetensors.torch.save_file`` of torch's
  own DCP load fails;
- warm fastckpt / copy > 1.6 fails. The ratio is taken in-process (``fastckpt.convert`` against
  ``shutil.copytree``, which copies in the kernel as ``cp`` does), because on 136 MB the CLI's
  Python start-up alone is larger than the copy; ``compare.py`` measures whole processes on M;
- a peak of the summed ``RssAnon`` over the ``fastckpt convert`` CLI's process tree
  > 256 MiB fails.

The S checkpoint (hidden 1024, 4 layers, vocab 8192, ffn 2816: 136 MB, 2 ranks) is written by
real torch into a session temporary folder, or reused from ``$FASTCKPT_BENCH_DATA`` when set.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCHES, SIZES, DataSet
from compare import fastckpt_exe, run_measured
from make_dcp import ensure

SHARD = "50MB"  # several shards and an index even at S
MAX_RATIO = 1.6
MAX_PEAK_MIB = 256.0
ROUNDS = 5


@pytest.fixture(scope="session")
def s_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> DataSet:
    cache = os.environ.get("FASTCKPT_BENCH_DATA")
    out = Path(cache) if cache else tmp_path_factory.mktemp("bench-data")
    return ensure(SIZES["S"], world=2, out=out, quiet=True)


def _fresh(path: Path) -> None:
    """Untimed: remove the output, then sync, so earlier writeback does not land in the timing."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def _convert(ds: DataSet, out: Path) -> Any:
    import fastckpt

    return fastckpt.convert(
        ds.dcp, out, max_shard_size=SHARD, num_threads=2, overwrite=True, fsync=False
    )


def _copy(ds: DataSet, out: Path) -> None:
    shutil.copytree(ds.dcp, out)


def _pedantic(benchmark: Any, fn: Callable[[], object], out: Path) -> None:
    def setup() -> tuple[tuple[()], dict[str, object]]:
        _fresh(out)
        return (), {}

    benchmark.pedantic(fn, setup=setup, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.benchmark(group="dcp-to-hf-S")
def test_bench_fastckpt_convert(benchmark: Any, s_checkpoint: DataSet, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    _pedantic(benchmark, lambda: _convert(s_checkpoint, out), out)
    benchmark.extra_info["nbytes"] = s_checkpoint.nbytes
    assert (out / "model.safetensors.index.json").is_file()


@pytest.mark.benchmark(group="dcp-to-hf-S")
def test_bench_plain_copy(benchmark: Any, s_checkpoint: DataSet, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    _pedantic(benchmark, lambda: _copy(s_checkpoint, out), out)
    benchmark.extra_info["nbytes"] = s_checkpoint.nbytes
    assert (out / ".metadata").is_file()


def _timed(fn: Callable[[], object], out: Path) -> float:
    _fresh(out)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_smoke_gate(s_checkpoint: DataSet, tmp_path: Path) -> None:
    """Correctness, then warm ratio to a plain copy (<= 1.6) and CLI peak memory (<= 256 MiB)."""
    import fastckpt

    ds = s_checkpoint
    out, copy = tmp_path / "hf", tmp_path / "copy"

    # correctness, untimed: fastckpt's own verify, then bit-for-bit against save_file
    _convert(ds, out)
    report = fastckpt.verify(ds.dcp, out)
    assert report.ok, f"fastckpt.verify: {report.mismatches[:5]} {report.only_in_a[:5]}"
    assert report.n_tensors == ds.n_tensors
    ref = tmp_path / "reference"
    peers = [sys.executable, str(BENCHES / "_peers.py")]
    subprocess.run([*peers, "ram", str(ds.dcp), str(ref), "--max-shard-size", SHARD], check=True)
    chk = subprocess.run(
        [*peers, "check", str(ds.dcp), str(out), str(ref)], capture_output=True, text=True
    )
    assert chk.returncode == 0, chk.stdout + chk.stderr[-2000:]
    assert json.loads(chk.stdout.strip().splitlines()[-1])["files_identical_to_reference"]

    # warm ratio, interleaved rounds, median of per-round ratios
    _convert(ds, out)
    _copy(ds, copy)
    ratios, conv_walls, copy_walls = [], [], []
    for _ in range(ROUNDS):
        c = _timed(lambda: _copy(ds, copy), copy)
        f = _timed(lambda: _convert(ds, out), out)
        copy_walls.append(c)
        conv_walls.append(f)
        ratios.append(f / c)
    ratio = statistics.median(ratios)

    # the CLI as a whole process: peak anonymous memory of its tree (and its ratio, reported)
    exe = fastckpt_exe()
    assert exe is not None, "fastckpt console script not installed"
    argv = [exe, "convert", str(ds.dcp), str(out), "--overwrite", "--quiet", "--no-fsync"]
    argv += ["--threads", "2", "--max-shard-size", SHARD]
    cli, cp = [], []
    for _ in range(3):
        _fresh(copy)
        cp.append(run_measured(["cp", "-r", str(ds.dcp), str(copy)]))
        _fresh(out)
        cli.append(run_measured(argv))
    assert all(s.rc == 0 for s in cli), cli[-1].err
    peak = max(s.peak_mib for s in cli)
    cli_ratio = statistics.median(a.wall / b.wall for a, b in zip(cli, cp, strict=True))

    gb = ds.nbytes / 1e9
    print(
        f"\nS smoke: {gb:.3f} GB; in-process convert {statistics.median(conv_walls):.3f} s vs "
        f"copytree {statistics.median(copy_walls):.3f} s -> {ratio:.2f}x (gate {MAX_RATIO}); "
        f"CLI {statistics.median(s.wall for s in cli):.3f} s vs cp -r "
        f"{statistics.median(s.wall for s in cp):.3f} s -> {cli_ratio:.2f}x (start-up included, "
        f"not gated); CLI peak RssAnon {peak:.1f} MiB (gate {MAX_PEAK_MIB:.0f})"
    )
    assert ratio <= MAX_RATIO, f"warm fastckpt/copy {ratio:.2f} > {MAX_RATIO} ({ratios})"
    assert peak <= MAX_PEAK_MIB, f"CLI peak anonymous memory {peak:.1f} MiB > {MAX_PEAK_MIB}"
