"""``with_optimizer=True``: ``optimizer.safetensors`` + ``optimizer.json`` against
``get_optimizer_state_dict(..., StateDictOptions(full_state_dict=True))`` of the same run.

Fixtures: ``tests/data/make_lora_fixtures.py`` (see ``lora_root`` in conftest.py): FSDP2 at world
size 2, one AdamW step, saved as DCP (FQN-keyed) and as veRL rank files (index-keyed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fastckpt
import pytest
from conftest import assert_bit_equal, safetensors_header, sha256
from fastckpt import FormatError
from fastckpt.cli import app
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

CASES = ["lora_fp32", "lora_rs_bf16"]
SOURCES = {"dcp": ("dcp", {"lora_alpha": 8}), "verl": ("verl", {})}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("source", list(SOURCES))
def test_optimizer_matches_full_state_dict(
    lora_root: Path, tmp_path: Path, case: str, source: str
) -> None:
    rel, kwargs = SOURCES[source]
    out = tmp_path / "out"
    report = fastckpt.convert(
        lora_root / case / rel, out, lora="merge", with_optimizer=True, **kwargs
    )
    assert {"optimizer.safetensors", "optimizer.json"} <= set(report.files)
    ref_dir = lora_root / case / "ref"
    got = load_file(str(out / "optimizer.safetensors"))
    want = load_file(str(ref_dir / "optim.safetensors"))
    assert sorted(got) == sorted(want)
    assert len(want) == 12 * 3  # 12 LoRA tensors x (exp_avg, exp_avg_sq, step)
    for name, value in want.items():
        assert_bit_equal(got[name], value, name)
    # byte-identical to safetensors' own file of the same tensors
    again = tmp_path / "again.safetensors"
    save_file(want, str(again), metadata={"format": "pt"})
    assert sha256(again) == sha256(out / "optimizer.safetensors")

    doc = json.loads((out / "optimizer.json").read_text())
    ref = json.loads((ref_dir / "optim.json").read_text())
    assert doc["step"] == 1
    assert doc["param_groups"] == ref["param_groups"]
    # the weights themselves are unaffected (merged, plain names)
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(str(out / "model.safetensors"))


def test_optimizer_without_lora_names_cli(lora_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    res = CliRunner().invoke(
        app,
        ["convert", str(lora_root / "lora_fp32" / "verl"), str(out), "--lora", "strip",
         "--with-optimizer", "-q"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    _, header = safetensors_header(out / "optimizer.safetensors")
    assert header["__metadata__"] == {"format": "pt"}
    assert all(k.startswith("state.base_model.model.") for k in header if k != "__metadata__")


def test_no_optimizer_without_flag(lora_root: Path, tmp_path: Path) -> None:
    report = fastckpt.convert(lora_root / "lora_fp32" / "verl", tmp_path / "o", lora="merge")
    assert "optimizer.safetensors" not in report.files
    assert not (tmp_path / "o" / "optimizer.json").exists()


# ---------------------------------------------------------------------------------------------
# refused


def test_int_keyed_dcp_refused(lora_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"keyed by parameter index \(optim\.state\.\d+\.exp_avg"):
        fastckpt.convert(lora_root / "int_optim", tmp_path / "o", lora="merge", lora_alpha=8,
                         with_optimizer=True)  # fmt: skip
    assert not (tmp_path / "o").exists()
    # without the optimizer the same checkpoint converts
    fastckpt.convert(lora_root / "int_optim", tmp_path / "w", lora="merge", lora_alpha=8)


def test_fsdp1_flat_refused(lora_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"optim_world_size_2_rank_0\.pt.*FSDP1 flat"):
        fastckpt.convert(lora_root / "fsdp1_flat", tmp_path / "o", with_optimizer=True)
    assert not (tmp_path / "o").exists()
    fastckpt.convert(lora_root / "fsdp1_flat", tmp_path / "w")  # the weights still convert


def test_full_state_dict_refused(lora_root: Path, tmp_path: Path) -> None:
    src = lora_root / "lora_fp32" / "full" / "pytorch_model.bin"
    with pytest.raises(FormatError, match="no optimizer state"):
        fastckpt.convert(src, tmp_path / "o", lora="strip", with_optimizer=True)


def test_missing_optimizer_rank_file(lora_root: Path, tmp_path: Path) -> None:
    src = tmp_path / "verl"
    shutil.copytree(lora_root / "lora_fp32" / "verl", src)
    (src / "optim_world_size_2_rank_1.pt").unlink()
    with pytest.raises(FormatError, match=r"optim_world_size_2_rank_1\.pt: missing"):
        fastckpt.convert(src, tmp_path / "o", lora="merge", with_optimizer=True)
    for f in src.glob("optim_*"):
        f.unlink()
    with pytest.raises(FormatError, match="without optimizer state"):
        fastckpt.convert(src, tmp_path / "o", lora="merge", with_optimizer=True)
    assert not (tmp_path / "o").exists()


def test_truncated_optimizer_file(lora_root: Path, tmp_path: Path) -> None:
    src = tmp_path / "verl"
    shutil.copytree(lora_root / "lora_fp32" / "verl", src)
    victim = src / "optim_world_size_2_rank_0.pt"
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(FormatError, match=r"optim_world_size_2_rank_0\.pt"):
        fastckpt.convert(src, tmp_path / "o", lora="merge", with_optimizer=True)
    assert not (tmp_path / "o").exists()
