"""What a new user met on the CLI, each pinned: run dirs in inspect/verify, names never cut, no
step-like output inside a run, human units, CLI spellings in messages, help text, --version,
--threads 0, the progress bar's label, wrapped warnings, metrics in ls, order-free verify.

All on the sample that ships in ``examples/`` (a real FSDP2 DCP in NeMo RL's layout)."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import fastckpt
import pytest
from fastckpt.cli import app
from typer.testing import CliRunner

RUN = Path(__file__).parent.parent / "examples" / "tiny-llama-run"
WEIGHTS = RUN / "step_3" / "policy" / "weights"
runner = CliRunner()


@pytest.fixture
def run_copy(tmp_path: Path) -> Path:
    """The sample run with a quality metric beside its bookkeeping."""
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    info = run / "step_3" / "training_info.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "val_reward": 0.25}))
    return run


def test_inspect_and_verify_accept_a_run_dir(tmp_path: Path) -> None:
    r = runner.invoke(app, ["inspect", str(RUN)])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"{WEIGHTS} (dcp)")  # the latest step's weights
    assert "model.embed_tokens.weight" in r.stdout
    r = runner.invoke(app, ["inspect", str(RUN), "--step", "3", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["path"] == str(WEIGHTS)
    out = tmp_path / "hf"
    fastckpt.convert(RUN, out, fsync=False)
    r = runner.invoke(app, ["verify", str(RUN), str(out)])
    assert r.exit_code == 0, r.output
    assert fastckpt.verify(out, RUN).ok


@pytest.mark.parametrize("columns", ["30", "250"])
def test_inspect_never_cuts_names(columns: str) -> None:
    r = runner.invoke(app, ["inspect", str(WEIGHTS)], env={"COLUMNS": columns})
    assert r.exit_code == 0, r.output
    names = fastckpt.inspect(WEIGHTS).tensors
    lines = r.stdout.splitlines()
    for t in names:  # one line per tensor, starting with its whole name (grep-able)
        assert any(ln.split()[0] == t.name for ln in lines if ln.strip()), t.name
    assert "21 tensors, 90,752 bytes; 0 non-model entries" in r.stdout


def test_output_that_looks_like_a_step_of_the_run_is_refused(run_copy: Path) -> None:
    before = fastckpt.runs.listing(run_copy)["steps"]
    for name in ("step_9", "global_step_9", "iter_0000009"):
        r = runner.invoke(app, ["convert", str(run_copy), str(run_copy / name), "-q"])
        assert r.exit_code == 1, r.output
        assert "would look like a step of the training run" in r.output
        assert not (run_copy / name).exists()
    assert fastckpt.runs.listing(run_copy)["steps"] == before
    # any other name inside the run is a plain folder to ls
    assert runner.invoke(app, ["convert", str(run_copy), str(run_copy / "hf"), "-q"]).exit_code == 0
    assert [s["step"] for s in fastckpt.runs.listing(run_copy)["steps"]] == [3]


def test_summary_uses_human_units_and_singular(tmp_path: Path) -> None:
    r = runner.invoke(app, ["convert", str(WEIGHTS), str(tmp_path / "o"), "--no-fsync"])
    assert r.exit_code == 0, r.output
    assert "wrote 21 tensors, 90.8 kB in 1 file to" in r.output
    assert "0.00 GB" not in r.output and "1 files" not in r.output


def test_existing_destination_message_uses_the_cli_spelling(tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    r = runner.invoke(app, ["convert", str(WEIGHTS), str(tmp_path / "o")])
    assert r.exit_code == 1
    assert "--overwrite replaces it" in r.output and "overwrite=True" not in r.output
    with pytest.raises(fastckpt.FastckptError, match=r"overwrite=True replaces it"):
        fastckpt.convert(WEIGHTS, tmp_path / "o")


def test_help_text() -> None:
    r = runner.invoke(app, ["convert", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "<list[str]>" not in r.stdout and "--include REGEX" in r.stdout
    assert "Usage: fastckpt convert [OPTIONS] SRC DST" in r.stdout
    assert "deepseek_v3" in r.stdout
    prune = runner.invoke(app, ["prune", "--help"], env={"COLUMNS": "200"}).stdout
    assert "--step best" not in prune


def test_version_and_threads_zero() -> None:
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"fastckpt {fastckpt.__version__}"
    r = runner.invoke(app, ["convert", str(WEIGHTS), "never-written", "--threads", "0"])
    assert r.exit_code == 2 and "--threads" in r.output
    assert not Path("never-written").exists()


def test_progress_bar_is_labelled_and_knows_its_total(tmp_path: Path) -> None:
    """On a terminal (a pty here): a label, and never the '0/? bytes' of an unknown total."""
    main, sub = pty.openpty()
    cmd = [sys.executable, "-c", "from fastckpt.cli import main; main()",
           "convert", str(RUN), str(tmp_path / "o"), "--no-fsync"]  # fmt: skip
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("FASTCKPT_DISABLE_PROGRESS", None)
    proc = subprocess.Popen(cmd, stdin=sub, stdout=sub, stderr=sub, env=env)
    os.close(sub)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    assert proc.wait(timeout=60) == 0, seen
    text = seen.decode(errors="replace")
    assert "converting" in text
    assert "?" not in text.split("converting", 1)[1].split("kB", 1)[0]  # total known: 90.8 kB
    assert "wrote 21 tensors" in text


def test_no_config_warning_is_wrapped(tmp_path: Path) -> None:
    lone = tmp_path / "weights"
    shutil.copytree(WEIGHTS, lone)  # no tokenizer/ or config beside it
    r = runner.invoke(app, ["convert", str(lone), str(tmp_path / "o"), "-q"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines[0].startswith("warning: no config.json found")
    assert len(lines) > 1 and all(len(ln) <= 100 for ln in lines), lines
    assert str(lone) in r.output.replace("\n  ", " ")  # paths are never split


def test_ls_shows_the_metrics_it_finds(run_copy: Path) -> None:
    r = runner.invoke(app, ["ls", str(run_copy)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    header = next(ln for ln in r.stdout.splitlines() if "step" in ln and "format" in ln)
    assert "val_reward" in header and "consumed_samples" in header
    assert "current_step" not in header  # the step column says it


def test_verify_first_difference_does_not_depend_on_order(tmp_path: Path) -> None:
    a = tmp_path / "a"
    fastckpt.convert(WEIGHTS, a, fsync=False)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    f = b / "model.safetensors"
    raw = bytearray(f.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    for victim in ("model.norm.weight", "model.embed_tokens.weight"):
        raw[8 + n + header[victim]["data_offsets"][0]] ^= 0x01
    f.write_bytes(bytes(raw))
    ab, ba = fastckpt.verify(a, b), fastckpt.verify(b, a)
    assert ab.mismatches == ba.mismatches == ["model.embed_tokens.weight", "model.norm.weight"]
    first = [runner.invoke(app, ["verify", str(x), str(y)]).output for x, y in ((a, b), (b, a))]
    assert all("first: model.embed_tokens.weight" in o for o in first), first
