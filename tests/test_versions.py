"""Committed DCP checkpoints written by older (and the newest) torch: format compatibility.

``tests/data/versions/torch-X.Y.Z/`` was written by ``tests/data/versions/make_version_fixture.py``
under that torch (see ``tests/data/versions/README.md``). Each case is converted by fastckpt and
compared bit for bit with the tensors the generator saved beside it, and with the installed
torch's own full DCP load of the same files. The format facts each version is committed for are
checked too, so a regenerated fixture that lost them fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fastckpt
import pytest
from conftest import assert_bit_equal, flatten_tensors, load_output

VERSIONS_DIR = Path(__file__).parent / "data" / "versions"
VERSIONS = sorted(p.name.removeprefix("torch-") for p in VERSIONS_DIR.glob("torch-*"))
CASES = ["single", "dtensor_ws2"]
PAIRS = [(v, c) for v in VERSIONS for c in CASES]


def _vtuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("+")[0].split(".")[:3])


def _root(version: str) -> Path:
    return VERSIONS_DIR / f"torch-{version}"


def _expected(version: str, case: str) -> dict[str, Any]:
    """The full tensors the generator saved (safetensors, or its json + bin fallback)."""
    import torch

    root = _root(version)
    st = root / f"{case}.expected.safetensors"
    if st.exists():
        from safetensors.torch import load_file

        return dict(load_file(str(st)))
    table = json.loads((root / f"{case}.expected.json").read_text())
    blob = (root / f"{case}.expected.bin").read_bytes()
    out = {}
    for name, e in table.items():
        dtype = getattr(torch, e["dtype"])
        n = 1
        for s in e["shape"]:
            n *= s
        size = n * torch.empty((), dtype=dtype).element_size()
        raw = bytearray(blob[e["offset"] : e["offset"] + size])
        t = torch.frombuffer(raw, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        out[name] = t.view(dtype).reshape(e["shape"])
    return out


def test_fixture_versions_committed() -> None:
    """The versions the issue asks for: the oldest (2.2), one without StorageMeta.modules
    (2.4-2.6) and 2.15 (TensorProperties.strides)."""
    assert "2.2.2" in VERSIONS
    assert any((2, 4) <= _vtuple(v)[:2] <= (2, 6) for v in VERSIONS)
    assert "2.15.0" in VERSIONS
    for v in VERSIONS:
        manifest = json.loads((_root(v) / "manifest.json").read_text())
        assert manifest["torch"].split("+")[0] == v
        assert manifest["cases"] == CASES
        total = sum(f.stat().st_size for f in _root(v).rglob("*") if f.is_file())
        assert total < 100_000, f"torch-{v} fixtures are {total} bytes"


@pytest.mark.parametrize(("version", "case"), PAIRS, ids=[f"{v}-{c}" for v, c in PAIRS])
def test_converts_bit_exact(version: str, case: str, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    report = fastckpt.convert(_root(version) / case, dst)
    got = load_output(dst)
    want = _expected(version, case)
    for name, t in want.items():
        if name in got:
            assert_bit_equal(got[name], t, name)
    assert sorted(got) == sorted(want)
    assert report.n_tensors == len(want)


@pytest.mark.parametrize(("version", "case"), PAIRS, ids=[f"{v}-{c}" for v, c in PAIRS])
def test_equals_installed_torch_load(version: str, case: str, tmp_path: Path) -> None:
    """The installed torch's own full load (``dcp_to_torch_save``) of the old files."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if _vtuple(torch.__version__) < (2, 15) and _vtuple(version) >= (2, 15):
        pytest.skip(f"torch {torch.__version__} cannot read 2.15 files (6-tuple properties)")
    pt = tmp_path / "full.pt"
    dcp_to_torch_save(_root(version) / case, pt)
    full = torch.load(pt, weights_only=False)  # written just now by torch itself
    want = flatten_tensors(full["model"])
    dst = tmp_path / "out"
    fastckpt.convert(_root(version) / case, dst)
    got = load_output(dst)
    for name, t in want.items():
        if name in got:
            assert_bit_equal(got[name], t, name)
    assert sorted(got) == sorted(want)


def _globals(path: Path) -> set[tuple[str, str]]:
    """``(module, name)`` of every global a metadata pickle resolves (fastckpt's allow-list)."""
    import io

    from fastckpt.unpickle import METADATA_GLOBALS, RestrictedUnpickler

    seen: set[tuple[str, str]] = set()

    class Recording(RestrictedUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            seen.add((module, name))
            return super().find_class(module, name)

    Recording(io.BytesIO(path.read_bytes()), allowed=METADATA_GLOBALS, source=str(path)).load()
    return seen


def _props(md: Any) -> Any:
    return next(v for v in md.state_dict_metadata.values() if hasattr(v, "properties")).properties


@pytest.mark.parametrize("version", VERSIONS)
def test_format_facts_pinned(version: str) -> None:
    """What each committed version stands for (``shared/formats/dcp.md`` §8)."""
    from fastckpt.formats.dcp import load_metadata

    v = _vtuple(version)
    single = _root(version) / "single"
    md = load_metadata(single)
    globs = _globals(single / ".metadata")
    old_props = ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties")
    new_props = ("torch.distributed.checkpoint.metadata", "TensorProperties")
    if v < (2, 3):  # properties from the ShardedTensor module; no StorageMeta; containers whole
        assert old_props in globs and new_props not in globs
        assert md.storage_meta is None
        assert "extra" in md.state_dict_metadata
    else:
        assert new_props in globs and old_props not in globs
    if (2, 4) <= v:  # StorageMeta (with a pathlib checkpoint_id); containers flattened to leaves
        assert ("pathlib", "PosixPath") in globs
        assert set(md.storage_meta.__dict__) >= {"checkpoint_id", "save_id", "load_id"}
        assert {"extra.note", "extra.lrs"} <= set(md.state_dict_metadata)
    if (2, 4) <= v < (2, 7):
        assert "modules" not in md.storage_meta.__dict__
    assert md.version == ("1.0.0" if v >= (2, 9) else None)
    assert (_props(md).strides is not None) == (v >= (2, 15))
    data = (single / "__0_0.distcp").read_bytes()
    item = next(i for k, i in md.storage_data.items() if k.fqn == "model.embed_tokens.weight")
    archive = data[int(item.offset) : int(item.offset) + int(item.length)]
    assert archive.startswith(b"PK\x03\x04")
    assert (b"archive/.format_version" in archive) == (v >= (2, 7))


@pytest.mark.parametrize("version", VERSIONS)
def test_old_files_read_without_torch(version: str, tmp_path: Path) -> None:
    """fastckpt reads every version with torch unimportable."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import fastckpt\n"
        f"src, dst = {str(_root(version))!r}, {str(tmp_path)!r}\n"
        f"for case in {CASES!r}:\n"
        "    fastckpt.convert(src + '/' + case, dst + '/' + case)\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
    )
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for case in CASES:
        assert (tmp_path / case / "model.safetensors").is_file()
