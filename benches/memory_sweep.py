"""Peak anonymous memory of ``fastckpt convert`` across model sizes and ``--max-shard-size``.

Standalone script (not collected by pytest)::

    python benches/make_dcp.py --size M --layers 8     # 1.07 GB
    python benches/make_dcp.py --size M                # 2.08 GB (18 layers)
    python benches/make_dcp.py --size M --layers 38    # 4.10 GB
    python benches/memory_sweep.py --layers 8 18 38 --shards 100MB 500MB 5GB --rounds 2

For each cached DCP (``make_dcp.py``'s folders under ``bench-data/``; a missing one is reported and
skipped) and each shard limit, ``fastckpt convert`` runs as a whole process (2 threads, no fsync)
after an untimed ``rm -rf OUT; sync``, next to a ``cp -r`` of the same folder, and the script
prints the peak summed ``RssAnon`` of the process tree (``compare.run_measured``, polled every
3 ms), the wall time and the ratio to that round's ``cp -r``. Medians over ``--rounds``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from _common import DEFAULT_OUT, SIZES, ModelShape, data_dir, load_manifest
from compare import TIMES, fastckpt_exe, machine_line, run_measured


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[8, 18, 38])
    p.add_argument("--shards", nargs="+", default=["100MB", "500MB", "5GB"])
    p.add_argument("--rounds", type=int, default=2)
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
    cols = ["model", "tensor bytes", "--max-shard-size", "files", "wall s", f"{TIMES} cp",
            "peak anon MiB"]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for layers in args.layers:
        shape = ModelShape(base.hidden, layers, base.vocab, base.ffn)
        root = data_dir(args.out, shape, 2, False, 0)
        src = root / "dcp"
        if load_manifest(root) is None:
            print(f"| {layers} layers | missing: run make_dcp.py --size M --layers {layers} |")
            continue
        for limit in args.shards:
            walls, ratios, peaks, files = [], [], [], 0
            for _ in range(args.rounds):
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"], check=True)
                cp = run_measured(["cp", "-r", str(src), str(out)])
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"], check=True)
                argv = [fck, "convert", str(src), str(out), "--overwrite", "--quiet",
                        "--threads", "2", "--no-fsync", "--max-shard-size", limit]  # fmt: skip
                s = run_measured(argv)
                if s.rc != 0:
                    print(f"fastckpt failed: {s.err}", file=sys.stderr)
                    return 1
                files = len(list(out.glob("*.safetensors")))
                walls.append(s.wall)
                ratios.append(s.wall / cp.wall)
                peaks.append(s.peak_mib)
            shutil.rmtree(out, ignore_errors=True)
            print(
                f"| {layers} layers | {shape.nbytes():,} | {limit} | {files} | "
                f"{statistics.median(walls):.3f} | {statistics.median(ratios):.2f}{TIMES} | "
                f"{max(peaks):.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
