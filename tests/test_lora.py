"""PEFT LoRA checkpoints: ``lora="merge" | "adapter" | "strip"`` on DCP, veRL rank files and a
full state dict, checked against PEFT's own ``merge_and_unload`` / ``save_pretrained`` and logits.

Fixtures: ``tests/data/make_lora_fixtures.py`` (see ``lora_root`` in conftest.py).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import fastckpt
import pytest
import torch
from conftest import assert_bit_equal, load_output, ulps
from fastckpt import FastckptError, MappingError, ShapeError
from fastckpt.cli import app
from safetensors.torch import load_file
from typer.testing import CliRunner

SOURCES = {
    "dcp": ("dcp", {"lora_alpha": 8}),  # DCP: nothing beside it says alpha
    "verl": ("verl", {}),  # lora_train_meta.json / adapter_config.json in huggingface/
    "full": ("full/pytorch_model.bin", {"lora_alpha": 8}),
}
RS_SOURCES = {
    "dcp": ("dcp", {}),  # ../huggingface/adapter_config.json (use_rslora, lora_alpha)
    "verl": ("verl", {}),
    "full": ("full/pytorch_model.bin", {"lora_alpha": 8, "lora_rslora": True}),
}


def _src(root: Path, case: str, rel: str) -> Path:
    return root / case / rel


def _peft_ref(root: Path, case: str) -> dict[str, torch.Tensor]:
    return load_file(str(root / case / "ref" / "peft.safetensors"))


def _exact_merge(peft: dict[str, torch.Tensor], plain: str, scale: float) -> torch.Tensor:
    """fp32 ``W + (B @ A) * scale`` cast once to W's dtype (what fastckpt promises)."""
    module = "base_model.model." + plain.removesuffix(".weight")
    w = peft[f"{module}.base_layer.weight"]
    a = peft[f"{module}.lora_A.default.weight"].float()
    b = peft[f"{module}.lora_B.default.weight"].float()
    return (w.float() + (b @ a) * scale).to(w.dtype)


@pytest.mark.parametrize("source", list(SOURCES))
def test_merge_fp32_matches_peft(lora_root: Path, tmp_path: Path, source: str) -> None:
    rel, kwargs = SOURCES[source]
    out = tmp_path / "merged"
    report = fastckpt.convert(_src(lora_root, "lora_fp32", rel), out, lora="merge", **kwargs)
    got = load_output(out)
    want = load_file(str(lora_root / "lora_fp32" / "ref" / "merged.safetensors"))
    assert list(got) == sorted(want)
    peft = _peft_ref(lora_root, "lora_fp32")
    merged = [n for n in want if f"base_model.model.{n[:-7]}.lora_A.default.weight" in peft]
    assert len(merged) == 6
    for name, value in want.items():
        if name in merged:
            assert ulps(got[name], value) <= 1, name  # PEFT: same op order, torch vs numpy GEMM
            assert ulps(got[name], _exact_merge(peft, name, 2.0)) <= 1, name
            assert not torch.equal(
                got[name], peft[f"base_model.model.{name[:-7]}.base_layer.weight"]
            )
        else:
            assert_bit_equal(got[name], value, name)
    assert report.n_tensors == len(want)
    assert not (out / ".lora-merge").exists()


def test_merge_fp32_logits(lora_root: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    fastckpt.convert(lora_root / "lora_fp32" / "verl", out, lora="merge")
    assert (out / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    meta = json.loads((lora_root / "lora_fp32" / "meta.json").read_text())
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(meta["input_ids"])).logits
    want = torch.load(lora_root / "lora_fp32" / "ref" / "logits.pt", weights_only=True)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", list(RS_SOURCES))
def test_merge_rslora_bf16(lora_root: Path, tmp_path: Path, source: str) -> None:
    rel, kwargs = RS_SOURCES[source]
    out = tmp_path / "merged"
    report = fastckpt.convert(_src(lora_root, "lora_rs_bf16", rel), out, lora="merge", **kwargs)
    assert not any("use_rslora" in w for w in report.warnings)
    got = load_output(out)
    want = load_file(str(lora_root / "lora_rs_bf16" / "ref" / "merged.safetensors"))
    assert list(got) == sorted(want)
    peft = _peft_ref(lora_root, "lora_rs_bf16")
    scale = 8 / math.sqrt(4)
    n_merged = 0
    for name, value in want.items():
        assert got[name].dtype == torch.bfloat16
        if f"base_model.model.{name[:-7]}.lora_A.default.weight" in peft:
            n_merged += 1
            # one rounding of the fp32 sum; PEFT rounds the delta to bf16 first, then the sum
            assert ulps(got[name], _exact_merge(peft, name, scale)) <= 1, name
            assert ulps(got[name], value) <= 1, name
        else:
            assert_bit_equal(got[name], value, name)
    assert n_merged == 6


def test_rslora_scale_differs(lora_root: Path, tmp_path: Path) -> None:
    """Forcing plain LoRA scaling on the rsLoRA run gives a different (wrong) merge."""
    src = lora_root / "lora_rs_bf16" / "full" / "pytorch_model.bin"
    a = fastckpt.convert(src, tmp_path / "a", lora="merge", lora_alpha=8, lora_rslora=False)
    assert any("--lora-rslora" in w for w in a.warnings) is False  # set explicitly: no warning
    b = fastckpt.convert(src, tmp_path / "b", lora="merge", lora_alpha=8, lora_rslora=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(load_output(a.dst)[name], load_output(b.dst)[name])


@pytest.mark.parametrize("case", ["lora_fp32", "lora_rs_bf16"])
@pytest.mark.parametrize("source", ["dcp", "verl"])
def test_adapter_matches_peft(lora_root: Path, tmp_path: Path, case: str, source: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rel, kwargs = (SOURCES if case == "lora_fp32" else RS_SOURCES)[source]
    out = tmp_path / "adapter"
    report = fastckpt.convert(_src(lora_root, case, rel), out, lora="adapter", **kwargs)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(report.files)
    assert not (out / "config.json").exists()
    ref_dir = lora_root / case / "ref" / "adapter"
    got = load_file(str(out / "adapter_model.safetensors"))
    want = load_file(str(ref_dir / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for name in want:
        assert_bit_equal(got[name], want[name], name)
    cfg = json.loads((out / "adapter_config.json").read_text())
    ref_cfg = json.loads((ref_dir / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "use_rslora", "peft_type", "fan_in_fan_out"):
        assert cfg[key] == ref_cfg[key], key
    # the task type comes from a config beside the checkpoint; a bare DCP folder has none
    assert cfg["task_type"] == (None if (case, source) == ("lora_fp32", "dcp") else "CAUSAL_LM")
    assert sorted(cfg["target_modules"]) == sorted(ref_cfg["target_modules"])

    # the stripped base + our adapter in PEFT gives the PEFT model's logits
    base_dir = tmp_path / "base"
    fastckpt.convert(_src(lora_root, case, "verl"), base_dir, lora="strip")
    dtype = load_output(base_dir)["model.embed_tokens.weight"].dtype
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model = PeftModel.from_pretrained(base, out).eval()
    meta = json.loads((lora_root / case / "meta.json").read_text())
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(meta["input_ids"])).logits
    ref = torch.load(lora_root / case / "ref" / "logits.pt", weights_only=True)
    # the adapter tensors are bit-equal (above); the forward pass itself may differ by thread
    # count from the generator's, so compare at the dtype's precision
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(logits, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("source", list(SOURCES))
def test_strip(lora_root: Path, tmp_path: Path, source: str) -> None:
    rel, _ = SOURCES[source]
    out = tmp_path / "base"
    fastckpt.convert(_src(lora_root, "lora_fp32", rel), out, lora="strip")
    got = load_output(out)
    peft = _peft_ref(lora_root, "lora_fp32")
    want = {
        k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
        for k, v in peft.items()
        if ".lora_" not in k
    }
    assert sorted(got) == sorted(want)
    merged_names = load_file(str(lora_root / "lora_fp32" / "ref" / "merged.safetensors"))
    assert sorted(got) == sorted(merged_names)
    for name, value in want.items():
        assert_bit_equal(got[name], value, name)


def test_strip_cli(lora_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    res = CliRunner().invoke(
        app, ["convert", str(lora_root / "lora_fp32" / "verl"), str(out), "--lora", "merge", "-q"]
    )
    assert res.exit_code == 0, res.output
    assert "model.layers.0.self_attn.q_proj.weight" in load_output(out)
    res = CliRunner().invoke(
        app,
        ["convert", str(lora_root / "lora_fp32" / "dcp"), str(tmp_path / "x"), "--lora",
         "adapter"],
    )  # fmt: skip
    assert res.exit_code == 1
    assert "--lora-alpha" in res.output
    res = CliRunner().invoke(
        app,
        ["convert", str(lora_root / "lora_fp32" / "dcp"), str(tmp_path / "y"), "--lora",
         "adapter", "--lora-alpha", "8"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "y" / "adapter_config.json").read_text())["lora_alpha"] == 8


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("source", list(SOURCES))
def test_lora_without_mode_is_refused(lora_root: Path, tmp_path: Path, source: str) -> None:
    rel, _ = SOURCES[source]
    with pytest.raises(MappingError, match=r"LoRA tensors .*--lora merge\|adapter\|strip"):
        fastckpt.convert(_src(lora_root, "lora_fp32", rel), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["merge", "adapter"])
def test_alpha_unknown_is_refused(lora_root: Path, tmp_path: Path, mode: str) -> None:
    with pytest.raises(FastckptError, match=r"lora_alpha is unknown.*--lora-alpha"):
        fastckpt.convert(lora_root / "lora_fp32" / "dcp", tmp_path / "out", lora=mode)
    assert list(tmp_path.iterdir()) == []


def test_alpha_zero_is_refused(lora_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FastckptError, match="lora_alpha must be positive"):
        fastckpt.convert(lora_root / "lora_fp32" / "dcp", tmp_path / "o", lora="adapter",
                         lora_alpha=0)  # fmt: skip


def _copy_verl(lora_root: Path, tmp_path: Path) -> Path:
    src = tmp_path / "verl"
    shutil.copytree(lora_root / "lora_fp32" / "verl", src)
    return src


def test_meta_rank_mismatch(lora_root: Path, tmp_path: Path) -> None:
    src = _copy_verl(lora_root, tmp_path)
    (src / "lora_train_meta.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    with pytest.raises(ShapeError, match="r=8, but the lora_A tensors have rank 4"):
        fastckpt.convert(src, tmp_path / "out", lora="merge")


def test_meta_alpha_zero(lora_root: Path, tmp_path: Path) -> None:
    """veRL before 0.9.1 wrote lora_alpha 0: refused, never used."""
    src = _copy_verl(lora_root, tmp_path)
    (src / "lora_train_meta.json").write_text(json.dumps({"r": 4, "lora_alpha": 0}))
    with pytest.raises(FastckptError, match=r"lora_alpha must be positive.*lora_train_meta"):
        fastckpt.convert(src, tmp_path / "out", lora="adapter")
    fastckpt.convert(src, tmp_path / "ok", lora="adapter", lora_alpha=8)  # the argument wins


def test_bad_mode_and_no_lora(lora_root: Path, tmp_path: Path) -> None:
    src = lora_root / "lora_fp32" / "verl"
    with pytest.raises(FastckptError, match="invalid lora mode"):
        fastckpt.convert(src, tmp_path / "a", lora="fold")
    with pytest.raises(MappingError, match="no base weight"):  # adapter-only selection
        fastckpt.convert(src, tmp_path / "b", lora="merge", exclude=[r"base_layer"])
    with pytest.raises(MappingError, match="has no lora_B"):
        fastckpt.convert(src, tmp_path / "c", lora="merge", exclude=[r"layers\.1\..*lora_B"])


def test_lora_mode_on_plain_checkpoint(lora_root: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    fastckpt.convert(lora_root / "lora_fp32" / "verl", plain, lora="strip")
    with pytest.raises(MappingError, match="no lora_A/lora_B tensors"):
        fastckpt.convert(plain, tmp_path / "o", lora="merge")
    out = fastckpt.convert(plain, tmp_path / "s", lora="strip")  # strip of plain: a copy
    got: dict[str, Any] = load_output(out.dst)
    assert sorted(got) == sorted(load_output(plain))
