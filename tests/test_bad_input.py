"""Broken sources and hostile destinations: clear errors, no partial output, source untouched."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import fastckpt
import pytest
from conftest import Case, assert_bit_equal, load_output, tree_digest


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _storage(dcp_dir: Path) -> list[tuple[str, str, int, int]]:
    """(fqn, file, offset, length) of every tensor item, read with torch's own reader."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(dcp_dir)).read_metadata()
    out = []
    for k, info in md.storage_data.items():
        if k.offset is not None:
            out.append((k.fqn, info.relative_path, info.offset, info.length))
    return out


def _model_items(dcp_dir: Path, file: str) -> list[tuple[str, int, int]]:
    return sorted(
        (
            (fqn, off, ln)
            for fqn, f, off, ln in _storage(dcp_dir)
            if f == file and fqn[:6] == "model."
        ),
        key=lambda t: t[1],
    )


def _names(fqn: str) -> tuple[str, str]:
    """The DCP key and the HF name (wrapper ``model.`` stripped)."""
    return fqn, fqn.removeprefix("model.")


# ---------------------------------------------------------------------------------------------
# incomplete / truncated / corrupt sources
# ---------------------------------------------------------------------------------------------


def test_missing_metadata_is_incomplete(cases: dict[str, Case], tmp_path: Path) -> None:
    ckpt = _copy(cases["llama_odd_fp32_ws3"].dcp(), tmp_path / "ckpt")
    (ckpt / ".metadata").unlink()
    dst = tmp_path / "out"
    with pytest.raises(fastckpt.FormatError, match=r"(?i)incomplete"):
        fastckpt.convert(ckpt, dst)
    with pytest.raises(fastckpt.FormatError, match=r"(?i)incomplete"):
        fastckpt.inspect(ckpt)
    assert not dst.exists()


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(fastckpt.FormatError):
        fastckpt.convert(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises((FileNotFoundError, fastckpt.FastckptError), match="nothing-here"):
        fastckpt.convert(tmp_path / "nothing-here", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_rank_file(cases: dict[str, Case], tmp_path: Path) -> None:
    ckpt = _copy(cases["llama_odd_fp32_ws3"].dcp(), tmp_path / "ckpt")
    (ckpt / "__2_0.distcp").unlink()
    with pytest.raises((FileNotFoundError, fastckpt.FastckptError), match=r"__2_0\.distcp"):
        fastckpt.convert(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_per_rank_metadata(cases: dict[str, Case], tmp_path: Path) -> None:
    """``use_collectives=False`` with one rank's ``__r.metadata`` lost: chunks are missing."""
    ckpt = _copy(cases["dtensor_ws4"].dcp("dcp_nocoll"), tmp_path / "ckpt")
    (ckpt / "__3.metadata").unlink()
    with pytest.raises(fastckpt.FastckptError):
        fastckpt.convert(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rank_file", ["__0_0.distcp", "__1_0.distcp", "__2_0.distcp"])
def test_truncated_distcp_names_file_and_tensor(
    cases: dict[str, Case], tmp_path: Path, rank_file: str
) -> None:
    ckpt = _copy(cases["llama_odd_fp32_ws3"].dcp(), tmp_path / "ckpt")
    items = _model_items(ckpt, rank_file)
    fqn, off, ln = items[-1]  # cut the last model tensor of this file in half
    with (ckpt / rank_file).open("r+b") as f:
        f.truncate(off + ln // 2)
    affected = [n for it in items if it[1] + it[2] > off + ln // 2 for n in _names(it[0])]
    with pytest.raises(fastckpt.FormatError) as ei:
        fastckpt.convert(ckpt, tmp_path / "out")
    msg = str(ei.value)
    assert rank_file in msg, msg
    assert any(n in msg for n in affected), msg
    assert not (tmp_path / "out").exists()
    with pytest.raises(fastckpt.FormatError, match=rank_file):
        with fastckpt.open(ckpt) as c:
            c.tensor(fqn.removeprefix("model."))


@pytest.mark.parametrize("where", ["local-header", "eocd", "data-pkl"])
def test_corrupt_zip_item(cases: dict[str, Case], tmp_path: Path, where: str) -> None:
    ckpt = _copy(cases["llama_odd_fp32_ws3"].dcp(), tmp_path / "ckpt")
    _fqn, off, ln = _model_items(ckpt, "__1_0.distcp")[0]
    data = bytearray((ckpt / "__1_0.distcp").read_bytes())
    item = bytes(data[off : off + ln])
    if where == "local-header":
        assert item[:4] == b"PK\x03\x04"
        data[off : off + 4] = b"XXXX"
    elif where == "eocd":
        assert item[-22:-18] == b"PK\x05\x06"
        data[off + ln - 22 : off + ln - 18] = b"XXXX"
    else:
        # the pickle sits right after the first local header; replace its opcodes by garbage
        name_len = int.from_bytes(item[26:28], "little")
        extra_len = int.from_bytes(item[28:30], "little")
        start = off + 30 + name_len + extra_len
        assert data[start] == 0x80  # PROTO
        data[start : start + 16] = b"\xff" * 16
    (ckpt / "__1_0.distcp").write_bytes(bytes(data))
    with pytest.raises(fastckpt.FormatError) as ei:
        fastckpt.convert(ckpt, tmp_path / "out")
    assert "__1_0.distcp" in str(ei.value)
    assert not (tmp_path / "out").exists()


def test_chunk_missing_from_metadata(cases: dict[str, Case], tmp_path: Path) -> None:
    """Real Metadata with one chunk of a sharded tensor dropped: coverage check fails."""
    from torch.distributed.checkpoint import FileSystemReader

    ckpt = _copy(cases["llama_odd_fp32_ws3"].dcp(), tmp_path / "ckpt")
    md = FileSystemReader(str(ckpt)).read_metadata()
    fqn = "model.model.embed_tokens.weight"
    chunks = md.state_dict_metadata[fqn].chunks
    assert len(chunks) == 3
    del chunks[1]
    (ckpt / ".metadata").write_bytes(pickle.dumps(md, protocol=4))
    with pytest.raises((fastckpt.ShapeError, fastckpt.FormatError)) as ei:
        fastckpt.convert(ckpt, tmp_path / "out")
    assert "embed_tokens" in str(ei.value)
    assert not (tmp_path / "out").exists()


def test_item_of_wrong_dtype(cases: dict[str, Case], tmp_path: Path) -> None:
    """A real torch.save'd chunk of the right shape but another dtype is refused."""
    import io

    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    ckpt = _copy(cases["dtensor_ws3"].dcp(), tmp_path / "ckpt")
    md = FileSystemReader(str(ckpt)).read_metadata()
    key = next(k for k in md.storage_data if k.fqn == "model.ids_i64")
    info = md.storage_data[key]
    buf = io.BytesIO()
    torch.save(torch.zeros(3, 4, dtype=torch.float64), buf)
    f = ckpt / info.relative_path
    offset = f.stat().st_size
    with f.open("ab") as fh:
        fh.write(buf.getvalue())
    md.storage_data[key] = _StorageInfo(info.relative_path, offset, len(buf.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(md, protocol=4))
    with pytest.raises((fastckpt.FormatError, fastckpt.ShapeError)) as ei:
        fastckpt.convert(ckpt, tmp_path / "out")
    assert "ids_i64" in str(ei.value)


# ---------------------------------------------------------------------------------------------
# bad arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"dtype": "int8"}, {"dtype": "float7"}, {"max_shard_size": "5XB"}, {"max_shard_size": -1}],
)
def test_bad_arguments(cases: dict[str, Case], tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises((ValueError, fastckpt.FastckptError)):
        fastckpt.convert(cases["dtensor_ws3"].dcp(), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_bad_regex(cases: dict[str, Case], tmp_path: Path) -> None:
    with pytest.raises((ValueError, re.error, fastckpt.FastckptError)):
        fastckpt.convert(cases["dtensor_ws3"].dcp(), tmp_path / "out", include=["(unclosed"])
    assert not (tmp_path / "out").exists()


def test_config_from_missing(cases: dict[str, Case], tmp_path: Path) -> None:
    with pytest.raises((FileNotFoundError, fastckpt.FastckptError)):
        fastckpt.convert(
            cases["dtensor_ws3"].dcp(), tmp_path / "out", config_from=tmp_path / "no-such-dir"
        )
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# destination
# ---------------------------------------------------------------------------------------------


def test_existing_destination_refused(cases: dict[str, Case], tmp_path: Path) -> None:
    c = cases["llama_odd_fp32_ws3"]
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    with pytest.raises((FileExistsError, fastckpt.FastckptError)):
        fastckpt.convert(c.dcp(), dst)
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_existing_file_destination_refused(cases: dict[str, Case], tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.write_text("a file")
    with pytest.raises((FileExistsError, fastckpt.FastckptError)):
        fastckpt.convert(cases["dtensor_ws3"].dcp(), dst)
    assert dst.read_text() == "a file"


def test_overwrite_replaces_stale_shards(cases: dict[str, Case], tmp_path: Path) -> None:
    c = cases["llama_odd_fp32_ws3"]
    dst = tmp_path / "out"
    fastckpt.convert(c.dcp(), dst, max_shard_size="20KB")
    assert len(list(dst.glob("model-*.safetensors"))) > 3
    fastckpt.convert(c.dcp(), dst, overwrite=True)
    names = sorted(p.name for p in dst.glob("*.safetensors*"))
    assert names == ["model.safetensors"], names
    got = load_output(dst)
    for k, t in c.expected().items():
        assert_bit_equal(got[k], t, k)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_read_only_parent(cases: dict[str, Case], tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        with pytest.raises((PermissionError, fastckpt.FastckptError)):
            fastckpt.convert(cases["dtensor_ws3"].dcp(), parent / "out")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(stat.S_IRWXU)


FULL_DISK = textwrap.dedent(
    """
    import json, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    import fastckpt
    src, dst, limit, shard = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        fastckpt.convert(src, dst, max_shard_size=shard)
    except BaseException as e:
        print(json.dumps({"ok": False, "type": type(e).__name__, "msg": str(e),
                          "errno": getattr(e, "errno", None),
                          "fastckpt": isinstance(e, fastckpt.FastckptError)}))
    else:
        print(json.dumps({"ok": True}))
    """
)


@pytest.mark.parametrize(("limit", "shard"), [(100_000, "5GB"), (20_000, "1KB")])
def test_write_failure_leaves_nothing(
    cases: dict[str, Case], tmp_path: Path, limit: int, shard: str
) -> None:
    """Writes fail with EFBIG part-way (RLIMIT_FSIZE): no DST, no temporary sibling left."""
    c = cases["llama_odd_fp32_ws3"]
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "neighbour.txt").write_text("x")
    before = tree_digest(parent)
    src_before = tree_digest(c.dcp())
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(c.dcp()), str(parent / "out"), str(limit), shard],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["ok"] is False, "the conversion should have hit the file size limit"
    assert res["type"] == "OSError" or res["fastckpt"] or res["errno"] == 27, res
    assert tree_digest(parent) == before, sorted(p.name for p in parent.iterdir())
    assert tree_digest(c.dcp()) == src_before
