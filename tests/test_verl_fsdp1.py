"""veRL's own FSDP1 checkpoints: ``ShardedTensor`` rank files (no device mesh) and DTensor rank
files (veRL's ``fsdp`` mesh); issue 10.

``tests/data/verl_fsdp1/`` and ``tests/data/verl_fsdp1_mesh/`` were written by veRL 0.9.1's
``FSDPCheckpointManager.save_checkpoint`` (``tests/data/make_verl_fsdp1_fixtures.py OUT
[--mesh]``: a tiny Llama with uneven dims, FSDP1 as veRL's engine wraps it, one AdamW step, 2 CPU
gloo ranks) into ``global_step_1/actor/``, with ``latest_checkpointed_iteration.txt`` beside it
as veRL's trainer writes it. ``ref/`` holds the full state dict gathered in the same run
(``FULL_STATE_DICT``). veRL is not a test dependency: the files are committed.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Any

import fastckpt
import pytest
from conftest import assert_bit_equal, load_output
from fastckpt import FormatError, ShapeError
from fastckpt.cli import app
from typer.testing import CliRunner

DATA = Path(__file__).parent / "data"
# case -> the class veRL's rank files hold, and what a lone rank file is refused with
CASES = {
    "verl_fsdp1": ("ShardedTensor", ["offsets [34, 0] (sizes [33, 32])", "rank 1's"]),
    "verl_fsdp1_mesh": (
        "DTensor",
        ["cover 1088 of 2144 elements", "offsets [34, 0] (sizes [33, 32])", "a single rank's file"],
    ),
}
SIDE_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json"]


def _actor(case: str) -> Path:
    return DATA / case / "global_step_1" / "actor"


def _reference(case: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return dict(load_file(DATA / case / "ref" / "model.safetensors"))


@pytest.mark.parametrize("case", CASES)
def test_rank_files_hold_the_expected_class(case: str) -> None:
    """The fixture is what its name says: no mesh gives ShardedTensors, veRL's mesh DTensors."""
    with zipfile.ZipFile(_actor(case) / "model_world_size_2_rank_0.pt") as z:
        pickle = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    want = CASES[case][0]
    other = "DTensor" if want == "ShardedTensor" else "ShardedTensor"
    assert want.encode() in pickle and other.encode() not in pickle


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("source", ["run", "rank_files"])
def test_verl_fsdp1_bitexact(case: str, source: str, tmp_path: Path) -> None:
    """The run folder (latest step, actor) and the rank-file folder: every tensor bit for bit,
    veRL's ``huggingface/`` config and tokenizer copied byte for byte."""
    actor, out = _actor(case), tmp_path / "out"
    if source == "run":
        report = fastckpt.convert(DATA / case, out, step="latest", role="actor", fsync=False)
        assert any("step 1" in n for n in report.notes), report.notes
    else:
        report = fastckpt.convert(actor, out, fsync=False)
    want, got = _reference(case), load_output(out)
    assert sorted(got) == sorted(want) and report.n_tensors == len(want)
    assert tuple(got["model.embed_tokens.weight"].shape) == (67, 32)  # rows 34 + 33
    assert tuple(got["model.layers.0.mlp.gate_proj.weight"].shape) == (45, 32)  # rows 23 + 22
    for name, tensor in want.items():
        assert_bit_equal(got[name], tensor, name)
    for name in SIDE_FILES:
        assert (out / name).read_bytes() == (actor / "huggingface" / name).read_bytes(), name


@pytest.mark.parametrize("case", CASES)
def test_verify_and_inspect(case: str) -> None:
    ref, actor = DATA / case / "ref", _actor(case)
    report = fastckpt.verify(DATA / case, ref)
    assert report.ok and report.n_tensors == 21, report
    r = CliRunner().invoke(app, ["verify", str(actor), str(ref)])
    assert r.exit_code == 0, r.output
    want = sum(t.numel() * t.element_size() for t in _reference(case).values())
    for src, kwargs in ((actor, {}), (DATA / case, {"step": "latest", "role": "actor"})):
        info = fastckpt.inspect(src, **kwargs)
        assert info.format == "torch_ranks" and info.path == actor
        assert len(info.tensors) == 21 and info.total_bytes == want
        assert all(t.chunks == 2 for t in info.tensors)


@pytest.mark.parametrize("case", CASES)
def test_missing_rank_file_refused(case: str, tmp_path: Path) -> None:
    d = tmp_path / "actor"
    shutil.copytree(_actor(case), d)
    (d / "model_world_size_2_rank_1.pt").unlink()
    with pytest.raises(FormatError, match=r"model_world_size_2_rank_1\.pt: missing rank file"):
        fastckpt.convert(d, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", CASES)
def test_one_rank_file_names_tensor_and_region(case: str, tmp_path: Path) -> None:
    """A rank file on its own would be a cut model: refused, naming the tensor and what is
    missing (the region, by offsets and sizes)."""
    with pytest.raises(ShapeError) as err:
        fastckpt.convert(_actor(case) / "model_world_size_2_rank_0.pt", tmp_path / "out")
    message = str(err.value)
    for needle in ("'model.embed_tokens.weight'", *CASES[case][1]):
        assert needle in message, message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", CASES)
def test_flat_parameter_optimizer_refused(case: str, tmp_path: Path) -> None:
    """veRL saves FSDP1's ``optimizer.state_dict()`` keyed by flat-parameter index
    (``use_orig_params=False``, its default): ``--with-optimizer`` says why it cannot map it."""
    with pytest.raises(FormatError, match="FSDP1 flat parameters"):
        fastckpt.convert(DATA / case, tmp_path / "out", with_optimizer=True)
    assert not (tmp_path / "out").exists()
