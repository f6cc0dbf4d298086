"""Write tiny DCP checkpoints with whatever torch is installed, for the cross-version tests.

Usage (run once per torch version, on CPU; the output is committed, see README.md here)::

    python tests/data/versions/make_version_fixture.py tests/data/versions/torch-X.Y.Z

Runs under torch 2.2 through 2.15 (DTensor comes from ``torch.distributed.tensor`` or the older
``torch.distributed._tensor``). Writes into ``OUT``:

- ``single/``: one process, no process group: f32/bf16/int64/bool tensors, a transposed view, a
  0-d tensor, an empty (0, 5) tensor, keys with dots, nested dicts under ``"model"`` and BYTE_IO
  leaves beside it;
- ``dtensor_ws2/``: two gloo processes, DTensors ``Shard(0)`` (uneven, and one with an empty rank),
  ``Shard(1)`` (uneven), ``Replicate()`` and a plain tensor. torch 2.2 cannot shard 1 row over 2
  ranks (DCP's save planner asserts): such tensors are left out and listed under ``omitted`` in
  the manifest;
- ``<case>.expected.safetensors``: the full tensors under the names fastckpt should write
  (``safetensors.torch.save_file``), or ``<case>.expected.json`` (dtype, shape, sha256 of the
  C-order bytes) plus ``<case>.expected.bin`` when safetensors is not installed;
- ``manifest.json``: the torch, Python and safetensors versions used; ``README.md``: the same
  in words.

Every value is a deterministic function of its index, so reruns give the same tensors.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import shutil
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

try:  # torch >= 2.4
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
except ImportError:  # torch 2.2 / 2.3
    from torch.distributed._tensor import Replicate, Shard, distribute_tensor  # type: ignore
from torch.distributed.device_mesh import init_device_mesh


def _values(n: int, dtype: torch.dtype, salt: int) -> torch.Tensor:
    """``n`` distinct, exactly representable values (no RNG: identical on every version)."""
    i = torch.arange(n, dtype=torch.int64)
    if dtype == torch.bool:
        return (i * 7 + salt) % 3 == 0
    if dtype in (torch.int64, torch.int32):
        return ((i * 2654435761 + salt) % 100003 - 50000).to(dtype)
    return (((i * 37 + salt) % 101).to(torch.float32) / 8 - 6).to(dtype)


def _single_expected() -> dict[str, torch.Tensor]:
    """HF name -> full tensor of the single-process case."""
    base = _values(12, torch.float32, 5).reshape(4, 3)
    return {
        "embed_tokens.weight": _values(20, torch.float32, 1).reshape(5, 4),
        "layers.0.mlp.weight": _values(18, torch.bfloat16, 2).reshape(3, 6),
        "layers.0.ids": _values(7, torch.int64, 3),
        "mask": _values(6, torch.bool, 4).reshape(2, 3),
        "transposed": base.t(),  # stride (1, 3): DCP keeps the strides of the clone
        "scale": torch.tensor(2.5, dtype=torch.float32),
        "norm.inner.weight": _values(3, torch.bfloat16, 6),
        "empty": torch.zeros((0, 5), dtype=torch.float32),
    }


def _single_state() -> dict[str, Any]:
    t = _single_expected()
    model = {
        "embed_tokens.weight": t["embed_tokens.weight"],
        "layers.0.mlp.weight": t["layers.0.mlp.weight"],  # a key with dots, kept verbatim
        "layers.0.ids": t["layers.0.ids"],
        "mask": t["mask"],
        "transposed": t["transposed"],
        "scale": t["scale"],
        "norm": {"inner": {"weight": t["norm.inner.weight"]}},  # nested dicts
        "empty": t["empty"],
    }
    return {"model": model, "step": 7, "extra": {"note": "hello", "lrs": [0.1, 0.2]}}


def _dtensor_expected() -> dict[str, torch.Tensor]:
    return {
        "rows.weight": _values(15, torch.float32, 11).reshape(5, 3),  # Shard(0): 3 + 2 rows
        "cols.weight": _values(20, torch.bfloat16, 12).reshape(4, 5),  # Shard(1): 3 + 2 cols
        "tiny.weight": _values(4, torch.float32, 13).reshape(1, 4),  # Shard(0): 1 + 0 rows
        "ids": _values(6, torch.int64, 14).reshape(2, 3),  # Shard(0): even
        "replicated": _values(5, torch.float32, 15),  # Replicate(): written once
        "plain": _values(4, torch.bool, 16),  # a plain tensor on every rank
    }


def _dtensor_state(mesh: Any, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    t = _dtensor_expected()
    placements = {
        "rows.weight": [Shard(0)],
        "cols.weight": [Shard(1)],
        "tiny.weight": [Shard(0)],
        "ids": [Shard(0)],
        "replicated": [Replicate()],
    }
    model: dict[str, Any] = {}
    for name, value in t.items():
        if name in skip:
            continue
        model[name] = (
            distribute_tensor(value, mesh, placements[name]) if name in placements else value
        )
    return {"model": model, "step": 3}


def _empty_shards_save() -> bool:
    """False where DCP's save planner cannot place an empty shard (torch 2.2: the DTensor builds,
    but ``Shard._local_shard_size_on_dim`` asserts ``size_on_dim >= num_chunks`` during save)."""
    probe = getattr(Shard(0), "_local_shard_size_on_dim", None)
    if probe is None:  # later torch: local_shard_size_and_offset, no such assertion
        return True
    try:
        probe(1, 2, 1, return_offset=True)
    except AssertionError:
        return False
    return True


def _fewer_rows_than_ranks(ws: int) -> frozenset[str]:
    """The ``Shard(0)`` tensors with fewer rows than ranks (one rank's shard is empty)."""
    return frozenset(
        name
        for name in ("rows.weight", "tiny.weight", "ids")
        if _dtensor_expected()[name].shape[0] < ws
    )


def _save(state: dict[str, Any], path: Path) -> None:
    writer = dcp.FileSystemWriter(str(path))
    save = dcp.save if hasattr(dcp, "save") else dcp.save_state_dict
    kwargs: dict[str, Any] = {}
    # torch 2.2 needs no_dist=True without a process group; 2.4-2.8 have no such argument and
    # infer it, as later ones do (with a warning)
    if not dist.is_initialized() and "no_dist" in inspect.signature(save).parameters:
        kwargs["no_dist"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save(state, storage_writer=writer, **kwargs)


def _write_expected(tensors: dict[str, torch.Tensor], out: Path, case: str) -> None:
    full = {k: v.contiguous() for k, v in tensors.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        blob = bytearray()
        table = {}
        for name, v in full.items():
            raw = (v.to(torch.uint8) if v.dtype == torch.bool else v).reshape(-1)
            data = raw.view(torch.uint8).numpy().tobytes()
            table[name] = {
                "dtype": str(v.dtype).removeprefix("torch."),
                "shape": list(v.shape),
                "offset": len(blob),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            blob += data
        (out / f"{case}.expected.bin").write_bytes(bytes(blob))
        (out / f"{case}.expected.json").write_text(json.dumps(table, indent=1) + "\n")
        return
    save_file(full, str(out / f"{case}.expected.safetensors"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, ws: int, port: int, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ws)
    try:
        mesh = init_device_mesh("cpu", (ws,))
        path = Path(out) / f"dtensor_ws{ws}"
        omitted: dict[str, str] = {}
        if not _empty_shards_save():
            why = f"torch {torch.__version__}: DCP save asserts on an empty Shard(0) shard"
            omitted = dict.fromkeys(sorted(_fewer_rows_than_ranks(ws)), why)
        _save(_dtensor_state(mesh, frozenset(omitted)), path)
        if rank == 0:
            (Path(out) / f"dtensor_ws{ws}.omitted.json").write_text(json.dumps(omitted))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    out = Path(argv[0])
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.set_num_threads(1)

    _save(_single_state(), out / "single")
    _write_expected(_single_expected(), out, "single")

    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    omitted_file = out / "dtensor_ws2.omitted.json"
    omitted = json.loads(omitted_file.read_text())
    omitted_file.unlink()
    dtensors = {k: v for k, v in _dtensor_expected().items() if k not in omitted}
    _write_expected(dtensors, out, "dtensor_ws2")

    try:
        import safetensors

        st_version: str | None = safetensors.__version__
    except ImportError:
        st_version = None
    manifest = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "safetensors": st_version,
        "cases": ["single", "dtensor_ws2"],
        "omitted": {"dtensor_ws2": omitted},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    left_out = "".join(f"- `{k}` left out: {v}\n" for k, v in omitted.items())
    (out / "README.md").write_text(
        f"# DCP checkpoints written by torch {torch.__version__}\n\n"
        f"Made on CPU (gloo) under Python {platform.python_version()} with safetensors "
        f"{st_version}, by `python tests/data/versions/make_version_fixture.py "
        f"tests/data/versions/{out.name}` run in a venv holding that torch (see ../README.md). "
        "Do not edit by hand: rerun the script.\n\n"
        "- `single/`: one process; `single.expected.safetensors` holds the full tensors under "
        "the names fastckpt writes.\n"
        "- `dtensor_ws2/`: two gloo ranks, DTensors; `dtensor_ws2.expected.safetensors`.\n"
        f"{left_out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
