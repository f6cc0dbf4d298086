"""Wall time per GB and peak anonymous memory of ``fastckpt convert`` over model sizes, shard
limits and modes (warm, cold, durable), next to ``cp -r`` of the same bytes.

Standalone script (not collected by pytest)::

    python benches/make_dcp.py --size M --layers 8     # 1.07 GB
    python benches/make_dcp.py --size M                # 2.08 GB (18 layers)
    python benches/make_dcp.py --size M --layers 38    # 4.10 GB
    python benches/make_dcp.py --size M --layers 116   # 12.0 GB (~3 min, 12 GB of RAM)
    python benches/memory_sweep.py --layers 8 18 38 --shards 100MB 500MB 5GB --rounds 2
    python benches/memory_sweep.py --layers 8 38 116 --shards 5GB 500MB \\
        --modes warm cold durable --rounds 2                          # the scale proof

For each cached DCP (``make_dcp.py``'s folders under ``bench-data/``; a missing one is reported and
skipped), each shard limit and each mode, rounds interleave ``cp -r`` and ``fastckpt convert``
(2 threads), each a whole process after an untimed ``rm -rf OUT; sync``. Modes (as
``compare.py``): ``warm`` (fastckpt ``--no-fsync``); ``cold`` (also ``--no-fsync``; after the sync,
``posix_fadvise(DONTNEED)`` on the input files only); ``durable`` (fastckpt's default fsync with
early writeback against ``cp -r && find OUT -exec sync {} +``). The script prints the peak summed
``RssAnon`` of the process tree (``compare.run_measured``, polled every 3 ms), the median wall,
seconds per GB of tensor bytes (both commands), and the median of per-round ratios to that round's
``cp``. ``--copy splice copy_file_range`` runs fastckpt once per copy path (``FASTCKPT_COPY``) in
each round, for an A/B of the range-copy call. At 12 GB the source and output (24 GB) do not
both fit this machine's page cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from _common import DEFAULT_OUT, SIZES, ModelShape, data_dir, load_manifest
from compare import DASH, TIMES, drop_cache, fastckpt_exe, machine_line, pressure, run_measured

CP_DURABLE = 'cp -r "$1" "$2" && find "$2" -exec sync {} +'


def prepare(out: Path, src: Path, mode: str) -> None:
    """Untimed: remove the output, sync; cold: drop the input files from the page cache."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    if mode == "cold":
        drop_cache([src])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[8, 18, 38])
    p.add_argument("--shards", nargs="+", default=["100MB", "500MB", "5GB"])
    p.add_argument("--modes", nargs="+", choices=["warm", "cold", "durable"], default=["warm"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--copy",
        nargs="+",
        choices=["splice", "copy_file_range", "pwrite"],
        default=["splice"],
        help="FASTCKPT_COPY values to run side by side in each round (default: splice)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    fck = fastckpt_exe()
    if fck is None:
        print("no fastckpt executable", file=sys.stderr)
        return 1
    runs = args.out / "_runs"
    runs.mkdir(parents=True, exist_ok=True)
    out = runs / "sweep-out"
    base = SIZES["M"]
    print("machine:", machine_line(runs))
    print("load before:", os.getloadavg()[0], "PSI some avg60:", pressure())
    cols = ["model", "tensor bytes", "mode", "--max-shard-size", "copy", "files", "cp s/GB",
            "fastckpt wall s", "s/GB", f"{TIMES} cp (min{DASH}max)", "peak anon MiB"]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|")
    for layers in args.layers:
        shape = ModelShape(base.hidden, layers, base.vocab, base.ffn)
        root = data_dir(args.out, shape, 2, False, 0)
        src = root / "dcp"
        if load_manifest(root) is None:
            print(f"| {layers} layers | missing: run make_dcp.py --size M --layers {layers} |")
            continue
        gb = shape.nbytes() / 1e9
        for mode in args.modes:
            for limit in args.shards:
                walls: dict[str, list[float]] = {c: [] for c in args.copy}
                ratios: dict[str, list[float]] = {c: [] for c in args.copy}
                peaks: dict[str, list[float]] = {c: [] for c in args.copy}
                cps: list[float] = []
                files = 0
                for _ in range(args.rounds):
                    prepare(out, src, mode)
                    if mode == "durable":
                        cp = run_measured(["sh", "-c", CP_DURABLE, "sh", str(src), str(out)])
                    else:
                        cp = run_measured(["cp", "-r", str(src), str(out)])
                    cps.append(cp.wall)
                    for copy in args.copy:
                        prepare(out, src, mode)
                        argv = [fck, "convert", str(src), str(out), "--overwrite", "--quiet",
                                "--threads", "2", "--max-shard-size", limit]  # fmt: skip
                        if mode != "durable":
                            argv.append("--no-fsync")
                        s = run_measured(argv, env={**os.environ, "FASTCKPT_COPY": copy})
                        if s.rc != 0:
                            print(f"fastckpt failed: {s.err}", file=sys.stderr)
                            return 1
                        files = len(list(out.glob("*.safetensors")))
                        walls[copy].append(s.wall)
                        ratios[copy].append(s.wall / cp.wall)
                        peaks[copy].append(s.peak_mib)
                shutil.rmtree(out, ignore_errors=True)
                for copy in args.copy:
                    wall, r = statistics.median(walls[copy]), ratios[copy]
                    print(
                        f"| {layers} layers | {shape.nbytes():,} | {mode} | {limit} | {copy} | "
                        f"{files} | {statistics.median(cps) / gb:.3f} | {wall:.3f} | "
                        f"{wall / gb:.3f} | {statistics.median(r):.2f}{TIMES} "
                        f"({min(r):.2f}{DASH}{max(r):.2f}) | {max(peaks[copy]):.0f} |",
                        flush=True,
                    )
    print("load after:", os.getloadavg()[0], "PSI some avg60:", pressure())
    return 0


if __name__ == "__main__":
    sys.exit(main())
