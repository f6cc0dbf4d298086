"""End-to-end ``fastckpt.convert`` on real torch checkpoints: bits, files, index, config, logits."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import fastckpt
import pytest
from conftest import (
    ALL_DCP,
    MODEL_CASES,
    WITH_GLOBAL_METADATA,
    Case,
    assert_bit_equal,
    flatten_tensors,
    load_output,
    safetensors_header,
    sha256,
    tree_digest,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# ---------------------------------------------------------------------------------------------
# Tensors: bit for bit against the unsharded reference and against torch's own converter
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "variant"), ALL_DCP, ids=[f"{c}-{v}" for c, v in ALL_DCP])
def test_every_tensor_equals_reference(
    cases: dict[str, Case], case: str, variant: str, tmp_path: Path
) -> None:
    c = cases[case]
    dst = tmp_path / "out"
    report = fastckpt.convert(c.dcp(variant), dst)
    got = load_output(dst)
    want = c.expected()
    for name, t in want.items():  # values first, so one missing name does not hide the rest
        if name in got:
            assert_bit_equal(got[name], t, name)
    assert sorted(got) == sorted(want)
    assert report.n_tensors == len(want)
    assert report.nbytes == sum(t.numel() * t.element_size() for t in want.values())
    written = {p.name for p in dst.glob("*.safetensors")}
    assert written <= {Path(f).name for f in report.files}
    assert report.seconds >= 0


@pytest.mark.parametrize(
    ("case", "variant"), WITH_GLOBAL_METADATA, ids=[f"{c}-{v}" for c, v in WITH_GLOBAL_METADATA]
)
def test_equals_dcp_to_torch_save(
    cases: dict[str, Case], converted: Any, case: str, variant: str, tmp_path: Path
) -> None:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    c = cases[case]
    pt = tmp_path / "full.pt"
    dcp_to_torch_save(c.dcp(variant), pt)
    full = torch.load(pt, weights_only=False)  # written just now by torch itself
    wrapper = {"nemo": ["model"], "rlinf": ["fsdp_checkpoint", "model"], "prime": ["app", "model"]}
    node = full
    for part in wrapper[c.meta.get("wrapper", "nemo")]:
        node = node[part]
    theirs = flatten_tensors(node)
    ours = load_output(converted(case, variant))
    for name, t in ours.items():
        assert_bit_equal(t, theirs[name], name)
    assert set(ours) == set(theirs) - ({"lm_head.weight"} if c.tied else set())


def test_source_never_modified(cases: dict[str, Case], tmp_path: Path) -> None:
    c = cases["nemo_llama_untied_fp32_ws2"]
    step = c.root / "step_3"
    before = tree_digest(step)
    dst = tmp_path / "out"
    fastckpt.convert(c.dcp(), dst, dtype="bf16", max_shard_size="20KB")
    fastckpt.inspect(c.dcp())
    assert fastckpt.verify(c.dcp(), tmp_path / "out").n_tensors > 0
    with fastckpt.open(c.dcp()) as ckpt:
        for k in ckpt.keys():
            ckpt.tensor(k)
    assert tree_digest(step) == before


def test_num_threads_and_fsync_do_not_change_bytes(cases: dict[str, Case], convert_to: Any) -> None:
    src = cases["llama_odd_fp32_ws3"].dcp()
    kw = {"max_shard_size": "60KB"}
    a = convert_to(src, num_threads=1, fsync=False, **kw)
    b = convert_to(src, num_threads=4, fsync=True, **kw)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert sha256(a / n) == sha256(b / n), n


@pytest.mark.parametrize("path", ["copy_file_range", "pwrite"])
def test_copy_paths_give_the_same_bytes(
    cases: dict[str, Case], convert_to: Any, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Range copies splice through a pipe by default; ``FASTCKPT_COPY`` forces the fallbacks."""
    src = cases["llama_odd_fp32_ws3"].dcp()
    a = convert_to(src, fsync=False)
    monkeypatch.setenv("FASTCKPT_COPY", path)
    b = convert_to(src, fsync=False)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert sha256(a / n) == sha256(b / n), n


def test_progress_callback(cases: dict[str, Case], tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    report = fastckpt.convert(
        cases["llama_odd_fp32_ws3"].dcp(),
        tmp_path / "o",
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls, "progress never called"
    dones = [d for d, _ in calls]
    assert dones == sorted(dones)
    assert calls[-1] == (report.nbytes, report.nbytes)
    assert all(t == report.nbytes for _, t in calls)


def test_progress_exception_cancels(cases: dict[str, Case], tmp_path: Path) -> None:
    class Stop(Exception):
        pass

    def boom(done: int, total: int) -> None:
        raise Stop

    dst = tmp_path / "o"
    with pytest.raises(Stop):
        fastckpt.convert(cases["llama_odd_fp32_ws3"].dcp(), dst, progress=boom)
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Files: byte-identical to safetensors.torch.save_file, names and index as transformers writes
# ---------------------------------------------------------------------------------------------


def _expected_split(c: Case, max_shard_size: int | str) -> dict[str, list[str]]:
    from huggingface_hub import split_torch_state_dict_into_shards

    want = c.expected()
    if isinstance(max_shard_size, str) and max_shard_size.endswith("iB"):  # hub: decimal only
        units = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
        max_shard_size = int(max_shard_size[:-3]) * units[max_shard_size[-3:]]
    split = split_torch_state_dict_into_shards(want, max_shard_size=max_shard_size)
    return {f: list(names) for f, names in split.filename_to_tensors.items()}


SHARD_SIZES = ["5GB", 207552, "100KB", "60KB", 30_000, "20KiB", "1KB"]


@pytest.mark.parametrize("max_shard_size", SHARD_SIZES, ids=[str(s) for s in SHARD_SIZES])
@pytest.mark.parametrize("case", ["llama_odd_fp32_ws3", "prime_qwen2_tied_fp32_ws3"])
def test_shards_byte_identical_to_save_file(
    cases: dict[str, Case], convert_to: Any, case: str, max_shard_size: int | str, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    c = cases[case]
    dst = convert_to(c.dcp(), max_shard_size=max_shard_size)
    want = c.expected()
    split = _expected_split(c, max_shard_size)
    files = sorted(p.name for p in dst.glob("*.safetensors"))
    assert files == sorted(split)
    index = dst / "model.safetensors.index.json"
    if len(split) == 1:
        assert files == ["model.safetensors"]
        assert not index.exists()
        per_file = {"model.safetensors": list(want)}
    else:
        n = len(split)
        assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        weight_map = json.loads(index.read_text())["weight_map"]
        per_file = {}
        for name, f in weight_map.items():
            per_file.setdefault(f, []).append(name)
        assert {f: sorted(v) for f, v in per_file.items()} == {
            f: sorted(v) for f, v in split.items()
        }
        expected_index = {
            "metadata": {
                "total_parameters": sum(t.numel() for t in want.values()),
                "total_size": sum(t.numel() * t.element_size() for t in want.values()),
            },
            "weight_map": {k: weight_map[k] for k in want},
        }
        assert index.read_text() == json.dumps(expected_index, indent=2, sort_keys=True) + "\n"
    for f, names in per_file.items():
        ref = tmp_path / f"ref-{f}"
        save_file({k: want[k].clone() for k in names}, str(ref), metadata={"format": "pt"})
        assert sha256(dst / f) == sha256(ref), f


def test_shard_sizes_units(cases: dict[str, Case], convert_to: Any) -> None:
    src = cases["llama_odd_fp32_ws3"].dcp()

    def layout(d: Path) -> dict[str, str]:
        return {p.name: sha256(p) for p in sorted(d.iterdir())}

    assert layout(convert_to(src, max_shard_size="50KB")) == layout(
        convert_to(src, max_shard_size=50_000)
    )
    assert layout(convert_to(src, max_shard_size="50KiB")) == layout(
        convert_to(src, max_shard_size=51_200)
    )
    assert layout(convert_to(src, max_shard_size="50KB")) != layout(
        convert_to(src, max_shard_size="50KiB")
    )


def test_folder_equals_transformers_save_pretrained(
    cases: dict[str, Case], convert_to: Any, tmp_path: Path
) -> None:
    """Weights and index exactly as ``model.save_pretrained(max_shard_size=...)`` writes them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    c = cases["llama_odd_fp32_ws3"]
    config = AutoConfig.from_pretrained(c.hf)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    model.load_state_dict(c.reference())
    theirs = tmp_path / "theirs"
    model.save_pretrained(theirs, max_shard_size="60KB")
    ours = convert_to(c.dcp(), max_shard_size="60KB")
    weight_files = sorted(p.name for p in theirs.iterdir() if "safetensors" in p.name)
    assert len(weight_files) > 2
    assert sorted(p.name for p in ours.iterdir() if "safetensors" in p.name) == weight_files
    for n in weight_files:
        assert sha256(ours / n) == sha256(theirs / n), n


def test_single_file_header_rules(converted: Any) -> None:
    """Header padded with spaces to a multiple of 8, ``__metadata__`` first, offsets tile."""
    dst = converted("dtensor_ws4", "dcp")
    f = dst / "model.safetensors"
    n, header = safetensors_header(f)
    assert n % 8 == 0
    raw = f.read_bytes()[8 : 8 + n]
    assert raw.rstrip(b" ").endswith(b"}") and raw.startswith(b'{"__metadata__":{"format":"pt"}')
    assert next(iter(header)) == "__metadata__"
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    end = 0
    for _, v in entries:
        assert v["data_offsets"][0] == end
        end = v["data_offsets"][1]
    assert 8 + n + end == f.stat().st_size


# ---------------------------------------------------------------------------------------------
# The converted folder is a working transformers model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", MODEL_CASES)
def test_from_pretrained_logits(
    cases: dict[str, Case], converted: Any, case: str, torch_single_thread: None
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    c = cases[case]
    out = converted(case, "dcp")
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert model.dtype == getattr(torch, c.meta["dtype"])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(c.meta["input_ids"])).logits
    want = c.logits()
    assert logits.dtype == want.dtype
    if c.meta["dtype"] == "float32":
        assert torch.equal(logits, want)
    else:
        torch.testing.assert_close(logits, want, rtol=0, atol=0.05)
    if c.tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("case", MODEL_CASES)
def test_tied_embeddings(cases: dict[str, Case], converted: Any, case: str) -> None:
    c = cases[case]
    got = load_output(converted(case, "dcp"))
    assert "model.embed_tokens.weight" in got
    config = json.loads((converted(case, "dcp") / "config.json").read_text())
    assert config["tie_word_embeddings"] is c.tied
    if c.tied:
        assert "lm_head.weight" not in got
    else:
        assert "lm_head.weight" in got
        assert_bit_equal(got["lm_head.weight"], c.reference()["lm_head.weight"], "lm_head")


# ---------------------------------------------------------------------------------------------
# dtype casts and the config dtype field
# ---------------------------------------------------------------------------------------------

CASTS = [
    ("llama_odd_fp32_ws3", "bf16", "bfloat16"),
    ("llama_odd_fp32_ws3", "fp16", "float16"),
    ("llama_tied_bf16_ws2", "fp32", "float32"),
    ("qwen2_untied_bf16_ws3", "fp16", "float16"),
    ("rlinf_llama_untied_bf16_ws2", "bf16", "bfloat16"),
]


@pytest.mark.parametrize(("case", "dtype", "torch_name"), CASTS)
def test_dtype_cast_matches_torch(
    cases: dict[str, Case], convert_to: Any, case: str, dtype: str, torch_name: str
) -> None:
    import torch

    c = cases[case]
    dst = convert_to(c.dcp(), dtype=dtype)
    got = load_output(dst)
    target = getattr(torch, torch_name)
    for name, t in c.expected().items():
        assert_bit_equal(got[name], t.to(target), name)
    src_cfg = (c.hf / "config.json").read_text()
    out_cfg = (dst / "config.json").read_text()
    before, after = json.loads(src_cfg), json.loads(out_cfg)
    assert after["dtype"] == torch_name
    assert {k: v for k, v in after.items() if k != "dtype"} == {
        k: v for k, v in before.items() if k != "dtype"
    }
    # otherwise a byte copy: only the dtype value's text changes
    pattern = re.compile(r'("dtype":\s*)"[a-z0-9]+"')
    assert pattern.sub(r'\1"X"', out_cfg) == pattern.sub(r'\1"X"', src_cfg)


def test_keep_dtype_copies_config_verbatim(cases: dict[str, Case], convert_to: Any) -> None:
    c = cases["llama_odd_fp32_ws3"]
    for dtype in (None, "keep"):
        dst = convert_to(c.dcp(), dtype=dtype)
        assert (dst / "config.json").read_bytes() == (c.hf / "config.json").read_bytes()


def test_cast_leaves_integers_and_bools(cases: dict[str, Case], convert_to: Any) -> None:
    import torch

    c = cases["dtensor_ws4"]
    got = load_output(convert_to(c.dcp(), dtype="bf16"))
    want = c.expected()
    floats = {torch.float32, torch.float16, torch.float64, torch.bfloat16}
    n_int = 0
    for name, t in want.items():
        if name not in got:
            continue
        if t.dtype in floats:
            assert_bit_equal(got[name], t.to(torch.bfloat16), name)
        else:
            n_int += 1
            assert_bit_equal(got[name], t, name)
    assert n_int >= 5
    assert sorted(got) == sorted(want)


def test_cast_f64_to_fp16_rounds_like_torch(cases: dict[str, Case], convert_to: Any) -> None:
    import torch

    c = cases["dtensor_ws4"]
    got = load_output(convert_to(c.dcp(), dtype="fp16", include=[r"^s1_rep$"]))
    want = c.reference()["s1_rep"]
    assert want.dtype == torch.float64
    assert_bit_equal(got["s1_rep"], want.to(torch.float16), "s1_rep")


# ---------------------------------------------------------------------------------------------
# Side files
# ---------------------------------------------------------------------------------------------

SIDE_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_side_files_copied_verbatim(cases: dict[str, Case], converted: Any, case: str) -> None:
    c = cases[case]
    out = converted(case, "dcp")
    assert c.hf is not None
    src_files = sorted(p.name for p in c.hf.iterdir())
    assert set(SIDE_FILES) <= set(src_files)
    for n in src_files:
        assert (out / n).read_bytes() == (c.hf / n).read_bytes(), n
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [3, 5]


def test_nemo_layout_finds_tokenizer_folder(cases: dict[str, Case], converted: Any) -> None:
    c = cases["nemo_llama_untied_fp32_ws2"]
    assert c.dcp().parts[-3:] == ("step_3", "policy", "weights")
    assert c.hf is not None and c.hf.name == "tokenizer"
    out = converted(c.name, "dcp")
    for n in SIDE_FILES:
        assert (out / n).read_bytes() == (c.hf / n).read_bytes()


def test_config_from(cases: dict[str, Case], convert_to: Any, tmp_path: Path) -> None:
    c = cases["llama_odd_fp32_ws3"]
    lonely = tmp_path / "lonely" / "ckpt"
    shutil.copytree(c.dcp(), lonely)
    bare = convert_to(lonely)
    assert not (bare / "config.json").exists()
    assert sorted(load_output(bare)) == sorted(c.out_keys)
    withcfg = convert_to(lonely, config_from=c.hf)
    for n in SIDE_FILES:
        assert (withcfg / n).read_bytes() == (c.hf / n).read_bytes()


def test_copy_files_false(cases: dict[str, Case], convert_to: Any) -> None:
    c = cases["llama_odd_fp32_ws3"]
    dst = convert_to(c.dcp(), copy_files=False)
    assert sorted(p.name for p in dst.iterdir()) == ["model.safetensors"]


def test_tied_decision_uses_config(cases: dict[str, Case], convert_to: Any, tmp_path: Path) -> None:
    """Without a config nothing says the weights are tied: both names are kept."""
    c = cases["llama_tied_bf16_ws2"]
    lonely = tmp_path / "lonely" / "ckpt"
    shutil.copytree(c.dcp(), lonely)
    got = load_output(convert_to(lonely))
    assert sorted(got) == sorted(c.model_keys)
    got = load_output(convert_to(lonely, config_from=c.hf))
    assert sorted(got) == sorted(c.out_keys)


# ---------------------------------------------------------------------------------------------
# Selection: optimizer and scheduler left out; include / exclude
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["nemo_llama_untied_fp32_ws2", "rlinf_llama_untied_bf16_ws2"])
def test_training_state_left_out(cases: dict[str, Case], converted: Any, case: str) -> None:
    c = cases[case]
    ckpt_keys = c.meta["checkpoint_keys"]
    assert any("exp_avg" in k for k in ckpt_keys)
    assert any("sched" in k for k in ckpt_keys)
    got = load_output(converted(case, "dcp"))
    assert sorted(got) == sorted(c.out_keys)
    assert not [k for k in got if "exp_avg" in k or "step" in k or "rng" in k]


def test_exclude_removes_by_output_name(cases: dict[str, Case], convert_to: Any) -> None:
    c = cases["llama_odd_fp32_ws3"]
    keys = c.out_keys
    got = load_output(convert_to(c.dcp(), exclude=[r".*mlp.*", r"^lm_head\..*"]))
    assert sorted(got) == sorted(k for k in keys if "mlp" not in k and not k.startswith("lm_head."))
    for k, t in c.expected().items():
        if k in got:
            assert_bit_equal(got[k], t, k)


def test_include_model_names_changes_nothing(cases: dict[str, Case], convert_to: Any) -> None:
    """``include`` adds entries (README); model tensors are in already."""
    c = cases["llama_odd_fp32_ws3"]
    got = load_output(convert_to(c.dcp(), include=[r"^model\.layers\.0\..*"]))
    assert sorted(got) == sorted(c.out_keys)


def test_include_adds_training_state(
    cases: dict[str, Case], convert_to: Any, tmp_path: Path
) -> None:
    """``include`` adds optimizer entries, bit-equal to torch's own full load."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    c = cases["nemo_llama_untied_fp32_ws2"]
    dst = convert_to(c.dcp(), include=[r"exp_avg_sq$"], exclude=[r".*layers\.1\..*"])
    got = load_output(dst)
    added = sorted(set(got) - set(c.out_keys))
    want_added = sorted(
        k for k in c.meta["checkpoint_keys"] if k.endswith("exp_avg_sq") and "layers.1." not in k
    )
    assert want_added and added == want_added
    assert sorted(set(got) & set(c.out_keys)) == sorted(
        k for k in c.out_keys if "layers.1." not in k
    )
    dcp_to_torch_save(c.dcp(), tmp_path / "full.pt")
    full = flatten_tensors(torch.load(tmp_path / "full.pt", weights_only=False))
    for k in added:
        assert_bit_equal(got[k], full[k], k)


# ---------------------------------------------------------------------------------------------
# GIL
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_dcp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A single-process DCP of ~96 MB, so a conversion lasts long enough to watch."""
    import torch
    import torch.distributed.checkpoint as dcp

    d = tmp_path_factory.mktemp("big") / "dcp"
    g = torch.Generator().manual_seed(0)
    state = {
        "model": {
            f"w{i}": torch.randn(2048, 4096, generator=g).to(torch.bfloat16) for i in range(6)
        }
    }
    dcp.save(state, checkpoint_id=d, no_dist=True)
    return d


def test_gil_released_during_convert(big_dcp: Path, tmp_path: Path) -> None:
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["report"] = fastckpt.convert(big_dcp, tmp_path / "out", fsync=True)
        except BaseException as e:  # pragma: no cover - reported below
            result["error"] = e

    t = threading.Thread(target=work)
    ticks = 0
    longest = 0.0
    start = last = time.perf_counter()
    t.start()
    while t.is_alive():
        ticks += 1
        now = time.perf_counter()
        longest = max(longest, now - last)
        last = now
    elapsed = time.perf_counter() - start
    t.join()
    assert "error" not in result, result.get("error")
    assert result["report"].nbytes == 6 * 2048 * 4096 * 2
    assert ticks > 1000
    # with the GIL held for the copy, the main thread would stall for the whole copy
    assert longest < 0.5 * elapsed, (longest, elapsed)


# ---------------------------------------------------------------------------------------------
# The sample shipped in examples/ (README quick start)
# ---------------------------------------------------------------------------------------------

SAMPLE = Path(__file__).parent.parent / "examples" / "tiny-llama-run" / "step_3" / "policy"


def test_shipped_sample_converts(tmp_path: Path, torch_single_thread: None) -> None:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    dst = tmp_path / "hf"
    report = fastckpt.convert(SAMPLE / "weights", dst)
    dcp_to_torch_save(SAMPLE / "weights", tmp_path / "full.pt")
    theirs = flatten_tensors(torch.load(tmp_path / "full.pt", weights_only=False)["model"])
    ours = load_output(dst)
    assert sorted(ours) == sorted(theirs)
    assert report.n_tensors == len(theirs)
    for k, t in theirs.items():
        assert_bit_equal(ours[k], t, k)
    for f in (SAMPLE / "tokenizer").iterdir():
        assert (dst / f.name).read_bytes() == f.read_bytes(), f.name
    _, info = AutoModelForCausalLM.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert fastckpt.verify(SAMPLE / "weights", dst).ok


def test_shipped_sample_tokenizer_loads_in_transformers_4_and_5() -> None:
    """The sample names a tokenizer class both majors know (5.x writes ``TokenizersBackend``,
    which 4.x cannot load) and its special tokens in the form both read; it loads here (5.x) and
    ``.ci/run`` loads it with transformers 4.x too."""
    from transformers import AutoTokenizer

    cfg = json.loads((SAMPLE / "tokenizer" / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "extra_special_tokens" not in cfg  # a list there breaks 4.x (it expects a dict)
    tok = AutoTokenizer.from_pretrained(SAMPLE / "tokenizer")
    assert {"<|im_start|>", "<|im_end|>"} <= set(tok.all_special_tokens)
    ids = tok("a checkpoint <|im_start|>")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["a", "checkpoint", "<|im_start|>"]


# ---------------------------------------------------------------------------------------------
# Property: any single-process DCP of odd tensors converts bit for bit, any shard size
# ---------------------------------------------------------------------------------------------

DTYPES = ["float32", "bfloat16", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"]


@st.composite
def _state_dicts(draw: Any) -> dict[str, Any]:
    import torch

    n = draw(st.integers(1, 6))
    names = draw(
        st.lists(
            st.from_regex(r"[a-z]{1,3}(\.[a-z0-9]{1,3}){0,2}", fullmatch=True),
            min_size=n,
            max_size=n,
            unique=True,
        )
    )
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        dtype = getattr(torch, draw(st.sampled_from(DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 7), min_size=0, max_size=3)))
        base = torch.randn(shape, generator=g) * 50
        t = base.to(dtype) if dtype != torch.bool else base > 0
        view = draw(st.sampled_from(["plain", "transpose", "slice"]))
        if view == "transpose" and t.dim() >= 2:
            t = t.transpose(0, 1)
        elif view == "slice" and t.dim() >= 1 and t.shape[0] > 1:
            t = t[1:]
        out[name] = t
    return out


def test_empty_tensors_share_a_shard_as_the_hub_splits(tmp_path: Path) -> None:
    """huggingface_hub's splitter (save_pretrained's) keys tensors by storage, and every empty
    tensor has the same one: later empty tensors join the first one's shard (found by the
    property test below)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from huggingface_hub import split_torch_state_dict_into_shards

    sd = {"a": torch.tensor(1.5), "b": torch.tensor(2.5), "c": torch.zeros(0),
          "aa": torch.tensor(3.5), "a.0": torch.zeros(0, 3)}  # fmt: skip
    dcp.save({"model": sd}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    fastckpt.convert(tmp_path / "dcp", tmp_path / "out", max_shard_size=4, fsync=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    split = split_torch_state_dict_into_shards(sd, max_shard_size=4)
    assert index["weight_map"] == split.tensor_to_filename
    second = "model-00002-of-00003.safetensors"
    assert index["weight_map"]["a.0"] == index["weight_map"]["c"] == second


@given(sd=_state_dicts(), shard=st.integers(1, 400))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_single_process_dcp(sd: dict[str, Any], shard: int) -> None:
    import tempfile

    import torch.distributed.checkpoint as dcp
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "dcp", Path(tmp) / "out"
        # dotted keys used verbatim, as in a model state dict
        dcp.save({"model": sd, "optim": {"lr": 0.1}}, checkpoint_id=src, no_dist=True)
        fastckpt.convert(src, dst, max_shard_size=shard)
        got = load_output(dst)
        assert sorted(got) == sorted(sd)
        for name, t in sd.items():
            assert_bit_equal(got[name], t.contiguous(), name)
        # same files as safetensors would write for the hub's split of the same tensors
        # fresh storages: the hub's splitter counts a view's whole storage, a DCP item does not
        want = {k: t.contiguous().clone() for k, t in sd.items()}
        split = split_torch_state_dict_into_shards(want, max_shard_size=shard)
        files = sorted(p.name for p in dst.glob("*.safetensors"))
        assert files == sorted(split.filename_to_tensors)
        for f, names in split.filename_to_tensors.items():
            ref = Path(tmp) / "ref.safetensors"
            save_file({k: want[k].clone() for k in names}, str(ref), metadata={"format": "pt"})
            assert sha256(dst / f) == sha256(ref), f
