"""Folders written by accelerate's own ``save_state()`` (FSDP1 and FSDP2, ``SHARDED_STATE_DICT``,
2 gloo ranks, CPU); every test runs for both.

``tests/data/make_accelerate_fixtures.py`` writes them once per session with the full model and
optimizer state next to each (``get_model_state_dict`` / ``get_optimizer_state_dict``,
``full_state_dict=True``).
"""

from __future__ import annotations

from pathlib import Path

import fastckpt
import pytest
from conftest import assert_bit_equal, generated
from fastckpt import FormatError

GENERATOR = Path(__file__).parent / "data" / "make_accelerate_fixtures.py"


@pytest.fixture(scope="session")
def acc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated(tmp_path_factory, "accelerate", GENERATOR, keep_env="FASTCKPT_ACC_FIXTURES")


@pytest.fixture(params=["fsdp1", "fsdp2"])
def acc(acc_root: Path, request: pytest.FixtureRequest) -> Path:
    """One version's case: ``state/`` (the save_state folder) and ``ref/`` (the full state)."""
    return acc_root / str(request.param)


def _load(path: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return dict(load_file(path))


@pytest.mark.parametrize("where", ["state", "state/pytorch_model_fsdp_0"])
def test_save_state_folder_converts_with_its_optimizer(
    acc: Path, tmp_path: Path, where: str
) -> None:
    """The folder itself (it used to be "not a checkpoint"), or its model DCP; --with-optimizer
    reads the optimizer_0/ beside it (it used to find nothing)."""
    out = tmp_path / "out"
    report = fastckpt.convert(
        acc / where, out, config_from=acc / "ref", with_optimizer=True, fsync=False
    )
    model = _load(acc / "ref" / "model.safetensors")
    got = _load(out / "model.safetensors")
    assert sorted(got) == sorted(model) and report.n_tensors == len(model)
    for name, t in model.items():
        assert_bit_equal(got[name], t, name)
    optim = _load(acc / "ref" / "optimizer.safetensors")
    got_optim = _load(out / "optimizer.safetensors")
    assert sorted(got_optim) == sorted(optim)
    for name, t in optim.items():
        assert_bit_equal(got_optim[name], t, name)
    assert (out / "config.json").read_bytes() == (acc / "ref" / "config.json").read_bytes()


def test_optimizer_folder_alone_refused_then_include_works(acc: Path, tmp_path: Path) -> None:
    """Its entries are all under ``optimizer.``: no model to take unless asked for by name (the
    refusal used to come before --include was applied, so its advice could not work)."""
    src = acc / "state" / "optimizer_0"
    with pytest.raises(FormatError, match=r"cannot tell .*groups: optimizer\)"):
        fastckpt.convert(src, tmp_path / "out", fsync=False)
    report = fastckpt.convert(src, tmp_path / "all", include=[".*"], fsync=False)
    assert report.n_tensors == len(_load(acc / "ref" / "optimizer.safetensors"))
