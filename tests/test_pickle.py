"""Pickles in DCP checkpoints: real torch metadata in every protocol, and malicious payloads.

Malicious files are made with the real pickle machinery (``__reduce__`` returning ``os.system`` or
``builtins.open``), and, for ``.distcp`` items, with ``torch.save`` itself. fastckpt must refuse
them with ``FormatError`` (or skip them when they are training state it never reads) and must
never execute anything: the sentinel file is never created.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import fastckpt
import pytest
from conftest import Case, assert_bit_equal, load_output


class SystemCall:
    """Unpickling this runs ``touch <path>``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


class OpenCall:
    """Unpickling this creates ``<path>`` with ``builtins.open``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (str(self.path), "w"))


class ExecCall:
    """Unpickling this runs ``exec`` of code that creates ``<path>``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.exec, (f"open({str(self.path)!r}, 'w').close()",))


EVIL = [SystemCall, OpenCall, ExecCall]


def _load_metadata(dcp_dir: Path) -> Any:
    """The real ``Metadata`` object, read by torch's own reader."""
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(dcp_dir)).read_metadata()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_refused(
    ckpt: Path, tmp_path: Path, sentinel: Path, *, metadata_only_ok: bool = False
) -> None:
    dst = tmp_path / "out"
    with pytest.raises(fastckpt.FormatError):
        fastckpt.convert(ckpt, dst)
    assert not dst.exists()
    if metadata_only_ok:  # inspect reads the metadata alone, never an item
        try:
            fastckpt.inspect(ckpt)
        except fastckpt.FormatError:
            pass
    else:
        with pytest.raises(fastckpt.FormatError):
            fastckpt.inspect(ckpt)
    with pytest.raises(fastckpt.FormatError):
        with fastckpt.open(ckpt) as c:
            for k in c.keys():
                c.tensor(k)
    assert not sentinel.exists(), "a pickle payload was executed"


# ---------------------------------------------------------------------------------------------
# .metadata
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_metadata_any_protocol(
    cases: dict[str, Case], converted: Any, tmp_path: Path, protocol: int
) -> None:
    """The same torch Metadata re-pickled with each protocol converts to the same bytes."""
    c = cases["dtensor_ws4"]
    ckpt = _copy(c.dcp(), tmp_path / "ckpt")
    md = _load_metadata(ckpt)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md, protocol=protocol))
    dst = tmp_path / "out"
    fastckpt.convert(ckpt, dst)
    ours = load_output(dst)
    base = load_output(converted(c.name, "dcp"))
    assert sorted(ours) == sorted(base)
    for k, t in base.items():
        assert_bit_equal(ours[k], t, k)


@pytest.mark.parametrize("evil", EVIL, ids=[e.__name__ for e in EVIL])
def test_malicious_metadata_top_level(cases: dict[str, Case], tmp_path: Path, evil: type) -> None:
    sentinel = tmp_path / "SENTINEL"
    ckpt = _copy(cases["dtensor_ws3"].dcp(), tmp_path / "ckpt")
    (ckpt / ".metadata").write_bytes(pickle.dumps(evil(sentinel), protocol=4))
    _assert_refused(ckpt, tmp_path, sentinel)


@pytest.mark.parametrize("evil", EVIL, ids=[e.__name__ for e in EVIL])
@pytest.mark.parametrize("where", ["storage_meta", "planner_data", "storage_data"])
def test_malicious_object_inside_real_metadata(
    cases: dict[str, Case], tmp_path: Path, evil: type, where: str
) -> None:
    """A real torch Metadata with one field replaced by a payload: never executed."""
    sentinel = tmp_path / "SENTINEL"
    ckpt = _copy(cases["dtensor_ws3"].dcp(), tmp_path / "ckpt")
    md = _load_metadata(ckpt)
    if where == "storage_meta":
        md.storage_meta = evil(sentinel)
    elif where == "planner_data":
        md.planner_data["model.scalar"] = evil(sentinel)
    else:
        key = next(k for k in md.storage_data if k.fqn == "model.scalar")
        md.storage_data[key] = evil(sentinel)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md, protocol=4))
    dst = tmp_path / "out"
    try:
        fastckpt.convert(ckpt, dst)
    except fastckpt.FormatError:
        assert not dst.exists()
    else:
        # stubbed out inertly: acceptable only if the result is still exactly right; the
        # storage location of a tensor cannot be guessed
        assert where != "storage_data", "a poisoned storage record was silently accepted"
        ref = cases["dtensor_ws3"].expected()
        got = load_output(dst)
        assert sorted(got) == sorted(ref)
        for k, t in ref.items():
            assert_bit_equal(got[k], t, k)
    assert not sentinel.exists(), "a pickle payload was executed"


def test_metadata_with_persistent_id(cases: dict[str, Case], tmp_path: Path) -> None:
    ckpt = _copy(cases["dtensor_ws3"].dcp(), tmp_path / "ckpt")
    md = _load_metadata(ckpt)

    class P(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            if isinstance(obj, str) and obj == "model.scalar":
                return ("storage", "x")
            return None

    buf = io.BytesIO()
    P(buf, protocol=4).dump(md)
    (ckpt / ".metadata").write_bytes(buf.getvalue())
    _assert_refused(ckpt, tmp_path, tmp_path / "never")


def test_metadata_not_a_pickle(cases: dict[str, Case], tmp_path: Path) -> None:
    ckpt = _copy(cases["dtensor_ws3"].dcp(), tmp_path / "ckpt")
    (ckpt / ".metadata").write_bytes(b"this is not a pickle at all\n" * 10)
    _assert_refused(ckpt, tmp_path, tmp_path / "never")


def test_metadata_wrong_object(cases: dict[str, Case], tmp_path: Path) -> None:
    ckpt = _copy(cases["dtensor_ws3"].dcp(), tmp_path / "ckpt")
    (ckpt / ".metadata").write_bytes(pickle.dumps({"model.w": [1, 2, 3]}, protocol=4))
    _assert_refused(ckpt, tmp_path, tmp_path / "never")


# ---------------------------------------------------------------------------------------------
# data.pkl inside a .distcp item
# ---------------------------------------------------------------------------------------------


def _replace_item(ckpt: Path, fqn: str, payload: bytes) -> str:
    """Append ``payload`` to the file holding ``fqn``'s first chunk and point the metadata at it.

    The metadata is edited as the real torch objects and re-pickled. Returns the file name.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    md = _load_metadata(ckpt)
    key = next(k for k in md.storage_data if k.fqn == fqn)
    info = md.storage_data[key]
    f = ckpt / info.relative_path
    offset = f.stat().st_size
    with f.open("ab") as fh:
        fh.write(payload)
    md.storage_data[key] = _StorageInfo(info.relative_path, offset, len(payload))
    (ckpt / ".metadata").write_bytes(pickle.dumps(md, protocol=4))
    return str(info.relative_path)


def _torch_save_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("evil", EVIL, ids=[e.__name__ for e in EVIL])
@pytest.mark.parametrize(
    ("case", "fqn"),
    [("dtensor_ws3", "model.scalar"), ("llama_odd_fp32_ws3", "model.model.norm.weight")],
)
def test_malicious_data_pkl(
    cases: dict[str, Case], tmp_path: Path, evil: type, case: str, fqn: str
) -> None:
    sentinel = tmp_path / "SENTINEL"
    ckpt = _copy(cases[case].dcp(), tmp_path / "ckpt")
    _replace_item(ckpt, fqn, _torch_save_bytes(evil(sentinel)))
    _assert_refused(ckpt, tmp_path, sentinel, metadata_only_ok=True)


def test_payload_beside_real_tensor(cases: dict[str, Case], tmp_path: Path) -> None:
    """A payload hidden next to a real tensor inside the saved object."""
    import torch

    sentinel = tmp_path / "SENTINEL"
    ckpt = _copy(cases["dtensor_ws3"].dcp(), tmp_path / "ckpt")
    payload = _torch_save_bytes([torch.tensor(3.25), SystemCall(sentinel)])
    _replace_item(ckpt, "model.scalar", payload)
    _assert_refused(ckpt, tmp_path, sentinel, metadata_only_ok=True)


# ---------------------------------------------------------------------------------------------
# BYTE_IO training state: arbitrary pickles that a weights converter never reads
# ---------------------------------------------------------------------------------------------


def test_byte_io_payload_never_unpickled(tmp_path: Path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    sentinel = tmp_path / "SENTINEL"
    g = torch.Generator().manual_seed(7)
    model = {"w": torch.randn(5, 3, generator=g), "b": torch.arange(4, dtype=torch.int64)}
    state = {
        "model": model,
        "extra": {"a": SystemCall(sentinel), "b": OpenCall(sentinel), "c": ExecCall(sentinel)},
    }
    ckpt = tmp_path / "ckpt"
    dcp.save(state, checkpoint_id=ckpt, no_dist=True)
    assert not sentinel.exists()
    dst = tmp_path / "out"
    rep = fastckpt.convert(ckpt, dst)
    assert rep.n_tensors == 2
    got = load_output(dst)
    for k, t in model.items():
        assert_bit_equal(got[k], t, k)
    fastckpt.inspect(ckpt)
    assert fastckpt.verify(ckpt, dst).ok
    with fastckpt.open(ckpt) as c:
        assert sorted(c.keys()) == ["b", "w"]
    assert not sentinel.exists(), "a BYTE_IO payload was unpickled"
