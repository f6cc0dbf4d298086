"""Malicious and broken inputs (issue 9): one test per finding, crafted here.

Every checkpoint is written by real torch and then modified (metadata rewritten, symlinks, FIFOs)
or built from pickle opcodes. A canary file detects code execution and a marker string detects
bytes from outside the checkpoint in the output.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastckpt
import pytest
from fastckpt import FastckptError, FormatError
from fastckpt.cli import app
from safetensors.numpy import load_file
from typer.testing import CliRunner

MARKER = b"FASTCKPT-OUT-OF-TREE-MARKER-7f3a"
CLI = [sys.executable, "-c", "from fastckpt.cli import main; main()"]


@pytest.fixture(autouse=True)
def canary(tmp_path: Path) -> Iterator[Path]:
    """A file that a pickle executing code would create (the payloads below name it)."""
    path = tmp_path / "CANARY"
    yield path
    assert not path.exists(), "a pickle executed code"


def _dcp(root: Path, state: dict[str, Any] | None = None) -> Path:
    import torch
    import torch.distributed.checkpoint as dcp

    out = root / "ckpt"
    if state is None:
        state = {"model": {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(out))
    return out


def _edit_metadata(ckpt: Path, edit: Any) -> None:
    import torch  # noqa: F401  (the metadata classes)

    md = pickle.loads((ckpt / ".metadata").read_bytes())
    edit(md)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))


def _tree_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir(exist_ok=True)
    secret.write_bytes(b'{"token": "' + MARKER + b'"}')
    return secret


def _torch_zip(path: Path, pickle_bytes: bytes) -> Path:
    """A torch.save-shaped archive holding only ``data.pkl``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/byteorder", "little")
    return path


def _run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# 1. side files: links out of the tree, special files


def test_side_file_links_out_of_the_tree_are_not_copied(tmp_path: Path) -> None:
    ckpt = _dcp(tmp_path)
    secret = _secret(tmp_path)
    (ckpt / "tokenizer.model").symlink_to(secret)
    (ckpt / "tokenizer.json").symlink_to("/proc/self/environ")
    (ckpt / "config.json").symlink_to(secret)
    (ckpt / "vocab.json").symlink_to("../elsewhere/secret.txt")  # relative, still out
    (ckpt / "modeling_x.py").symlink_to(secret)
    (ckpt / "merges.txt").symlink_to("/dev/zero")
    os.mkfifo(ckpt / "special_tokens_map.json")
    templates = ckpt / "additional_chat_templates"
    templates.mkdir()
    (templates / "tool.jinja").symlink_to(secret)
    (templates / "ok.jinja").write_text("{{ messages }}")
    (ckpt / "generation_config.json").write_text('{"ok": true}')  # a plain file: copied
    os.environ["FASTCKPT_TEST_SECRET"] = MARKER.decode()
    try:
        report = fastckpt.convert(ckpt, tmp_path / "out")
    finally:
        del os.environ["FASTCKPT_TEST_SECRET"]
    out = tmp_path / "out"
    assert MARKER not in _tree_bytes(out)
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert written == {
        "model.safetensors",
        "generation_config.json",
        "additional_chat_templates/ok.jinja",
    }
    shown = "\n".join(report.warnings)
    for name in ("tokenizer.model", "tokenizer.json", "config.json", "tool.jinja", "merges.txt"):
        assert name in shown, shown


def _hf_cache(root: Path) -> Path:
    repo = root / "hub" / "models--org--tiny"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    (snap / "additional_chat_templates").mkdir(parents=True)
    files = {
        "config.json": b'{"model_type": "llama", "torch_dtype": "float32"}',
        "tokenizer.json": b'{"version": "1.0"}',
        "additional_chat_templates/tool.jinja": b"{{ tools }}",
    }
    for i, (name, data) in enumerate(files.items()):
        (blobs / f"blob{i}").write_bytes(data)
        depth = "../" * (name.count("/") + 2)
        (snap / name).symlink_to(f"{depth}blobs/blob{i}")
    return snap


def test_config_from_hf_cache_snapshot_still_works(tmp_path: Path) -> None:
    ckpt = _dcp(tmp_path)
    snap = _hf_cache(tmp_path)
    fastckpt.convert(ckpt, tmp_path / "out", config_from=snap)
    out = tmp_path / "out"
    assert (out / "config.json").read_bytes() == (snap / "config.json").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == b'{"version": "1.0"}'
    assert (out / "additional_chat_templates" / "tool.jinja").read_bytes() == b"{{ tools }}"
    assert not (out / "config.json").is_symlink()


def test_config_from_snapshot_link_out_of_blobs_refused(tmp_path: Path) -> None:
    ckpt = _dcp(tmp_path)
    snap = _hf_cache(tmp_path)
    secret = _secret(tmp_path)
    (snap / "tokenizer.json").unlink()
    (snap / "tokenizer.json").symlink_to(os.path.relpath(secret, snap))
    report = fastckpt.convert(ckpt, tmp_path / "out", config_from=snap)
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert MARKER not in _tree_bytes(tmp_path / "out")
    assert any("tokenizer.json" in w for w in report.warnings)


# ---------------------------------------------------------------------------------------------
# 2, 7. data files named by metadata: plain names inside the folder, never blocking


@pytest.mark.parametrize("where", ["parent", "absolute", "subdir"])
def test_dcp_relative_path_outside_refused(tmp_path: Path, where: str) -> None:
    ckpt = _dcp(tmp_path)
    victim = tmp_path / "elsewhere" / "victim.distcp"
    victim.parent.mkdir()
    (ckpt / "__0_0.distcp").rename(victim)
    name = {
        "parent": "../elsewhere/victim.distcp",
        "absolute": str(victim),
        "subdir": "sub/victim.distcp",
    }[where]

    def edit(md: Any) -> None:
        for info in md.storage_data.values():
            info.relative_path = name

    _edit_metadata(ckpt, edit)
    with pytest.raises(FormatError, match="refusing data file name") as err:
        fastckpt.convert(ckpt, tmp_path / "out")
    assert "model.w" in str(err.value) and str(ckpt) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_dcp_relative_path_fifo_does_not_hang(tmp_path: Path) -> None:
    ckpt = _dcp(tmp_path)
    (ckpt / "__0_0.distcp").unlink()
    os.mkfifo(ckpt / "__0_0.distcp")
    res = _run_cli("convert", str(ckpt), str(tmp_path / "out"), timeout=60)
    _one_line_error(res, "not a regular file", "__0_0.distcp")


def test_rank_metadata_fifo_does_not_hang(tmp_path: Path) -> None:
    """A FIFO named like a rank's metadata (``__0.metadata``) is refused, never opened blocking
    (the format sniffers look inside metadata files)."""
    ckpt = _dcp(tmp_path)
    (ckpt / ".metadata").rename(ckpt / "__1.metadata")
    os.mkfifo(ckpt / "__0.metadata")
    res = _run_cli("convert", str(ckpt), str(tmp_path / "out"), timeout=60)
    assert res.returncode != 0 and not (tmp_path / "out").exists()
    assert "__0.metadata" in res.stderr, res.stderr


def _megatron_dist(tmp_path: Path, relative_path: str, offset: int) -> Path:
    """A torch_dist folder whose common state is a DCP BYTE_IO item (megatron-core >= 0.19)."""
    import torch  # noqa: F401
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        MetadataIndex,
    )

    ckpt = tmp_path / "iter_0000001"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    key = "common_state/shard_0_1"
    md = Metadata(
        state_dict_metadata={key: BytesStorageMetadata()},
        storage_data={MetadataIndex(key): _StorageInfo(relative_path, offset, 400)},
    )
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    return ckpt


def test_megatron_common_state_outside_refused(tmp_path: Path) -> None:
    import torch

    outside = tmp_path / "common.pt"
    torch.save([{"args": None}], outside)
    ckpt = _megatron_dist(tmp_path, "../common.pt", 0)
    with pytest.raises(FormatError, match="refusing data file name") as err:
        fastckpt.inspect(ckpt)
    assert "common_state" in str(err.value)


def test_megatron_common_state_negative_offset_names_file(tmp_path: Path) -> None:
    ckpt = _megatron_dist(tmp_path, "__0_0.distcp", -8)
    (ckpt / "__0_0.distcp").write_bytes(b"\0" * 1000)
    with pytest.raises(FormatError) as err:
        fastckpt.inspect(ckpt)
    assert ".metadata" in str(err.value) and "common_state" in str(err.value)


def test_hf_index_naming_outside_file_refused(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    other = tmp_path / "elsewhere"
    other.mkdir()
    save_file({"w": np.zeros(4, np.float32)}, str(other / "x.safetensors"))
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"v": np.zeros(4, np.float32)}, str(folder / "model.safetensors"))
    index = {"metadata": {}, "weight_map": {"w": "../elsewhere/x.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="refusing data file name"):
        fastckpt.inspect(folder)


# ---------------------------------------------------------------------------------------------
# 3, 4. deep nesting and memory bombs, in a fresh process (a crash must not take pytest down)

_SLICES = 2_000_000


def _frame_skip_bomb(index: int) -> bytes:
    """A memo bomb the C unpickler reaches only by framing: a FRAME inside a frame asks for more
    bytes than the outer frame holds, so C reads on from the outer frame's end (where the bomb
    is), while a linear read of the opcodes sees the bomb inside a string (found by fuzzing)."""
    tail = b"N" + b"r" + index.to_bytes(4, "little") + b"." + b"\x00" * 16
    inner = b"\x95" + (len(tail) + 2).to_bytes(8, "little")
    inner += b"X" + (4 + len(tail)).to_bytes(4, "little") + b"aaaa"
    return b"\x80\x04\x95" + len(inner).to_bytes(8, "little") + inner + tail + b"N."


_BOMBS = {
    "long_binput_1e8": b"\x80\x02N" + b"r" + (10**8).to_bytes(4, "little") + b".",
    "long_binput_2e30": b"\x80\x02N" + b"r" + (2**30).to_bytes(4, "little") + b".",
    "bytearray": b"\x80\x02cbuiltins\nbytearray\nJ" + (1_500_000_000).to_bytes(4, "little")
    + b"\x85R.",
    "set_range": b"\x80\x02cbuiltins\nset\ncbuiltins\nrange\nJ" + (30_000_000).to_bytes(4, "little")
    + b"\x85R\x85R.",
    "binbytes8": b"\x80\x04\x8e" + (1_500_000_000).to_bytes(8, "little") + b"abc.",
    "size_range": b"\x80\x02ctorch\nSize\ncbuiltins\nrange\nJ" + (10**8).to_bytes(4, "little")
    + b"\x85R\x85R.",
    "frame_skip": _frame_skip_bomb(2**30),
}  # fmt: skip


def test_nested_slices_and_tuples_do_not_crash(tmp_path: Path) -> None:
    slices = b"\x80\x02cbuiltins\nslice\nq\x00" + b"h\x00" * _SLICES + b"N" + b"\x85R" * _SLICES
    tuples = b"\x80\x02}N" + b"\x85" * 1_000_000 + b"Ns."  # hashing it recursed in C
    for name, data in (("slices", slices + b"."), ("tuples", tuples)):
        path = _torch_zip(tmp_path / f"{name}.pt", data)
        res = _run_cli("inspect", str(path))
        _one_line_error(res, str(path), "nested deeper than")


def test_frames_cannot_hide_opcodes_from_the_scan() -> None:
    """What the C unpickler would run after a frame skip is what the scan never saw: refused."""
    from fastckpt import FormatError
    from fastckpt.unpickle import METADATA_GLOBALS, restricted_loads

    with pytest.raises(FormatError, match=r"^meta: .*crossing the end of a frame"):
        restricted_loads(_frame_skip_bomb(2**30), allowed=METADATA_GLOBALS, source="meta")
    # frames as pickle writes them (protocol 4 and 5, several frames) still load
    value = {"k": list(range(20_000)), "s": "x" * 70_000}
    for protocol in (4, 5):
        data = pickle.dumps(value, protocol=protocol)
        assert data.count(b"\x95") >= 2
        assert restricted_loads(data, allowed=METADATA_GLOBALS, source="ok") == value


def test_memory_bombs_stay_small(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import resource
        from fastckpt import FormatError
        from fastckpt.unpickle import load_state_dict_pickle
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for name, data in {_BOMBS!r}.items():
            try:
                load_state_dict_pickle(data, source=name)
            except FormatError as exc:
                assert name in str(exc), exc
            else:
                raise SystemExit(f"{{name}} was accepted")
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(grown // 1024)
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip()) < 100, f"peak memory grew by {res.stdout.strip()} MB"


# ---------------------------------------------------------------------------------------------
# 5. no shared mutable stand-ins


@pytest.mark.parametrize(
    "payload",
    [
        # BUILD {'dtype': 'float16'} onto torch.FloatStorage
        b"\x80\x02ctorch\nFloatStorage\n}U\x05dtypeU\x07float16sb.",
        # the same as slot state (setattr)
        b"\x80\x02ctorch\nFloatStorage\nN}U\x05dtypeU\x07float16s\x86b.",
        # through a pass-through function, so that BUILD's target is not the global itself
        b"\x80\x02ctorch.serialization\n_get_layout\nctorch\nFloatStorage\n\x85R"
        b"N}U\x05dtypeU\x07float16s\x86b.",
        # defaults of a shared function
        b"\x80\x02ctorch\nSize\nN}U\x0c__defaults__K\x01K\x02\x86\x85s\x86b.",
    ],
)
def test_pickle_cannot_poison_later_conversions(tmp_path: Path, payload: bytes) -> None:
    import torch

    bad = _torch_zip(tmp_path / "bad.pt", payload)
    with pytest.raises(FormatError):
        fastckpt.inspect(bad)
    good = tmp_path / "good" / "model.pt"
    good.parent.mkdir()
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    torch.save({"w": w}, good)
    fastckpt.convert(good, tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))["w"]
    assert got.dtype.name == "float32" and got.tolist() == w.tolist()


def test_refused_globals_execute_nothing(tmp_path: Path, canary: Path) -> None:
    for module in ("posix", "os", "subprocess"):
        data = f"\x80\x02c{module}\nsystem\nX\x00\x00\x00\x00\x85R.".encode("latin-1")
        cmd = f"touch {canary}".encode()
        data = data.replace(b"X\x00\x00\x00\x00", b"X" + struct.pack("<I", len(cmd)) + cmd)
        path = _torch_zip(tmp_path / f"{module}.pt", data)
        with pytest.raises(FormatError, match="nothing was executed"):
            fastckpt.inspect(path)


# ---------------------------------------------------------------------------------------------
# 6. one FastckptError line naming the file, whatever the bytes


def _dims(size: Any) -> Any:
    def edit(md: Any) -> None:
        import torch

        item = md.state_dict_metadata["model.w"]
        item.size = torch.Size(size)
        for chunk in item.chunks:  # an empty chunk: nothing located, straight to the planner
            chunk.sizes = torch.Size([0, *size[1:]])

    return edit


def _drop(attr: str) -> Any:
    def edit(md: Any) -> None:
        if attr == "offset":
            for info in md.storage_data.values():
                del info.offset
        elif attr == "chunk sizes":
            del md.state_dict_metadata["model.w"].chunks[0].sizes
        else:
            delattr(md.state_dict_metadata["model.w"], attr)

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(_dims([-1, 4]), id="negative-dim"),
        pytest.param(_dims([2**40, 2**40]), id="huge-dims"),
        pytest.param(_drop("size"), id="no-size"),
        pytest.param(_drop("properties"), id="no-properties"),
        pytest.param(_drop("offset"), id="no-offset"),
        pytest.param(_drop("chunk sizes"), id="no-chunk-sizes"),
    ],
)
def test_bad_dcp_records_give_one_line(tmp_path: Path, edit: Any) -> None:
    ckpt = _dcp(tmp_path)
    _edit_metadata(ckpt, edit)
    with pytest.raises(FastckptError) as err:
        fastckpt.convert(ckpt, tmp_path / "out")
    assert str(ckpt) in str(err.value)
    res = CliRunner().invoke(app, ["convert", str(ckpt), str(tmp_path / "cli")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output


def test_chunk_hole_names_the_checkpoint(tmp_path: Path) -> None:
    def edit(md: Any) -> None:
        import torch

        md.state_dict_metadata["model.w"].size = torch.Size([6, 4])

    ckpt = _dcp(tmp_path)
    _edit_metadata(ckpt, edit)
    with pytest.raises(FastckptError) as err:
        fastckpt.convert(ckpt, tmp_path / "out")
    assert str(ckpt) in str(err.value)


def test_lone_surrogate_tensor_name(tmp_path: Path) -> None:
    header = {"w\udc80": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(FormatError, match="not valid UTF-8") as err:
        fastckpt.convert(path, tmp_path / "out")
    assert str(path) in str(err.value)


def test_zip_version_needed_255(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(2)}, path)
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        data[at + 6] = 255  # version needed to extract
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError) as err:
        fastckpt.convert(path, tmp_path / "out")
    assert str(path) in str(err.value)


def test_refused_getattr_names_the_file(tmp_path: Path) -> None:
    data = b"\x80\x02cbuiltins\ngetattr\nctorch._utils\n_rebuild_tensor_v2\nU\x0b__globals__\x86R."
    path = _torch_zip(tmp_path / "g.pt", data)
    with pytest.raises(FormatError, match="getattr") as err:
        fastckpt.inspect(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------------------------
# 12. only plain values reach optimizer.json


def test_optimizer_json_has_no_stub_strings(tmp_path: Path) -> None:
    import numpy as np
    import torch

    state = {
        "model": {"w": torch.ones(2, 2)},
        "optim": {
            "state": {"w": {"exp_avg": torch.zeros(2, 2), "step": torch.tensor(3.0)}},
            "param_groups": [{"lr": np.float64(0.1), "eps": 1e-8, "params": ["w"]}],
        },
    }
    ckpt = _dcp(tmp_path, state)
    report = fastckpt.convert(ckpt, tmp_path / "out", with_optimizer=True)
    doc = (tmp_path / "out" / "optimizer.json").read_text()
    assert "<stub" not in doc and "numpy" not in doc
    group = json.loads(doc)["param_groups"][0]
    assert group["eps"] == 1e-8 and "lr" not in group
    assert any("lr" in w and "dropped" in w for w in report.warnings), report.warnings
