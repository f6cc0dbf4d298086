"""Fuzz targets of fastckpt's parsers: any bytes give a result or a ``FastckptError``.

Each target takes one input (bytes) and feeds it to one reader the way a checkpoint would. Any
exception other than :class:`fastckpt.FastckptError` escapes, and atheris reports it as a crash
(as it does signals, hangs past ``-timeout`` and memory past ``-rss_limit_mb``).

Run one with ``python fuzz/run.py NAME [libFuzzer options] [corpus dirs]``; ``fuzz/seeds/NAME``
holds real seeds written by torch (``fuzz/make_seeds.py``).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from fastckpt import FastckptError

# the targets write their input to a file on every run: FASTCKPT_FUZZ_DIR, else a tmpfs when
# there is one (libFuzzer exits without running atexit hooks, so the folder may stay behind)
_WORK = Path(
    tempfile.mkdtemp(
        prefix="fastckpt-fuzz-",
        dir=os.environ.get("FASTCKPT_FUZZ_DIR")
        or ("/dev/shm" if os.path.isdir("/dev/shm") else None),
    )
)
_FIXED: set[str] = set()
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)


def _write(rel: str, data: bytes, *, fixed: bool = False) -> Path:
    path = _WORK / rel
    if fixed and rel in _FIXED:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if fixed:
        _FIXED.add(rel)
    return path


def _catalogue(path: Path) -> None:
    from fastckpt.formats.registry import open_catalogue

    cat = open_catalogue(path)
    cat.locate(list(cat.tensors)[:8])


def pickle_reader(data: bytes) -> None:
    """The three restricted unpicklers (DCP metadata, tensor data.pkl, state-dict stubs)."""
    from fastckpt.transforms.optimizer import _plain
    from fastckpt.unpickle import (
        METADATA_GLOBALS,
        TENSOR_GLOBALS,
        load_state_dict_pickle,
        restricted_loads,
    )

    for allowed, storages in ((METADATA_GLOBALS, False), (TENSOR_GLOBALS, True)):
        try:
            restricted_loads(data, allowed=allowed, source="fuzz", storages=storages)
        except FastckptError:
            pass
    try:
        value, _ = load_state_dict_pickle(data, source="fuzz")
        _plain(value, [], "fuzz")  # what reaches optimizer.json
        repr(value)
    except FastckptError:
        pass


def zip_reader(data: bytes) -> None:
    """A torch.save archive (zip window, local headers, data.pkl), as a whole ``.pt`` file."""
    from fastckpt.unpickle import TorchZip, open_fd

    path = _write("item.pt", data)
    fd = open_fd(str(path))
    try:
        archive = TorchZip(str(path), fd, 0, len(data))
        value = archive.load_pickle()
        for entry in archive.entries.values():
            if entry.size < 1 << 20:
                archive.read(entry)
        del value
    finally:
        os.close(fd)
    _catalogue(path)


def dcp_metadata(data: bytes) -> None:
    """A DCP folder whose ``.metadata`` is the input (data files are absent or tiny)."""
    folder = _WORK / "dcp"
    _write("dcp/.metadata", data)
    _write("dcp/__0_0.distcp", b"PK\x03\x04" + b"\0" * 60, fixed=True)
    _catalogue(folder)


def megatron(data: bytes) -> None:
    """A Megatron torch_dist folder: the input is ``common.pt`` (first byte even) or
    ``metadata.json`` (odd), beside an empty DCP ``.metadata``."""
    folder = _WORK / "megatron"
    md = (  # an empty DCP Metadata, as protocol-2 opcodes
        b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\n)\x81}("
        b"U\x13state_dict_metadata}U\x0cstorage_data}ub."
    )
    _write("megatron/.metadata", md, fixed=True)
    if data[:1] and data[0] % 2:
        _write("megatron/metadata.json", data[1:])
        (folder / "common.pt").unlink(missing_ok=True)
    else:
        _write("megatron/metadata.json", json.dumps({"sharded_backend": "torch_dist"}).encode())
        _write("megatron/common.pt", data[1:])
    _catalogue(folder)


def safetensors_header(data: bytes) -> None:
    """A safetensors file (header length, JSON header, data) and a shard index naming it."""
    path = _write("st/model.safetensors", data)
    _catalogue(path)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "pickle": pickle_reader,
    "zip": zip_reader,
    "dcp_metadata": dcp_metadata,
    "megatron": megatron,
    "safetensors": safetensors_header,
}


def run_one(name: str, data: bytes) -> None:
    """Run target ``name`` on ``data``; a FastckptError is an expected outcome."""
    try:
        TARGETS[name](data)
    except FastckptError:
        pass
