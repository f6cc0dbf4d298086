"""Checkpoints written by torch's own ``HuggingFaceStorageWriter`` (2 gloo ranks, FSDP2).

``tests/data/make_hf_storage_fixtures.py`` writes them once per session. A distributed save
(``save_distributed=True``) holds each rank's pieces with their global offsets in the header's
``DCP_SHARDING_INFO`` and no global shape: the pieces are put together, bit for bit equal to the
full state dict, and any missing piece is refused naming the tensor and the region.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import fastckpt
import pytest
from conftest import assert_bit_equal, generated, load_output
from fastckpt import FormatError, ShapeError

GENERATOR = Path(__file__).parent / "data" / "make_hf_storage_fixtures.py"


@pytest.fixture(scope="session")
def hfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated(tmp_path_factory, "hf_storage", GENERATOR, keep_env="FASTCKPT_HFS_FIXTURES")


def _reference(hfs: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return dict(load_file(hfs / "ref" / "model.safetensors"))


@pytest.mark.parametrize("case", ["distributed", "two_files", "consolidated/sharded", "rank0"])
def test_converts_bit_exact(hfs: Path, tmp_path: Path, case: str) -> None:
    out = tmp_path / "out"
    report = fastckpt.convert(hfs / case, out, config_from=hfs / "ref", fsync=False)
    ref = _reference(hfs)
    got = load_output(out)
    assert sorted(got) == sorted(ref)
    assert report.n_tensors == len(ref)
    for name, t in ref.items():
        assert_bit_equal(got[name], t, name)
    # and equal to torch's own consolidation of the same pieces
    assert fastckpt.verify(out, hfs / "consolidated").ok


def test_inspect_names_the_pieces(hfs: Path) -> None:
    info = fastckpt.inspect(hfs / "distributed")
    assert info.format == "hf_dcp_shards"
    emb = next(t for t in info.tensors if t.name == "model.embed_tokens.weight")
    assert emb.shape == (67, 32) and emb.chunks == 2  # 34 + 33 rows


def test_one_ranks_file_alone_is_refused(hfs: Path, tmp_path: Path) -> None:
    """It used to convert, exit 0, into a cut model (embed_tokens [34, 32] of [67, 32])."""
    lone = hfs / "distributed" / "shard-00001-model-00001-of-00001.safetensors"
    with pytest.raises(FormatError, match=r"one rank's pieces .* convert the folder"):
        fastckpt.convert(lone, tmp_path / "out", fsync=False)
    assert not (tmp_path / "out").exists()


def test_a_missing_shard_is_refused(hfs: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(hfs / "distributed" / "shard-00002-model-00001-of-00001.safetensors", src)
    with pytest.raises(FormatError, match=r"shard\(s\) \[1\] are missing"):
        fastckpt.convert(src, tmp_path / "out", fsync=False)
    assert not (tmp_path / "out").exists()


def test_a_missing_piece_names_the_tensor_and_region(hfs: Path, tmp_path: Path) -> None:
    """Rank 1's file 2 of 2 (its rows of the embedding and lm_head) left out."""
    src = tmp_path / "src"
    shutil.copytree(hfs / "two_files", src)
    (src / "shard-00001-model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ShapeError, match=r"tensor '(lm_head|model\.embed_tokens)\.weight' of shape "
                       r"\[67, 32\]: no piece holds \[0:34, 0:32\]"):  # fmt: skip
        fastckpt.convert(src, tmp_path / "out", fsync=False)
    assert not (tmp_path / "out").exists()


def test_loads_in_transformers(hfs: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    fastckpt.convert(hfs / "distributed", out, config_from=hfs / "ref", fsync=False)
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
