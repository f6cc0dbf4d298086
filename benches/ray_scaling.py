"""Throughput of ``convert --ray`` on a local multi-node Ray cluster against a plain local run.

Starts ``ray.cluster_utils.Cluster`` (a head without CPUs and ``--nodes`` worker nodes of
``--cpus`` CPUs each, all on this machine), then converts the same DCP checkpoint locally and with
``ray_address``, ``--repeat`` times each, and prints the best wall time of each. The source comes
from ``make_dcp.py``; the outputs go to ``--out`` (removed after each run). On one machine this
measures the overhead of the Ray path (planning, task start, per-shard scheduling), not scaling:
every "node" shares the same cores and disk.

Usage::

    python benches/make_dcp.py --size M
    python benches/ray_scaling.py bench-data/llama-h2048-l18-v32000-f5504-w2-seed0/dcp
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import fastckpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="a DCP checkpoint (make_dcp.py)")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=1, help="CPUs (concurrent shards) per node")
    ap.add_argument("--threads", type=int, default=None, help="copy threads per shard task")
    ap.add_argument("--shard", default="500MB")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--fsync", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    out = args.out or Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=args.cpus)
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        best: dict[str, float] = {}
        nbytes = 0
        for _ in range(args.repeat):
            for mode in ("local", "ray"):
                dst = out / mode
                t0 = time.perf_counter()
                rep = fastckpt.convert(
                    args.src,
                    dst,
                    max_shard_size=args.shard,
                    fsync=args.fsync,
                    num_threads=args.threads,
                    ray_address="auto" if mode == "ray" else None,
                )
                dt = time.perf_counter() - t0
                nbytes = rep.nbytes
                best[mode] = min(best.get(mode, dt), dt)
                shutil.rmtree(dst)
        for mode, dt in best.items():
            print(f"{mode:6s} {nbytes / 1e9:.2f} GB in {dt:.2f} s = {nbytes / dt / 1e9:.2f} GB/s")
    finally:
        ray.shutdown()
        cluster.shutdown()
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
