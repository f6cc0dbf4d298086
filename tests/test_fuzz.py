"""The fuzz harnesses of ``fuzz/`` run briefly under atheris (coverage-guided) on every test run.

Long runs are documented in ``docs/SECURITY.md``; this only keeps the harnesses working and
catches a crash that appears within a few thousand inputs from the seeds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
TARGETS = ["pickle", "zip", "dcp_metadata", "megatron", "safetensors"]

if not sys.platform.startswith("linux"):  # atheris ships Linux wheels only
    pytest.skip("atheris runs on Linux only", allow_module_level=True)


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_briefly(tmp_path: Path, target: str) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "seeds" / target, corpus)
    # no RSS limit here: libFuzzer reads ru_maxrss, which a child inherits from its parent's
    # high-water mark across fork and exec (the pytest process after the rest of the suite is
    # over 1 GB); the memory bounds themselves are tested in test_hostile.py
    options = ["-runs=2000", "-max_total_time=1", "-seed=1", "-timeout=10", "-rss_limit_mb=0"]
    res = subprocess.run(
        [
            sys.executable,
            str(FUZZ / "run.py"),
            target,
            *options,
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "FASTCKPT_FUZZ_DIR": str(tmp_path)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Done" in res.stderr, res.stderr[-3000:]
