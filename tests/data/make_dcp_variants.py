"""Write the DCP writer variants of ``tests/test_dcp_variants.py`` with the installed torch.

Usage::

    python tests/data/make_dcp_variants.py OUT

Writes into ``OUT`` (every checkpoint by torch's own ``FileSystemWriter``):

- ``zstd/``: one process, ``FileSystemWriter(..., _extensions=[ZStandard()])`` (torch >= 2.7, needs
  the ``zstandard`` or ``pyzstd`` module): every item is one zstd frame,
  ``transform_descriptors=['stream.zstd/1']``;
- ``identity_transform/``: one process, a stream transform extension registered by this script
  (``stream.fastckpt-identity/1``) that passes bytes through unchanged: the items are plain
  archives, but the metadata names a transform fastckpt does not know;
- ``nocoll_ws2/``: two gloo processes, ``dcp.save(..., use_collectives=False)`` (torch >= 2.9):
  per-rank ``__0.metadata`` / ``__1.metadata`` and no global ``.metadata``, no dedup; DTensors
  ``Shard(0)`` (uneven, and one with an empty rank), ``Shard(1)``, ``Replicate()``, a plain tensor;
- ``<case>.expected.safetensors``: the full tensors under the names fastckpt should write;
- ``done.json`` last.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from safetensors.torch import save_file
from torch.distributed.checkpoint._extension import StreamTransformExtension, ZStandard
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor


def _values(n: int, dtype: torch.dtype, salt: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.int64)
    if dtype == torch.bool:
        return (i * 7 + salt) % 3 == 0
    if dtype in (torch.int64, torch.int32):
        return ((i * 2654435761 + salt) % 100003 - 50000).to(dtype)
    return (((i * 37 + salt) % 101).to(torch.float32) / 8 - 6).to(dtype)


def single_expected() -> dict[str, torch.Tensor]:
    return {
        "embed_tokens.weight": _values(40, torch.float32, 1).reshape(8, 5),
        "layers.0.mlp.weight": _values(18, torch.bfloat16, 2).reshape(3, 6),
        "layers.0.ids": _values(7, torch.int64, 3),
        "mask": _values(6, torch.bool, 4).reshape(2, 3),
    }


def dtensor_expected() -> dict[str, torch.Tensor]:
    return {
        "rows.weight": _values(15, torch.float32, 11).reshape(5, 3),  # Shard(0): 3 + 2 rows
        "cols.weight": _values(20, torch.bfloat16, 12).reshape(4, 5),  # Shard(1): 3 + 2 cols
        "tiny.weight": _values(4, torch.float32, 13).reshape(1, 4),  # Shard(0): 1 + 0 rows
        "replicated": _values(5, torch.float32, 15),  # Replicate(): on both ranks, no dedup
        "plain": _values(4, torch.bool, 16),  # a plain tensor on every rank
    }


class Identity(StreamTransformExtension):
    """A stream transform that changes nothing, under a name no reader knows."""

    @staticmethod
    def registry_name() -> str:
        return "stream.fastckpt-identity"

    @staticmethod
    def from_descriptor(version: str) -> Identity:
        return Identity()

    def get_descriptor(self) -> str:
        return f"{self.registry_name()}/1"

    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        return output

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:
        return input


def _single_state() -> dict[str, Any]:
    return {"model": single_expected(), "step": 7, "extra": {"note": "hello"}}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, ws: int, port: int, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ws)
    try:
        mesh = init_device_mesh("cpu", (ws,))
        t = dtensor_expected()
        model = {
            "rows.weight": distribute_tensor(t["rows.weight"], mesh, [Shard(0)]),
            "cols.weight": distribute_tensor(t["cols.weight"], mesh, [Shard(1)]),
            "tiny.weight": distribute_tensor(t["tiny.weight"], mesh, [Shard(0)]),
            "replicated": distribute_tensor(t["replicated"], mesh, [Replicate()]),
            "plain": t["plain"],
        }
        dcp.save(
            {"model": model, "step": 3},
            storage_writer=dcp.FileSystemWriter(str(Path(out) / "nocoll_ws2")),
            use_collectives=False,
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _quiet_save(state: dict[str, Any], writer: Any) -> None:
    import warnings

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=writer, no_dist=True)


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    single = {k: v.contiguous() for k, v in single_expected().items()}

    _quiet_save(_single_state(), dcp.FileSystemWriter(str(out / "zstd"), _extensions=[ZStandard()]))
    save_file(single, str(out / "zstd.expected.safetensors"))

    writer = dcp.FileSystemWriter(str(out / "identity_transform"), _extensions=[Identity()])
    _quiet_save(_single_state(), writer)
    save_file(single, str(out / "identity_transform.expected.safetensors"))

    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    dt = {k: v.contiguous() for k, v in dtensor_expected().items()}
    save_file(dt, str(out / "nocoll_ws2.expected.safetensors"))

    buf = io.StringIO()
    json.dump({"torch": torch.__version__}, buf)
    (out / "done.json").write_text(buf.getvalue() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
