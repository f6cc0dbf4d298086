"""DCP writer variants that defeat the fast path, written by the installed torch.

``tests/data/make_dcp_variants.py`` writes them (see its docstring):

- ZStandard stream transforms are refused with a FormatError that names the variant and the file
  and leaves no output; the workaround the message gives converts bit for bit;
- an unknown stream transform is refused even though its bytes happen to be plain archives;
- per-rank ``__R.metadata`` files (``use_collectives=False``, no global ``.metadata``, no dedup)
  convert bit for bit.

fastckpt decodes no stream transform: its Rust core copies tensor bytes straight from the mapped
files, and zstd would make ``zstandard`` a runtime dependency for an experimental torch option
(``FileSystemWriter(_extensions=...)``, underscore-prefixed). The refusal says how to let torch
decompress first.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import fastckpt
import pytest
from conftest import assert_bit_equal, generated, load_output

HERE = Path(__file__).parent
GENERATOR = HERE / "data" / "make_dcp_variants.py"
ZSTD_MAGIC = bytes.fromhex("28b52ffd")


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated(
        tmp_path_factory,
        "dcp_variants",
        GENERATOR,
        keep_env="FASTCKPT_VARIANT_FIXTURES",
        timeout=600,
    )


def _expected(root: Path, case: str) -> dict[str, object]:
    from safetensors.torch import load_file

    return dict(load_file(str(root / f"{case}.expected.safetensors")))


def _storage(src: Path) -> list[object]:
    from fastckpt.formats.dcp import load_metadata

    return list(load_metadata(src).storage_data.values())


def _assert_refused_without_output(src: Path, dst: Path, *needles: str) -> str:
    before = sorted(os.listdir(dst.parent))
    with pytest.raises(fastckpt.FormatError) as err:
        fastckpt.convert(src, dst)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, msg
    assert not dst.exists()
    assert sorted(os.listdir(dst.parent)) == before  # no temporary folder left beside dst
    return msg


# ---------------------------------------------------------------------------------------------
# ZStandard (FileSystemWriter(_extensions=[ZStandard()]))
# ---------------------------------------------------------------------------------------------


def test_zstd_fixture_is_compressed(variants: Path) -> None:
    """The fixture really is the variant: every item is a zstd frame, described as such."""
    src = variants / "zstd"
    data = (src / "__0_0.distcp").read_bytes()
    infos = _storage(src)
    assert infos
    for info in infos:
        assert list(info.transform_descriptors) == ["stream.zstd/1"]  # type: ignore[attr-defined]
        start = int(info.offset)  # type: ignore[attr-defined]
        assert data[start : start + 4] == ZSTD_MAGIC
    assert b"PK\x03\x04" not in data


def test_zstd_refused_naming_variant_and_file(variants: Path, tmp_path: Path) -> None:
    src = variants / "zstd"
    _assert_refused_without_output(
        src, tmp_path / "out", "ZStandard", "stream.zstd/1", str(src / "__0_0.distcp")
    )


def test_zstd_refused_by_open_and_noted_by_inspect(variants: Path) -> None:
    src = variants / "zstd"
    info = fastckpt.inspect(src)
    assert sorted(t.name for t in info.tensors) == sorted(_expected(variants, "zstd"))
    assert any("ZStandard" in note for note in info.notes), info.notes
    with fastckpt.open(src) as ckpt, pytest.raises(fastckpt.FormatError, match="ZStandard"):
        ckpt.tensor("embed_tokens.weight")


def test_zstd_workaround_in_message_converts_bit_exact(variants: Path, tmp_path: Path) -> None:
    """Run the torch command the refusal suggests, then convert its output."""
    src = variants / "zstd"
    msg = _assert_refused_without_output(src, tmp_path / "refused", "python -m")
    command = msg.split("(python -m ", 1)[1].split(")", 1)[0]
    full = tmp_path / "full.pt"
    argv = shlex.split(command.replace("SRC", str(src)).replace("full.pt", str(full)))
    subprocess.run([sys.executable, "-m", *argv], check=True, capture_output=True, timeout=300)
    dst = tmp_path / "out"
    fastckpt.convert(full, dst)
    got = load_output(dst)
    want = _expected(variants, "zstd")
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert_bit_equal(got[name], t, name)


# ---------------------------------------------------------------------------------------------
# A stream transform fastckpt does not know
# ---------------------------------------------------------------------------------------------


def test_unknown_transform_refused(variants: Path, tmp_path: Path) -> None:
    """Refused by name even though this transform left the archives intact."""
    src = variants / "identity_transform"
    infos = _storage(src)
    assert {tuple(i.transform_descriptors) for i in infos} == {  # type: ignore[attr-defined]
        ("stream.fastckpt-identity/1",)
    }
    data = (src / "__0_0.distcp").read_bytes()
    assert all(data[int(i.offset) :].startswith(b"PK\x03\x04") for i in infos)  # type: ignore[attr-defined]
    _assert_refused_without_output(
        src, tmp_path / "out", "stream.fastckpt-identity/1", str(src / "__0_0.distcp")
    )


# ---------------------------------------------------------------------------------------------
# Per-rank metadata (dcp.save(..., use_collectives=False))
# ---------------------------------------------------------------------------------------------


def test_nocoll_layout(variants: Path) -> None:
    """No global .metadata; each rank lists its own chunks, replicated ones on both ranks."""
    from fastckpt.formats.dcp import _load_metadata_file

    src = variants / "nocoll_ws2"
    names = sorted(os.listdir(src))
    assert names == ["__0.metadata", "__0_0.distcp", "__1.metadata", "__1_0.distcp"]
    per_rank = [_load_metadata_file(src / f"__{r}.metadata") for r in (0, 1)]
    for md in per_rank:
        rep = md.state_dict_metadata["model.replicated"]
        assert [tuple(c.offsets) for c in rep.chunks] == [(0,)]
        assert {i.fqn for i in md.storage_data} >= {"model.replicated", "model.plain"}


def test_nocoll_converts_bit_exact(variants: Path, tmp_path: Path) -> None:
    src = variants / "nocoll_ws2"
    dst = tmp_path / "out"
    report = fastckpt.convert(src, dst)
    got = load_output(dst)
    want = _expected(variants, "nocoll_ws2")
    for name, t in want.items():
        if name in got:
            assert_bit_equal(got[name], t, name)
    assert sorted(got) == sorted(want)
    assert report.n_tensors == len(want)
