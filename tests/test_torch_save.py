"""veRL FSDP per-rank files and whole-file torch.save state dicts, written by real torch.

The fixtures come from ``tests/data/make_torch_save_fixtures.py`` (one gloo group per world
size), run once per session; set ``FASTCKPT_TS_FIXTURES=/some/dir`` to keep them between sessions.
"""

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
import torch
from conftest import generated
from fastckpt import FormatError
from fastckpt.cli import app
from safetensors.torch import load_file
from typer.testing import CliRunner

GENERATOR = Path(__file__).parent / "data" / "make_torch_save_fixtures.py"

VERL_CASES = [
    "verl_fsdp2_llama_ws1",
    "verl_fsdp1_qwen2_ws1",
    "verl_fsdp2_qwen2_ws2",
    "verl_fsdp1_llama_ws2",
    "verl_fsdp2_llama_ws3",
    "verl_fsdp1_qwen2_ws3",
    "verl_hsdp_llama_ws4",
]
FULL_CASES = ["rlinf_full", "bin_tied", "views", "prime_trainer"]


@pytest.fixture(scope="session")
def ts_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated(tmp_path_factory, "torch_save", GENERATOR, keep_env="FASTCKPT_TS_FIXTURES")


def _meta(case_dir: Path) -> dict[str, Any]:
    return dict(json.loads((case_dir / "meta.json").read_text()))


def _src(case_dir: Path) -> Path:
    meta = _meta(case_dir)
    return case_dir / meta["file"] if "file" in meta else case_dir


def _load_out(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _bits(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _assert_bitexact(out: Path, case_dir: Path, *, tied_ok: bool = True) -> None:
    got = _load_out(out)
    ref = load_file(str(case_dir / "ref" / "model.safetensors"))
    missing = set(ref) - set(got)
    if tied_ok and missing == {"lm_head.weight"}:
        assert _bits(ref["lm_head.weight"]) == _bits(ref["model.embed_tokens.weight"])
        missing = set()
    assert not missing, missing
    assert set(got) <= set(ref), set(got) - set(ref)
    for name, tensor in got.items():
        assert tensor.dtype == ref[name].dtype, name
        assert tensor.shape == ref[name].shape, name
        assert _bits(tensor) == _bits(ref[name]), name


def _check_logits(out: Path, case_dir: Path) -> None:
    """The converted folder, loaded by transformers, gives the unsharded model's logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    input_ids = torch.tensor(_meta(case_dir)["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    ref = load_file(str(case_dir / "ref" / "model.safetensors"))
    dtype = next(iter(ref.values())).dtype
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=dtype)
    reference.load_state_dict(ref, strict=True)
    with torch.no_grad():
        got = model.eval()(input_ids=input_ids).logits
        want = reference.eval()(input_ids=input_ids).logits
    assert torch.equal(got, want)
    saved = torch.load(case_dir / "logits.pt")  # computed by the generator (other threads)
    assert torch.allclose(got.float(), saved.float(), atol=2e-2, rtol=0)


def _no_leftovers(dst: Path) -> None:
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.fastckpt")]


# ---------------------------------------------------------------------------------------------
# what works


@pytest.mark.parametrize("case", VERL_CASES)
def test_verl_rank_files_bitexact(ts_root: Path, case: str, tmp_path: Path) -> None:
    case_dir = ts_root / case
    out = tmp_path / "hf"
    report = fastckpt.convert(case_dir, out)
    assert not [w for w in report.warnings if "config.json" in w and "found" in w]
    _assert_bitexact(out, case_dir)
    assert fastckpt.verify(case_dir, out).ok
    assert fastckpt.verify(out, case_dir / "ref").ok
    # huggingface/ side files are carried over byte for byte
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (case_dir / "huggingface" / name).read_bytes()
    info = fastckpt.inspect(case_dir)
    assert info.format == "torch_ranks"
    meta = _meta(case_dir)
    assert any(f"world size {meta['ws']}" in n for n in info.notes)


@pytest.mark.parametrize("case", ["verl_fsdp2_qwen2_ws2", "verl_fsdp2_llama_ws3"])
def test_verl_logits_in_transformers(ts_root: Path, case: str, tmp_path: Path) -> None:
    case_dir = ts_root / case
    out = tmp_path / "hf"
    fastckpt.convert(case_dir, out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").exists()
    _check_logits(out, case_dir)


@pytest.mark.parametrize("ws", [3, 4])
def test_dtensor_geometry(ts_root: Path, ws: int, tmp_path: Path) -> None:
    """Uneven and empty tail shards, Shard(1)/Shard(-1), nested 2-D shards, replicas, 0-d."""
    case_dir = ts_root / f"geometry_ws{ws}"
    with fastckpt.open(case_dir) as ckpt:
        assert ckpt.info("few_rows").shape == (ws - 1, 5)
        assert ckpt.info("scalar").shape == ()
        assert ckpt.info("plain").chunks == 1  # rank 0's copy only, never concatenated
        ref = load_file(str(case_dir / "ref" / "model.safetensors"))
        for name in ckpt.keys():
            got = torch.from_numpy(ckpt.tensor(name).copy()) if ref[name].dtype != torch.bfloat16 \
                else ckpt.tensor(name, framework="pt")  # fmt: skip
            assert _bits(got) == _bits(ref[name]), name
    out = tmp_path / "hf"
    fastckpt.convert(case_dir, out, copy_files=False)
    _assert_bitexact(out, case_dir)


@pytest.mark.parametrize("case", FULL_CASES)
def test_full_state_dicts(ts_root: Path, case: str, tmp_path: Path) -> None:
    case_dir = ts_root / case
    src = _src(case_dir)
    out = tmp_path / "hf"
    fastckpt.convert(src, out)
    _assert_bitexact(out, case_dir)
    assert fastckpt.inspect(src).format == "torch_save"
    # a folder holding exactly that one file works too
    fastckpt.convert(src.parent, tmp_path / "hf2")
    _assert_bitexact(tmp_path / "hf2", case_dir)


def test_prefixes_normalised(ts_root: Path) -> None:
    keys = fastckpt.inspect(_src(ts_root / "rlinf_full"))
    names = [t.name for t in keys.tensors]
    assert names == _meta(ts_root / "rlinf_full")["keys"]
    assert all("_orig_mod" not in n and "wrapped_module" not in n for n in names)
    bin_names = [t.name for t in fastckpt.inspect(ts_root / "bin_tied").tensors]
    assert "model.embed_tokens.weight" in bin_names and not any(
        n.startswith("module.") for n in bin_names
    )


def test_rlinf_logits(ts_root: Path, tmp_path: Path) -> None:
    case_dir = ts_root / "rlinf_full"
    out = tmp_path / "hf"
    fastckpt.convert(_src(case_dir), out)  # config found in ../huggingface
    _check_logits(out, case_dir)


def test_prime_trainer_stubs(ts_root: Path, tmp_path: Path) -> None:
    info = fastckpt.inspect(ts_root / "prime_trainer" / "trainer.pt")
    assert any("prime_rl.trainer.ckpt.Progress" in n for n in info.notes)
    assert any("'model'" in n for n in info.notes)
    out = tmp_path / "hf"
    fastckpt.convert(ts_root / "prime_trainer_ws2", out)
    _assert_bitexact(out, ts_root / "prime_trainer_ws2")


def test_critic_value_head(ts_root: Path, tmp_path: Path) -> None:
    case_dir = ts_root / "verl_critic_ws2"
    # its own config says LlamaForTokenClassification: kept, no warning
    report = fastckpt.convert(case_dir, tmp_path / "critic")
    assert not report.warnings
    _assert_bitexact(tmp_path / "critic", case_dir)
    assert "score.weight" in _load_out(tmp_path / "critic")
    # with a causal-LM config: kept, and the warning names the config the output needs
    policy_cfg = ts_root / "verl_fsdp2_llama_ws3" / "huggingface"
    report = fastckpt.convert(case_dir, tmp_path / "kept", config_from=policy_cfg)
    assert any("LlamaForTokenClassification" in w and "score.weight" in w for w in report.warnings)
    # dropped: the policy trunk only
    report = fastckpt.convert(
        case_dir, tmp_path / "policy", config_from=policy_cfg, drop_value_head=True
    )
    assert not report.warnings
    got = _load_out(tmp_path / "policy")
    assert not [n for n in got if n.startswith("score.")]
    assert "model.embed_tokens.weight" in got


def test_cli_drop_value_head(ts_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "policy"
    result = CliRunner().invoke(
        app, ["convert", str(ts_root / "verl_critic_ws2"), str(out), "--drop-value-head", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert "score.weight" not in _load_out(out)
    result = CliRunner().invoke(app, ["inspect", str(ts_root / "verl_fsdp2_qwen2_ws2"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["format"] == "torch_ranks"


def test_fastckpt_never_imports_torch_for_rank_files(ts_root: Path, tmp_path: Path) -> None:
    code = (
        "import sys, fastckpt; "
        f"fastckpt.convert({str(ts_root / 'verl_hsdp_llama_ws4')!r}, {str(tmp_path / 'o')!r}); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# what is refused


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _refused(src: Path, tmp_path: Path, *needles: str) -> str:
    dst = tmp_path / "out"
    with pytest.raises(FormatError) as err:
        fastckpt.convert(src, dst)
    message = str(err.value)
    for needle in needles:
        assert needle in message, message
    _no_leftovers(dst)
    return message


def test_missing_rank_file(ts_root: Path, tmp_path: Path) -> None:
    d = _copy(ts_root / "verl_fsdp2_llama_ws3", tmp_path / "ckpt")
    (d / "model_world_size_3_rank_1.pt").unlink()
    _refused(d, tmp_path, "model_world_size_3_rank_1.pt", "missing rank file")


def test_world_size_mismatch(ts_root: Path, tmp_path: Path) -> None:
    d = _copy(ts_root / "verl_fsdp2_qwen2_ws2", tmp_path / "ckpt")
    (d / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 4}))
    _refused(d, tmp_path, "fsdp_config.json", "world_size 4")


def test_world_size_from_names_without_json(ts_root: Path, tmp_path: Path) -> None:
    d = _copy(ts_root / "verl_fsdp2_qwen2_ws2", tmp_path / "ckpt")
    (d / "fsdp_config.json").unlink()  # old veRL checkpoints lack it
    fastckpt.convert(d, tmp_path / "hf")
    _assert_bitexact(tmp_path / "hf", d)


def test_mixed_world_sizes(ts_root: Path, tmp_path: Path) -> None:
    d = _copy(ts_root / "verl_fsdp2_llama_ws3", tmp_path / "ckpt")
    for f in (ts_root / "verl_fsdp1_llama_ws2").glob("model_world_size_*.pt"):
        shutil.copy(f, d / f.name)
    _refused(d, tmp_path, "model_world_size_2_rank_0.pt", "model_world_size_3_rank_0.pt")


def test_truncated_rank_file(ts_root: Path, tmp_path: Path) -> None:
    d = _copy(ts_root / "verl_fsdp2_llama_ws3", tmp_path / "ckpt")
    f = d / "model_world_size_3_rank_2.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _refused(d, tmp_path, str(f))


def test_truncated_pickle(ts_root: Path, tmp_path: Path) -> None:
    """A zip whose data.pkl stops half way (the archive itself is intact)."""
    import zipfile

    src = ts_root / "views" / "views.pt"
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                data = data[: len(data) // 2]
            zout.writestr(info, data)
    _refused(bad, tmp_path, str(bad), "cannot read pickle")


class _Evil:
    def __init__(self, func: Any, *args: Any) -> None:
        self.call = (func, args)

    def __reduce__(self) -> tuple[Any, ...]:
        return self.call


@pytest.mark.parametrize("how", ["os.system", "io.open", "stub_in_place_of_tensor"])
def test_malicious_pickle(ts_root: Path, tmp_path: Path, how: str) -> None:
    sentinel = tmp_path / "pwned"
    d = tmp_path / "ckpt"
    d.mkdir()
    state: dict[str, Any] = {"model.embed_tokens.weight": torch.zeros(2, 2)}
    if how == "os.system":
        state["evil"] = _Evil(os.system, f"touch {sentinel}")
    elif how == "io.open":
        state["evil"] = _Evil(open, str(sentinel), "w")
    else:  # an importable, harmless-looking class standing where a DTensor shard should be
        state["model.norm.weight"] = _Evil(shutil.copyfile, str(GENERATOR), str(sentinel))
    torch.save(state, d / "model_world_size_1_rank_0.pt")
    message = _refused(d, tmp_path, str(d / "model_world_size_1_rank_0.pt"), "nothing was executed")
    assert not sentinel.exists()
    assert "refusing" in message


def test_partial_refused(ts_root: Path, tmp_path: Path) -> None:
    _refused(ts_root / "partial_ws3", tmp_path, "Partial", "summed")


def test_flat_param_refused(ts_root: Path, tmp_path: Path) -> None:
    _refused(ts_root / "flat_param_ws2", tmp_path, "_flat_param", "LOCAL_STATE_DICT")


def test_sharded_tensor_rank_files_read(ts_root: Path, tmp_path: Path) -> None:
    """FSDP1 SHARDED_STATE_DICT without a mesh (ShardedTensor values) first failed with "no
    model state dict found", then was refused naming ShardedTensor; it is now read, bit for bit
    (more cases: ``test_sharded_tensor.py``)."""
    case = ts_root / "sharded_tensor_ws2"
    out = tmp_path / "out"
    fastckpt.convert(case, out)
    _assert_bitexact(out, case, tied_ok=False)


def test_plain_replicas_must_agree(ts_root: Path, tmp_path: Path) -> None:
    _refused(ts_root / "plain_differs_ws3", tmp_path, "model_world_size_3_rank_1.pt", "'buf'")


def test_single_rank_of_many_refused(ts_root: Path, tmp_path: Path) -> None:
    src = ts_root / "verl_fsdp2_llama_ws3" / "model_world_size_3_rank_0.pt"
    dst = tmp_path / "out"
    with pytest.raises(fastckpt.ShapeError, match="every rank file"):
        fastckpt.convert(src, dst)
    _no_leftovers(dst)
