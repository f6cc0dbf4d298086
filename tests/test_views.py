"""``fastckpt.open`` / ``inspect`` / ``verify`` and the no-torch guarantee."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import fastckpt
import numpy as np
import pytest
from conftest import ALL_DCP, Case, assert_bit_equal, load_output, safetensors_header

SAFETENSORS_DTYPE = {
    "float32": "F32",
    "float64": "F64",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "uint8": "U8",
    "bool": "BOOL",
}


def _chunks(dcp_dir: Path) -> dict[str, list[Any]]:
    """DCP fqn -> chunk list, as torch reads the (global) metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(dcp_dir)).read_metadata()
    return {
        k: list(v.chunks)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }


def _np_to_torch(a: np.ndarray) -> Any:
    import ml_dtypes
    import torch

    a = np.array(a, copy=True, order="C")  # torch warns on read-only arrays
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _strip(fqn: str, wrapper: str) -> str:
    prefix = {"nemo": "model.", "rlinf": "fsdp_checkpoint.model.", "prime": "app.model."}[wrapper]
    assert fqn.startswith(prefix)
    return fqn[len(prefix) :]


# ---------------------------------------------------------------------------------------------
# open() on a DCP folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "variant"), ALL_DCP, ids=[f"{c}-{v}" for c, v in ALL_DCP])
def test_open_dcp_tensors(cases: dict[str, Case], case: str, variant: str) -> None:
    import ml_dtypes
    import torch

    c = cases[case]
    ref = c.reference()
    with fastckpt.open(c.dcp(variant)) as ckpt:
        assert ckpt.format == "dcp"
        keys = list(ckpt.keys())
        assert len(keys) == len(set(keys))
        extra = set(keys) - set(c.out_keys)
        assert extra <= ({"lm_head.weight"} if c.tied else set()), extra
        for name in keys:
            want = ref[name]
            info = ckpt.info(name)
            assert info.name == name
            assert info.dtype == SAFETENSORS_DTYPE[str(want.dtype).removeprefix("torch.")]
            assert tuple(info.shape) == tuple(want.shape)
            assert info.nbytes == want.numel() * want.element_size()
            assert info.chunks >= 1
            arr = ckpt.tensor(name)
            assert isinstance(arr, np.ndarray)
            assert arr.shape == tuple(want.shape)
            if want.dtype == torch.bfloat16:
                assert arr.dtype == ml_dtypes.bfloat16
            assert_bit_equal(_np_to_torch(arr), want, name)
            t = ckpt.tensor(name, framework="pt")
            assert isinstance(t, torch.Tensor)
            assert_bit_equal(t, want, name)
        assert set(c.out_keys) <= set(keys), sorted(set(c.out_keys) - set(keys))


@pytest.mark.parametrize("case", ["llama_odd_fp32_ws3", "prime_qwen2_tied_fp32_ws3", "dtensor_ws4"])
def test_info_chunk_counts(cases: dict[str, Case], case: str) -> None:
    c = cases[case]
    chunks = _chunks(c.dcp())
    wrapper = c.meta.get("wrapper", "nemo")
    with fastckpt.open(c.dcp()) as ckpt:
        keys = set(ckpt.keys())
        seen_multi = False
        for fqn, cl in chunks.items():
            if not fqn.startswith({"nemo": "model.", "rlinf": "f", "prime": "app.model."}[wrapper]):
                continue
            name = _strip(fqn, wrapper)
            if name not in keys:
                continue
            nonempty = sum(1 for ch in cl if all(s > 0 for s in ch.sizes))
            info = ckpt.info(name)
            if nonempty == len(cl):
                assert info.chunks == len(cl), name
            else:  # zero-size chunks: counting them or not are both honest
                assert info.chunks in (nonempty, len(cl)), name
            seen_multi |= len(cl) > 1
        assert seen_multi


def test_info_world_size_chunks(cases: dict[str, Case]) -> None:
    with fastckpt.open(cases["dtensor_ws4"].dcp()) as ckpt:
        assert ckpt.info("blocks").chunks == 4  # [Shard(0), Shard(1)] on a 2x2 mesh
        assert ckpt.info("rep_s1").chunks == 2  # [Replicate(), Shard(1)]: deduplicated
        assert ckpt.info("scalar").chunks == 1
        assert tuple(ckpt.info("scalar").shape) == ()
        assert tuple(ckpt.info("empty").shape) == (0, 5)
        assert ckpt.info("empty").nbytes == 0
        assert ckpt.info("mask").dtype == "BOOL"
    with fastckpt.open(cases["dtensor_ws4"].dcp("dcp_nocoll")) as ckpt:
        assert ckpt.info("blocks").chunks == 4  # per-rank metadata merged, duplicates dropped
        assert ckpt.info("scalar").chunks == 1


def test_nested_keys_under_wrapper(cases: dict[str, Case]) -> None:
    """``{"model": {"nested": {"a": {"b": t}}}}``: the wrapper is stripped once (dcp.md 7)."""
    c = cases["dtensor_ws4"]
    ref = c.reference()
    with fastckpt.open(c.dcp()) as ckpt:
        assert {"nested.a.b", "nested.a.c.d"} <= set(ckpt.keys())
        assert ckpt.info("nested.a.c.d").dtype == "I64"
        assert_bit_equal(ckpt.tensor("nested.a.b", framework="pt"), ref["nested.a.b"], "b")


def test_unknown_name(cases: dict[str, Case]) -> None:
    with fastckpt.open(cases["dtensor_ws3"].dcp()) as ckpt:
        with pytest.raises((KeyError, fastckpt.MappingError)):
            ckpt.info("no.such.tensor")
        with pytest.raises((KeyError, fastckpt.MappingError)):
            ckpt.tensor("no.such.tensor")
        # training state is not a model tensor
        with pytest.raises((KeyError, fastckpt.MappingError)):
            ckpt.tensor("extra.step")


def test_one_chunk_tensor_is_zero_copy(cases: dict[str, Case]) -> None:
    c = cases["dtensor_ws4"]
    ref = c.reference()
    with fastckpt.open(c.dcp()) as ckpt:
        for name in ["ids_i64", "mask", "bytes_u8", "sliced", "half", "ids_i32"]:
            assert ckpt.info(name).chunks == 1
            arr = ckpt.tensor(name)
            assert not arr.flags.owndata, name  # a view on the mapping, not a copy
            assert not arr.flags.writeable, name  # the source is read-only
            base = arr
            while isinstance(base, np.ndarray) and base.base is not None:
                base = base.base
            assert not isinstance(base, np.ndarray), name
            assert_bit_equal(_np_to_torch(arr), ref[name], name)


def test_ws1_tensors_are_zero_copy(cases: dict[str, Case]) -> None:
    c = cases["llama_tied_fp32_ws1"]
    with fastckpt.open(c.dcp()) as ckpt:
        for name in c.out_keys:
            assert ckpt.info(name).chunks == 1
            arr = ckpt.tensor(name)
            assert not arr.flags.owndata and not arr.flags.writeable, name


def test_multi_chunk_tensor_is_owned_copy(cases: dict[str, Case]) -> None:
    c = cases["dtensor_ws4"]
    with fastckpt.open(c.dcp()) as ckpt:
        arr = ckpt.tensor("blocks_uneven")
        assert arr.flags.c_contiguous
        assert_bit_equal(_np_to_torch(arr), c.reference()["blocks_uneven"], "blocks_uneven")


def test_pt_tensor_outlives_checkpoint(cases: dict[str, Case]) -> None:
    import torch

    c = cases["dtensor_ws4"]
    with fastckpt.open(c.dcp()) as ckpt:
        t = ckpt.tensor("ids_i64", framework="pt")
        a = ckpt.tensor("shard0_uneven")
    assert torch.equal(t, c.reference()["ids_i64"])
    assert_bit_equal(_np_to_torch(a), c.reference()["shard0_uneven"], "shard0_uneven")


# ---------------------------------------------------------------------------------------------
# open() on Hugging Face output
# ---------------------------------------------------------------------------------------------


def test_open_safetensors_folder_and_file(cases: dict[str, Case], convert_to: Any) -> None:
    c = cases["llama_odd_fp32_ws3"]
    sharded = convert_to(c.dcp(), max_shard_size="50KB")
    single = convert_to(c.dcp())
    want = c.expected()
    for path in (sharded, single, single / "model.safetensors"):
        with fastckpt.open(path) as ckpt:
            assert ckpt.format == "safetensors"
            assert sorted(ckpt.keys()) == sorted(want)
            for name, t in want.items():
                assert ckpt.info(name).dtype == "F32"
                assert ckpt.info(name).chunks == 1
                arr = ckpt.tensor(name)
                assert not arr.flags.owndata
                assert_bit_equal(_np_to_torch(arr), t, name)
                assert_bit_equal(ckpt.tensor(name, framework="pt"), t, name)


# ---------------------------------------------------------------------------------------------
# inspect()
# ---------------------------------------------------------------------------------------------


def test_inspect_dcp(cases: dict[str, Case]) -> None:
    c = cases["nemo_llama_untied_fp32_ws2"]
    info = fastckpt.inspect(c.dcp())
    assert info.format == "dcp"
    assert Path(info.path) == c.dcp()
    names = [t.name for t in info.tensors]
    assert sorted(names) == sorted(c.out_keys)
    ref = c.reference()
    assert info.total_bytes == sum(ref[n].numel() * ref[n].element_size() for n in names)
    assert info.skipped, "optimizer / scheduler / rng entries should be reported as skipped"
    assert not set(info.skipped) & set(names)


def test_inspect_output(converted: Any, cases: dict[str, Case]) -> None:
    out = converted("llama_tied_bf16_ws2", "dcp")
    info = fastckpt.inspect(out)
    assert info.format == "safetensors"
    assert sorted(t.name for t in info.tensors) == sorted(cases["llama_tied_bf16_ws2"].out_keys)
    assert {t.dtype for t in info.tensors} == {"BF16"}


# ---------------------------------------------------------------------------------------------
# verify()
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "variant"), ALL_DCP, ids=[f"{c}-{v}" for c, v in ALL_DCP])
def test_verify_ok(cases: dict[str, Case], converted: Any, case: str, variant: str) -> None:
    c = cases[case]
    rep = fastckpt.verify(c.dcp(variant), converted(case, variant))
    assert rep.ok, rep
    assert rep.mismatches == []
    assert rep.only_in_b == []
    assert set(rep.only_in_a) <= ({"lm_head.weight"} if c.tied else set())
    assert rep.n_tensors >= len(c.out_keys)


def _flip_byte_of(folder: Path, name: str) -> None:
    for f in folder.glob("*.safetensors"):
        n, header = safetensors_header(f)
        if name in header:
            begin, end = header[name]["data_offsets"]
            assert end > begin
            pos = 8 + n + (begin + end) // 2
            data = bytearray(f.read_bytes())
            data[pos] ^= 0x01
            f.write_bytes(bytes(data))
            return
    raise AssertionError(f"{name} not found")


@pytest.mark.parametrize("victim", ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"])
def test_verify_reports_flipped_byte(
    cases: dict[str, Case], converted: Any, tmp_path: Path, victim: str
) -> None:
    c = cases["llama_odd_fp32_ws3"]
    copy = tmp_path / "copy"
    shutil.copytree(converted(c.name, "dcp"), copy)
    _flip_byte_of(copy, victim)
    rep = fastckpt.verify(c.dcp(), copy)
    assert not rep.ok
    assert rep.mismatches == [victim]
    assert rep.only_in_a == [] and rep.only_in_b == []
    # safetensors against safetensors, both directions
    rep2 = fastckpt.verify(copy, converted(c.name, "dcp"))
    assert not rep2.ok and rep2.mismatches == [victim]


def test_verify_reports_missing_tensor(cases: dict[str, Case], convert_to: Any) -> None:
    c = cases["llama_odd_fp32_ws3"]
    partial = convert_to(c.dcp(), exclude=[r"^model\.norm\.weight$"])
    rep = fastckpt.verify(c.dcp(), partial)
    assert not rep.ok
    assert rep.only_in_a == ["model.norm.weight"]
    assert rep.mismatches == []


def test_verify_cast_output_differs(cases: dict[str, Case], convert_to: Any) -> None:
    c = cases["llama_odd_fp32_ws3"]
    rep = fastckpt.verify(c.dcp(), convert_to(c.dcp(), dtype="bf16"))
    assert not rep.ok
    assert sorted(rep.mismatches) == sorted(c.out_keys)


# ---------------------------------------------------------------------------------------------
# torch is never imported
# ---------------------------------------------------------------------------------------------


def test_never_imports_torch(cases: dict[str, Case], tmp_path: Path) -> None:
    c = cases["llama_tied_bf16_ws2"]
    script = textwrap.dedent(
        """
        import json, sys
        import fastckpt
        assert "torch" not in sys.modules, "import fastckpt imported torch"
        src, dst = sys.argv[1], sys.argv[2]
        rep = fastckpt.convert(src, dst, dtype="fp16", max_shard_size="20KB")
        info = fastckpt.inspect(src)
        ver = fastckpt.verify(src, dst)
        with fastckpt.open(src) as ckpt:
            arrays = [ckpt.tensor(k) for k in ckpt.keys()]
        with fastckpt.open(dst) as ckpt:
            arrays += [ckpt.tensor(k) for k in ckpt.keys()]
        from fastckpt.cli import app  # the CLI module too
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print(json.dumps({"torch": bad, "n": rep.n_tensors, "arrays": len(arrays),
                          "tensors": len(info.tensors), "verified": ver.n_tensors}))
        """
    )
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(c.dcp()), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["torch"] == []
    assert res["n"] == len(c.out_keys)
    assert res["arrays"] >= 2 * len(c.out_keys)
    got = load_output(tmp_path / "out")
    assert sorted(got) == sorted(c.out_keys)
