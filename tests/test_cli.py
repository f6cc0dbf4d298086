"""The ``fastckpt`` CLI: typer's ``CliRunner`` on the app, and the real entry point for errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import fastckpt
import pytest
from conftest import Case, load_output, sha256
from fastckpt.cli import app
from typer.testing import CliRunner

runner = CliRunner()


def _files(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir())}


def _main(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed entry point ``fastckpt.cli:main`` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-c", "from fastckpt.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
        check=False,
    )


# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------


def test_convert_same_as_api(cases: dict[str, Case], converted: Any, tmp_path: Path) -> None:
    c = cases["llama_odd_fp32_ws3"]
    dst = tmp_path / "cli"
    r = runner.invoke(app, ["convert", str(c.dcp()), str(dst), "--quiet"])
    assert r.exit_code == 0, r.output
    assert _files(dst) == _files(converted(c.name, "dcp"))


def test_convert_options(cases: dict[str, Case], convert_to: Any, tmp_path: Path) -> None:
    c = cases["llama_odd_fp32_ws3"]
    dst = tmp_path / "cli"
    args = ["convert", str(c.dcp()), str(dst), "--dtype", "bf16", "--max-shard-size", "30KB"]
    args += ["--exclude", r".*up_proj.*", "--exclude", r".*norm.*"]
    args += ["--threads", "2", "--no-fsync", "--quiet"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    api = convert_to(
        c.dcp(),
        dtype="bf16",
        max_shard_size="30KB",
        exclude=[r".*up_proj.*", r".*norm.*"],
    )
    assert _files(dst) == _files(api)
    got = load_output(dst)
    assert got and not [k for k in got if "up_proj" in k or "norm" in k]
    assert "lm_head.weight" in got
    assert (dst / "model.safetensors.index.json").exists()


def test_convert_config_from_and_overwrite(cases: dict[str, Case], tmp_path: Path) -> None:
    c = cases["llama_odd_fp32_ws3"]
    lonely = tmp_path / "ckpt"
    shutil.copytree(c.dcp(), lonely)
    dst = tmp_path / "out"
    r = runner.invoke(app, ["convert", str(lonely), str(dst), "--quiet"])
    assert r.exit_code == 0, r.output
    assert not (dst / "config.json").exists()
    r = runner.invoke(app, ["convert", str(lonely), str(dst), "--config-from", str(c.hf)])
    assert r.exit_code != 0
    assert not (dst / "config.json").exists()
    args = ["convert", str(lonely), str(dst), "--config-from", str(c.hf), "--overwrite", "--quiet"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (dst / "config.json").read_bytes() == (c.hf / "config.json").read_bytes()


def test_convert_quiet_prints_no_progress(cases: dict[str, Case], tmp_path: Path) -> None:
    r = runner.invoke(
        app, ["convert", str(cases["dtensor_ws3"].dcp()), str(tmp_path / "o"), "--quiet"]
    )
    assert r.exit_code == 0, r.output
    assert "%" not in r.stderr and "━" not in r.stderr


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------


def test_inspect_json(cases: dict[str, Case]) -> None:
    c = cases["dtensor_ws4"]
    r = runner.invoke(app, ["inspect", str(c.dcp()), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["format"] == "dcp"
    tensors = {t["name"]: t for t in data["tensors"]}
    assert sorted(tensors) == sorted(c.out_keys)
    assert tensors["blocks"]["dtype"] == "F32"
    assert list(tensors["blocks"]["shape"]) == [6, 8]
    assert tensors["blocks"]["chunks"] == 4
    assert list(tensors["scalar"]["shape"]) == []
    ref = c.reference()
    assert data["total_bytes"] == sum(t.numel() * t.element_size() for t in ref.values())


def test_inspect_human(cases: dict[str, Case]) -> None:
    c = cases["prime_qwen2_tied_fp32_ws3"]
    r = runner.invoke(app, ["inspect", str(c.dcp())], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    for name in c.out_keys:
        assert name in r.stdout, name
    assert "app.model." not in r.stdout


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------


def test_verify_exit_codes(cases: dict[str, Case], converted: Any, tmp_path: Path) -> None:
    c = cases["llama_odd_fp32_ws3"]
    out = converted(c.name, "dcp")
    r = runner.invoke(app, ["verify", str(c.dcp()), str(out)])
    assert r.exit_code == 0, r.output
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    f = bad / "model.safetensors"
    n = int.from_bytes(f.read_bytes()[:8], "little")
    header = json.loads(f.read_bytes()[8 : 8 + n])
    victim = "model.layers.0.self_attn.k_proj.weight"
    begin, _ = header[victim]["data_offsets"]
    data = bytearray(f.read_bytes())
    data[8 + n + begin] ^= 0x80
    f.write_bytes(bytes(data))
    r = runner.invoke(app, ["verify", str(c.dcp()), str(bad)])
    assert r.exit_code == 1
    assert victim in r.output
    assert fastckpt.verify(c.dcp(), bad).mismatches == [victim]


# ---------------------------------------------------------------------------------------------
# usage errors (exit 2) and errors (exit 1, one line)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["convert"],
        ["convert", "only-src"],
        ["convert", "a", "b", "--no-such-option"],
        ["convert", "a", "b", "--threads", "many"],
        ["inspect"],
        ["verify", "a"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output


def test_no_args_shows_help() -> None:
    r = runner.invoke(app, [])
    assert r.exit_code in (0, 2)
    assert "convert" in r.output and "inspect" in r.output and "verify" in r.output


def test_bad_dtype_is_refused(cases: dict[str, Case], tmp_path: Path) -> None:
    dst = tmp_path / "o"
    r = runner.invoke(app, ["convert", str(cases["dtensor_ws3"].dcp()), str(dst), "--dtype", "x9"])
    assert r.exit_code in (1, 2), r.output
    assert not dst.exists()


def test_error_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    p = _main("inspect", str(missing))
    assert p.returncode == 1, (p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error:"), lines[0]
    assert "nothing-here" in lines[0]
    assert "Traceback" not in p.stderr


def test_format_error_message(cases: dict[str, Case], tmp_path: Path) -> None:
    broken = tmp_path / "ckpt"
    shutil.copytree(cases["dtensor_ws3"].dcp(), broken)
    (broken / ".metadata").unlink()
    p = _main("convert", str(broken), str(tmp_path / "out"), "--quiet")
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert "incomplete" in lines[0].lower()
    assert not (tmp_path / "out").exists()


def test_debug_env_prints_traceback(tmp_path: Path) -> None:
    p = _main("inspect", str(tmp_path / "nothing-here"), env={"FASTCKPT_DEBUG": "1"})
    assert p.returncode == 1
    assert "Traceback" in p.stderr


def test_cli_runner_error_exit_1(tmp_path: Path) -> None:
    r = runner.invoke(app, ["inspect", str(tmp_path / "nothing-here")])
    assert r.exit_code == 1
