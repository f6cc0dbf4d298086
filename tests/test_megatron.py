"""Megatron legacy (``mp_rank_*``) and ``torch_dist`` checkpoints written by megatron-core itself.

The checkpoints are committed (``tests/data/megatron/fixtures.tar.xz``, unpacked per session), so
the suite needs neither megatron-core nor a second environment. They were written by
``tests/data/make_megatron_fixtures.py`` under ``torch.distributed.run`` (4 gloo ranks, CPU) with
the pinned ``tests/data/megatron/requirements.txt`` (megatron-core 0.16.1); ``python
tests/data/megatron/regenerate.py`` rebuilds them in a fresh venv and diffs them against the
archive. They hold tiny Llama / Qwen2 / Qwen3 models at TP=2, TP=2 x PP=2 and PP=2
with virtual pipeline, fp32 and bf16, tied and untied, and tiny Mixtral / Qwen2-MoE (gated shared
expert) / Qwen3-MoE models at EP=2, TP=2 x EP=2, TP=2 x ETP=1 x EP=2 and PP=2 x EP=2, in both
formats, Qwen3-MoE with legacy GroupedMLP experts (grouped GEMM, ``weight1`` / ``weight2``; a CPU
shim for the CUDA-only ``grouped_gemm`` kernel) at EP=2 and TP=2 x ETP=2 x EP=2, and tiny
DeepSeek-V3 models (multi-latent attention, with and without ``q_lora_rank``; a dense first layer,
then sigmoid routing with expert bias and a shared expert) at TP=2 (x EP=2), after checking
Megatron's own TP/EP forward against the HF logits. ``FASTCKPT_MEGATRON_FIXTURES=/dir`` runs the
tests on a freshly generated tree instead.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import fastckpt
import pytest
from fastckpt import FormatError, MappingError, ShapeError
from fastckpt.cli import app
from typer.testing import CliRunner

HERE = Path(__file__).parent
ARCHIVE = HERE / "data" / "megatron" / "fixtures.tar.xz"

CASES = [
    "llama_fp32_tp2",
    "llama_fp32_tp2pp2",
    "llama_fp32_pp2vp2",
    "llama_tied_fp32_tp2",
    "llama_tied_fp32_tp2pp2",
    "qwen2_bf16_tp2",
    "qwen2_bf16_tp2pp2",
    "qwen3_fp32_tp2",
    "qwen3_tied_bf16_pp2vp2",
    "mixtral_fp32_ep2",
    "mixtral_bf16_tp2etp1ep2",
    "qwen2_moe_fp32_tp2etp1ep2",
    "qwen2_moe_bf16_ep2",
    "qwen3_moe_fp32_tp2ep2",
    "qwen3_moe_fp32_tp2etp1ep2",
    "qwen3_moe_bf16_ep2",
    "qwen3_moe_fp32_pp2ep2",
    "qwen3_moe_fp32_ep2_gg",
    "qwen3_moe_fp32_tp2ep2_gg",
    "deepseek_v3_fp32_tp2ep2",
    "deepseek_v3_noqlora_fp32_tp2",
]
FORMATS = ["legacy", "dist"]


@pytest.fixture(scope="session")
def mroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed megatron-core saves, unpacked once per session (~2 MB of xz, ~46 MB).

    ``FASTCKPT_MEGATRON_FIXTURES=/dir`` uses a freshly generated tree instead (see
    ``tests/data/megatron/regenerate.py``).
    """
    keep = os.environ.get("FASTCKPT_MEGATRON_FIXTURES")
    if keep:
        return Path(keep)
    root = tmp_path_factory.mktemp("megatron")
    with tarfile.open(ARCHIVE, "r:xz") as tar:
        tar.extractall(root, filter="data")
    return root


def test_archive_holds_every_case(mroot: Path) -> None:
    assert json.loads((mroot / "done.json").read_text()) == CASES
    for case in CASES:
        assert {p.name for p in (mroot / case).iterdir()} >= {"hf", *FORMATS}


def _convert(src: Path, dst: Path, **kwargs: object) -> fastckpt.ConvertReport:
    return fastckpt.convert(src, dst, fsync=False, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", CASES)
def test_bit_exact_with_config(mroot: Path, tmp_path: Path, case: str, fmt: str) -> None:
    """The save root (tracker + iter_0000010/) converts to HF's own file, byte for byte."""
    hf = mroot / case / "hf"
    out = tmp_path / "out"
    report = _convert(mroot / case / fmt, out, config_from=hf)
    assert not report.warnings
    got = (out / "model.safetensors").read_bytes()
    assert got == (hf / "model.safetensors").read_bytes()
    assert (out / "config.json").read_bytes() == (hf / "config.json").read_bytes()
    assert fastckpt.verify(out, hf).ok


def _logits(folder: Path) -> object:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.arange(0, 24).reshape(2, 12) * 11 % 250
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    ("case", "fmt"),
    [
        ("llama_fp32_tp2", "legacy"),
        ("llama_tied_fp32_tp2pp2", "dist"),
        ("qwen2_bf16_tp2pp2", "legacy"),
        ("qwen3_fp32_tp2", "dist"),
        ("qwen3_tied_bf16_pp2vp2", "legacy"),
        ("mixtral_fp32_ep2", "dist"),
        ("mixtral_bf16_tp2etp1ep2", "legacy"),
        ("qwen2_moe_fp32_tp2etp1ep2", "legacy"),
        ("qwen2_moe_bf16_ep2", "dist"),
        ("qwen3_moe_fp32_pp2ep2", "legacy"),
        ("qwen3_moe_fp32_tp2ep2", "dist"),
        ("qwen3_moe_fp32_tp2ep2_gg", "legacy"),
        ("deepseek_v3_fp32_tp2ep2", "legacy"),
        ("deepseek_v3_noqlora_fp32_tp2", "dist"),
    ],
)
def test_derived_config_same_logits(mroot: Path, tmp_path: Path, case: str, fmt: str) -> None:
    """Without --config-from: config.json derived from args; transformers gives equal logits."""
    import torch

    iter_dir = mroot / case / fmt / "iter_0000010"
    out = tmp_path / "out"
    report = _convert(iter_dir, out)
    assert any("derived from the Megatron args" in w for w in report.warnings)
    hf = mroot / case / "hf"
    assert (out / "model.safetensors").read_bytes() == (hf / "model.safetensors").read_bytes()
    want = json.loads((hf / "config.json").read_text())
    got = json.loads((out / "config.json").read_text())
    assert got["architectures"] == want["architectures"]
    assert got["tie_word_embeddings"] == want["tie_word_embeddings"]
    assert torch.equal(_logits(out), _logits(hf))  # type: ignore[arg-type]


def test_inspect_and_cli_arch(mroot: Path, tmp_path: Path) -> None:
    src = mroot / "qwen3_fp32_tp2" / "legacy" / "iter_0000010"
    info = fastckpt.inspect(src)
    assert info.format == "megatron"
    names = {t.name for t in info.tensors}
    assert "model.layers.3.self_attn.q_norm.weight" in names
    assert "model.embed_tokens.weight" in names
    emb = next(t for t in info.tensors if t.name == "model.embed_tokens.weight")
    assert emb.shape == (250, 64)  # 256 padded rows trimmed to the vocab
    assert fastckpt.inspect(mroot / "qwen3_fp32_tp2" / "dist" / "iter_0000010").format == (
        "megatron_dist"
    )
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["convert", str(src), str(out), "--arch", "qwen3", "--quiet"])
    assert res.exit_code == 0, res.output
    hf = mroot / "qwen3_fp32_tp2" / "hf"
    assert (out / "model.safetensors").read_bytes() == (hf / "model.safetensors").read_bytes()
    # --arch picks the names and the derived config's class
    mistral = _convert(src.parent, tmp_path / "mistral", arch="mistral")
    assert mistral.n_tensors == len(names)
    cfg = json.loads((tmp_path / "mistral" / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"]
    with pytest.raises(MappingError, match="unknown arch 'gpt5'"):
        _convert(src, tmp_path / "bad", arch="gpt5")
    assert not (tmp_path / "bad").exists()


def test_converts_without_torch(mroot: Path, tmp_path: Path) -> None:
    """torch, megatron and TE blocked; config from args, or (once) from the HF folder."""
    runs = [
        ("llama_tied_fp32_tp2pp2", "legacy", False),
        ("llama_tied_fp32_tp2pp2", "dist", False),
        ("qwen3_moe_fp32_tp2etp1ep2", "legacy", False),
        ("deepseek_v3_fp32_tp2ep2", "dist", False),
        ("deepseek_v3_noqlora_fp32_tp2", "legacy", True),
    ]
    lines = [
        "import sys",
        "for m in ('torch', 'megatron', 'transformer_engine'): sys.modules[m] = None",
        "import fastckpt",
    ]
    for i, (case, fmt, with_config) in enumerate(runs):
        src, out = str(mroot / case / fmt), str(tmp_path / str(i))
        cfg = str(mroot / case / "hf") if with_config else None
        lines.append(f"fastckpt.convert({src!r}, {out!r}, config_from={cfg!r}, fsync=False)")
    subprocess.run([sys.executable, "-c", "\n".join(lines)], check=True)
    for i, (case, _, _) in enumerate(runs):
        hf = (mroot / case / "hf" / "model.safetensors").read_bytes()
        assert (tmp_path / str(i) / "model.safetensors").read_bytes() == hf


# ------------------------------------------------------------------------------ bad input


def _copy(mroot: Path, tmp_path: Path, case: str, fmt: str = "legacy") -> Path:
    dst = tmp_path / "src"
    shutil.copytree(mroot / case / fmt / "iter_0000010", dst)
    return dst


def _fails(src: Path, tmp_path: Path, exc: type[Exception], match: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        _convert(src, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "fastckpt-tmp" in p.name]


def test_missing_rank_directory(mroot: Path, tmp_path: Path) -> None:
    src = _copy(mroot, tmp_path, "llama_fp32_tp2pp2")
    shutil.rmtree(src / "mp_rank_01_001")
    _fails(src, tmp_path, FormatError, r"mp_rank_01_001: missing rank directory")


def test_missing_dist_file(mroot: Path, tmp_path: Path) -> None:
    src = _copy(mroot, tmp_path, "llama_fp32_tp2pp2", "dist")
    victim = sorted(src.glob("__3_*.distcp"))[0]
    victim.unlink()
    _fails(src, tmp_path, FormatError, rf"{victim.name}: missing data file")


def test_inconsistent_shapes(mroot: Path, tmp_path: Path) -> None:
    src = _copy(mroot, tmp_path, "llama_fp32_tp2")
    other = mroot / "qwen3_fp32_tp2" / "legacy" / "iter_0000010" / "mp_rank_01"
    shutil.copy(other / "model_optim_rng.pt", src / "mp_rank_01" / "model_optim_rng.pt")
    _fails(
        src,
        tmp_path,
        ShapeError,
        r"mp_rank_01/model_optim_rng.pt: tensor .*linear_proj.weight.*ranks disagree",
    )


def test_args_disagree_with_files(mroot: Path, tmp_path: Path) -> None:
    src = _copy(mroot, tmp_path, "llama_fp32_tp2")
    shutil.copytree(src / "mp_rank_01", src / "mp_rank_02")
    _fails(src, tmp_path, FormatError, r"mp_rank_02: outside TP=2.*args disagree")
    shutil.rmtree(src / "mp_rank_02")
    shutil.copytree(src / "mp_rank_01", src / "mp_rank_01_001")
    _fails(src, tmp_path, FormatError, r"mp_rank_01_001: a pipeline or expert rank suffix")


def test_unknown_tensor_name(mroot: Path, tmp_path: Path) -> None:
    src = _copy(mroot, tmp_path, "llama_fp32_tp2")
    for rank in ("mp_rank_00", "mp_rank_01"):
        path = src / rank / "model_optim_rng.pt"
        data = path.read_bytes()
        old, new = b"decoder.final_layernorm.weight", b"decoder.final_rmsnormxx.weight"
        assert data.count(old) == 1
        path.write_bytes(data.replace(old, new))  # same length: the zip stays valid
    _fails(src, tmp_path, MappingError, r"no Hugging Face name .*decoder\.final_rmsnormxx\.weight")


def test_missing_expert_rank_directory(mroot: Path, tmp_path: Path) -> None:
    """EP=2: every (tp, ep) pair; TP=2, ETP=1, EP=2: only mp_rank_00_000 and mp_rank_01_001."""
    src = _copy(mroot, tmp_path, "mixtral_fp32_ep2")
    shutil.rmtree(src / "mp_rank_00_001")
    _fails(src, tmp_path, FormatError, r"mp_rank_00_001: missing rank directory .*EP=2\)")
    shutil.rmtree(src)
    src = _copy(mroot, tmp_path, "qwen3_moe_fp32_tp2etp1ep2")
    assert sorted(p.name for p in src.iterdir()) == ["mp_rank_00_000", "mp_rank_01_001"]
    shutil.rmtree(src / "mp_rank_01_001")
    _fails(src, tmp_path, FormatError, r"mp_rank_01_001: missing rank directory .*ETP=1\)")


def test_moe_arch_mismatch(mroot: Path, tmp_path: Path) -> None:
    """MoE tensors have no names in a dense family, a shared expert none in Qwen3-MoE, and a
    derived config refuses routing the family cannot express."""
    src = mroot / "qwen2_moe_fp32_tp2etp1ep2" / "legacy"
    with pytest.raises(MappingError, match=r"arch 'llama': .*mlp\.router\.weight"):
        _convert(src, tmp_path / "a", arch="llama")
    with pytest.raises(MappingError, match=r"arch 'qwen3_moe': .*shared_experts"):
        _convert(src, tmp_path / "b", arch="qwen3_moe")
    with pytest.raises(MappingError, match=r"Qwen2MoeForCausalLM config.json: no gated shared"):
        _convert(mroot / "mixtral_fp32_ep2" / "dist", tmp_path / "c", arch="qwen2_moe")
    assert not [p for p in tmp_path.iterdir() if p.name in ("a", "b", "c")]


def test_deepseek_v3_mla(mroot: Path, tmp_path: Path) -> None:
    """MLA down projections (column-split by the local spec) merge whole; the fp32 expert bias
    becomes ``e_score_correction_bias``; a derived DeepSeek-V3 config.json refuses args that HF
    cannot express and maps group-limited routing and YaRN."""
    from fastckpt.formats.megatron.config import _dims, derive_config
    from fastckpt.formats.megatron.legacy import _read_legacy

    src = mroot / "deepseek_v3_fp32_tp2ep2" / "legacy" / "iter_0000010"
    info = {t.name: t for t in fastckpt.inspect(src).tensors}
    assert info["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape == (40, 64)
    assert info["model.layers.0.self_attn.q_a_proj.weight"].shape == (48, 64)
    assert "model.layers.0.mlp.gate_proj.weight" in info  # first_k_dense_replace=1
    bias = info["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert (bias.dtype, bias.shape) == ("F32", (4,))
    noq = fastckpt.inspect(mroot / "deepseek_v3_noqlora_fp32_tp2" / "dist" / "iter_0000010")
    assert "model.layers.1.self_attn.q_proj.weight" in {t.name for t in noq.tensors}
    args, canon, _ = _read_legacy(src)
    d = _dims(args, None, canon)

    def derive(**changes: object) -> dict[str, object]:
        changed = copy.copy(args)
        changed.fields = {**args.fields, **changes}
        return derive_config(changed, "deepseek_v3", d, "F32", [1])

    cfg = derive()
    assert (cfg["n_routed_experts"], cfg["n_shared_experts"], cfg["first_k_dense_replace"]) == (
        4,
        1,
        1,
    )
    assert (cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["routed_scaling_factor"]) == (48, 32, 2.5)
    assert "rope_scaling" not in cfg  # rope (YaRN with factor 1 is rope)
    assert derive(q_lora_rank=None)["q_lora_rank"] is None
    grouped = derive(moe_router_num_groups=2, moe_router_group_topk=1)
    assert (grouped["n_group"], grouped["topk_group"]) == (2, 1)
    yarn = derive(rotary_scaling_factor=40.0, mscale=1.0, mscale_all_dim=1.0)["rope_scaling"]
    assert yarn["rope_type"] == "yarn" and yarn["factor"] == 40.0 and yarn["attention_factor"] == 1
    assert yarn["original_max_position_embeddings"] == 4096
    for changes, match in [
        ({"moe_router_score_function": "softmax"}, r"moe_router_score_function='softmax'"),
        ({"moe_router_enable_expert_bias": False}, r"moe_router_enable_expert_bias unset"),
        ({"moe_shared_expert_gate": True}, r"moe_shared_expert_gate=True"),
        ({"moe_shared_expert_intermediate_size": 40}, r"not a multiple of moe_ffn_hidden_size"),
        ({"moe_router_num_groups": 2, "moe_router_group_topk": 2}, r"their top 1 scores"),
        ({"layernorm_epsilon": 1e-5}, r"layernorm_epsilon=1e-05 \(HF's q_a"),
        ({"qk_layernorm": False}, r"qk_layernorm unset"),
        ({"rotary_percent": 0.5}, r"rotary_percent=0.5"),
    ]:
        with pytest.raises(MappingError, match=r"DeepseekV3ForCausalLM config\.json: .*" + match):
            derive(**changes)
    with pytest.raises(MappingError, match=r"dense layers \[1\] .*only the first k"):
        derive_config(args, "deepseek_v3", d, "F32", [0])


def test_legacy_grouped_mlp(mroot: Path) -> None:
    """Legacy GroupedMLP ``weight1`` / ``weight2`` become per-expert strided views; a buffer that is
    not contiguous, or whose shape disagrees with args, is refused."""
    from fastckpt.formats.megatron.legacy import _grouped_mlp
    from fastckpt.unpickle import StorageRef, TensorRef

    src = mroot / "qwen3_moe_fp32_tp2ep2_gg" / "legacy" / "iter_0000010"
    info = {t.name: t for t in fastckpt.inspect(src).tensors}
    assert info["model.layers.3.mlp.experts.3.gate_proj.weight"].shape == (32, 64)
    assert info["model.layers.3.mlp.experts.3.down_proj.weight"].shape == (64, 32)
    storage = StorageRef("0", "float32", 64 * 64)
    views = _grouped_mlp(TensorRef(storage, "float32", 0, (64, 64), (64, 1)), "1", 2, 64, "f", "k")
    assert [(n, r.storage_offset, r.shape, r.stride) for n, r in views] == [
        ("mlp.experts.local_experts.0.linear_fc1.weight", 0, (32, 64), (1, 32)),
        ("mlp.experts.local_experts.1.linear_fc1.weight", 2048, (32, 64), (1, 32)),
    ]
    with pytest.raises(FormatError, match="expected a contiguous 2-D buffer"):
        _grouped_mlp(TensorRef(storage, "float32", 0, (64, 64), (1, 64)), "1", 2, 64, "f", "k")
    with pytest.raises(ShapeError, match=r"expected \[2·R, 48\]"):
        _grouped_mlp(TensorRef(storage, "float32", 0, (64, 64), (64, 1)), "2", 2, 48, "f", "k")
