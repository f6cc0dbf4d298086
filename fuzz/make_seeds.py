"""Write the seed corpora of ``fuzz/seeds/`` with real torch (run once; the seeds are committed).

Usage: python fuzz/make_seeds.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

SEEDS = Path(__file__).resolve().parent / "seeds"


def _zip_member(path: Path, suffix: str) -> bytes:
    import zipfile

    with zipfile.ZipFile(path) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(suffix)]
        return zf.read(name)


def main() -> None:
    shutil.rmtree(SEEDS, ignore_errors=True)
    for name in ("pickle", "zip", "dcp_metadata", "megatron", "safetensors"):
        (SEEDS / name).mkdir(parents=True)
    tmp = Path(tempfile.mkdtemp())
    sd = {"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "b": torch.zeros(3)}
    torch.save(sd, tmp / "sd.pt")
    (SEEDS / "zip" / "state_dict.pt").write_bytes((tmp / "sd.pt").read_bytes())
    (SEEDS / "pickle" / "state_dict.pkl").write_bytes(_zip_member(tmp / "sd.pt", "data.pkl"))
    optim = {
        "state": {0: {"step": torch.tensor(1.0)}},
        "param_groups": [{"lr": 0.1, "params": [0]}],
    }
    torch.save(optim, tmp / "optim.pt")
    (SEEDS / "pickle" / "optim.pkl").write_bytes(_zip_member(tmp / "optim.pt", "data.pkl"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": sd, "step": 3}, checkpoint_id=str(tmp / "dcp"))
    md = (tmp / "dcp" / ".metadata").read_bytes()
    (SEEDS / "dcp_metadata" / "metadata.pkl").write_bytes(md)
    (SEEDS / "pickle" / "dcp_metadata.pkl").write_bytes(md)
    common = {"args": argparse.Namespace(num_layers=2, hidden_size=8), "checkpoint_version": 3.0}
    torch.save(common, tmp / "common.pt")
    (SEEDS / "megatron" / "common.pt").write_bytes(b"\0" + (tmp / "common.pt").read_bytes())
    meta = json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}).encode()
    (SEEDS / "megatron" / "metadata.json").write_bytes(b"\1" + meta)
    header = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    st = struct.pack("<Q", len(header)) + header + b"\0" * 8
    (SEEDS / "safetensors" / "model.safetensors").write_bytes(st)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
