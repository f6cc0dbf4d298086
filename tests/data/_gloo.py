"""The ``main()`` of the small fixture generators: ``script OUT`` runs ``worker(rank, port, out)``
on a CPU gloo group of ``nprocs`` processes, then writes ``OUT/done.json`` last."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp


def run_on_ranks(worker: Callable[[int, int, Path], None], nprocs: int = 2) -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, out), nprocs=nprocs)
    (out / "done.json").write_text(json.dumps({"torch": torch.__version__}))
    return 0
