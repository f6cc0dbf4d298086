"""Ways to fill ONE output file, side by side with ``cp -r`` in the same run (issue 12).

Standalone script (not collected by pytest)::

    python benches/make_dcp.py --size M            # 2.08 GB DCP, 2 ranks, cached in bench-data/
    python benches/write_paths.py --rounds 5

Takes the byte ranges of a one-file conversion of the cached M DCP (fastckpt's own catalogue and
header length) and copies them in-process with each kernel path below, into one preallocated
file, after an untimed ``rm -rf OUT; sync``; rounds interleave every path with ``cp -r`` of the
DCP folder. Ratio = median of per-round wall / that round's ``cp`` wall. No fsync. The
``…-4k`` rows start the data section at the next 4 KiB boundary (a space-padded header); the
``files→1`` rows copy the two rank files whole into one file at destination offsets 13,704 and
16,384 (sources page-aligned), the case where alignment does matter.

Paths: ``splice-1M`` (fastckpt's default: splice source → 1 MiB pipe → output), ``cfr``
(``copy_file_range`` per ≤ 32 MiB range, fastckpt before), ``splice-1M-2t`` (two threads, two
pipes, one file), ``cfr-2t``, ``cfr+prefault`` (a helper thread ``POSIX_FADV_WILLNEED``s the
preallocated output ahead of the copy, so page-cache folios exist before the locked write),
``mmap+pwrite`` (a ``pwrite`` from a source mapping per range), ``odirect-2t`` (two threads
gather 8 MiB output blocks with ``preadv`` into aligned buffers and ``pwrite`` them with
``O_DIRECT`` into the preallocated file: shared inode lock, but bound by the disk).
"""

from __future__ import annotations

import argparse
import fcntl
import math
import mmap
import os
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from _common import DEFAULT_OUT, SIZES, ModelShape, data_dir, load_manifest
from compare import DASH, TIMES, fastckpt_exe, machine_line

F_SETPIPE_SZ = 1031
PIECE = 32 << 20
Range = tuple[int, int, int, int]  # (source fd, source offset, destination offset, length)


def ranges(dcp: Path) -> tuple[list[tuple[str, int, int, int]], int]:
    """(path, source offset, offset in the data section, length) of every chunk, and the total."""
    from fastckpt.formats.registry import open_catalogue

    cat = open_catalogue(dcp, arch=None, hf_config=None)
    entries = sorted(cat.locate(cat.model_names()), key=lambda e: e.name.encode())
    out, off = [], 0
    for e in entries:
        _, dtype, shape, chunks = e.source()
        assert dtype == "BF16", "the M model is all bf16: data order is name order"
        row = math.prod(shape[1:])
        for path, doff, _dlen, soff, _strides, offs, sizes in chunks:
            out.append((path, doff + soff * 2, off + offs[0] * row * 2, math.prod(sizes) * 2))
        off += math.prod(shape) * 2
    return out, off


class Paths:
    def __init__(self, dcp: Path, out: Path, header: int) -> None:
        self.dcp, self.out, self.header = dcp, out, header
        self.chunks, self.total = ranges(dcp)
        self.fds: dict[str, int] = {}

    def fd(self, p: str) -> int:
        if p not in self.fds:
            self.fds[p] = os.open(p, os.O_RDONLY)
        return self.fds[p]

    def items(self, start: int) -> list[Range]:
        its = []
        for p, s, d, n in self.chunks:
            for o in range(0, n, PIECE):
                its.append((self.fd(p), s + o, start + d + o, min(PIECE, n - o)))
        return its

    def whole_files(self, start: int) -> list[Range]:
        its, d = [], start
        for f in sorted(self.dcp.glob("*.distcp")):
            n = f.stat().st_size
            for o in range(0, n, PIECE):
                its.append((self.fd(str(f)), o, d + o, min(PIECE, n - o)))
            d += n
        return its

    def new_out(self, end: int, direct: bool = False) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
        fd = os.open(self.out / "model.safetensors", flags, 0o644)
        os.posix_fallocate(fd, 0, end)  # ext4 preallocates: no write per block
        return fd


def cfr(fd: int, its: list[Range]) -> None:
    for sf, s, d, n in its:
        while n:
            r = os.copy_file_range(sf, fd, n, s, d)
            s, d, n = s + r, d + r, n - r


def splice(fd: int, its: list[Range]) -> None:
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
    try:
        for sf, s, d, n in its:
            while n:
                k = os.splice(sf, w, min(n, 1 << 20), offset_src=s)
                s, n = s + k, n - k
                while k:
                    m = os.splice(r, fd, k, offset_dst=d)
                    d, k = d + m, k - m
    finally:
        os.close(r)
        os.close(w)


def two_threads(f: Callable[[int, list[Range]], None], fd: int, its: list[Range]) -> None:
    half = len(its) // 2
    ts = [threading.Thread(target=f, args=(fd, part)) for part in (its[:half], its[half:])]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def cfr_prefault(fd: int, its: list[Range], out: Path) -> None:
    rd = os.open(out / "model.safetensors", os.O_RDONLY)

    def helper() -> None:
        for _, _, d, n in its:
            os.posix_fadvise(rd, d, n, os.POSIX_FADV_WILLNEED)

    t = threading.Thread(target=helper)
    t.start()
    cfr(fd, its)
    t.join()
    os.close(rd)


def mmap_pwrite(fd: int, its: list[Range]) -> None:
    for sf, s, d, n in its:
        a = s & ~(mmap.PAGESIZE - 1)
        m = mmap.mmap(sf, n + s - a, prot=mmap.PROT_READ, offset=a)
        m.madvise(mmap.MADV_SEQUENTIAL)
        with memoryview(m) as whole:
            mv = whole[s - a : s - a + n]
            while n:
                k = os.pwrite(fd, mv, d)
                mv, d, n = mv[k:], d + k, n - k
            mv.release()
        m.close()


def odirect(fd: int, its: list[Range], start: int, end: int, threads: int = 2) -> None:
    blk = 8 << 20
    pieces = sorted(its, key=lambda x: x[2])
    blocks = [(a, min(a + blk, end)) for a in range(start & ~4095, end, blk)]

    def work(k: int) -> None:
        buf = mmap.mmap(-1, blk)
        mv = memoryview(buf)
        j = 0
        for a, b in blocks[k::threads]:
            while pieces[j][2] + pieces[j][3] <= a:
                j += 1
            jj = j
            while jj < len(pieces) and pieces[jj][2] < b:
                sf, s, d, n = pieces[jj]
                lo, hi = max(a, d), min(b, d + n)
                os.preadv(sf, [mv[lo - a : hi - a]], s + lo - d)
                jj += 1
            os.pwrite(fd, mv[: (b - a + 4095) & ~4095], a)
        mv.release()
        buf.close()

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    os.ftruncate(fd, end)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layers", type=int, default=SIZES["M"].layers)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--only", nargs="*", help="names of the paths to run (cp always runs)")
    args = p.parse_args(argv)
    base = SIZES["M"]

    root = data_dir(
        args.out, ModelShape(base.hidden, args.layers, base.vocab, base.ffn), 2, False, 0
    )
    if load_manifest(root) is None:
        print(f"missing {root}: run make_dcp.py --size M --layers {args.layers}", file=sys.stderr)
        return 1
    dcp = root / "dcp"
    runs = args.out / "_runs"
    out = runs / "write-paths"
    ref = runs / "write-paths-ref"
    fck = fastckpt_exe()
    assert fck is not None
    shutil.rmtree(ref, ignore_errors=True)
    subprocess.run([fck, "convert", str(dcp), str(ref), "--quiet", "--no-fsync"], check=True)
    with open(ref / "model.safetensors", "rb") as f:
        header = 8 + struct.unpack("<Q", f.read(8))[0]
    shutil.rmtree(ref)
    px = Paths(dcp, out, header)
    h, h4 = header, (header + 4095) & ~4095
    end, end4 = h + px.total, h4 + px.total
    nfiles = sum(f.stat().st_size for f in dcp.glob("*.distcp"))

    def run(f: Callable[[int, list[Range]], None], start: int, stop: int, whole: bool = False):
        def go() -> None:
            fd = px.new_out(stop)
            try:
                f(fd, px.whole_files(start) if whole else px.items(start))
            finally:
                os.close(fd)

        return go

    def direct(start: int, stop: int) -> Callable[[], None]:
        def go() -> None:
            fd = px.new_out(stop, direct=True)
            try:
                odirect(fd, px.items(start), start, stop)
            finally:
                os.close(fd)

        return go

    def prefault(fd: int, its: list[Range]) -> None:
        cfr_prefault(fd, its, out)

    paths: dict[str, Callable[[], None]] = {
        "cp": lambda: subprocess.run(["cp", "-r", str(dcp), str(out / "cp")], check=True) and None,
        "splice-1M": run(splice, h, end),
        "splice-1M-4k": run(splice, h4, end4),
        "splice-1M-2t": run(lambda fd, its: two_threads(splice, fd, its), h, end),
        "cfr": run(cfr, h, end),
        "cfr-4k": run(cfr, h4, end4),
        "cfr-2t": run(lambda fd, its: two_threads(cfr, fd, its), h, end),
        "cfr+prefault": run(prefault, h, end),
        "mmap+pwrite": run(mmap_pwrite, h, end),
        "odirect-2t-4k": direct(h4, end4),
        "files→1 cfr @13704": run(cfr, 13704, 13704 + nfiles, whole=True),
        "files→1 cfr @16384": run(cfr, 16384, 16384 + nfiles, whole=True),
        "files→1 splice @13704": run(splice, 13704, 13704 + nfiles, whole=True),
        "files→1 splice @16384": run(splice, 16384, 16384 + nfiles, whole=True),
    }
    if args.only:
        paths = {k: v for k, v in paths.items() if k == "cp" or k in args.only}
    print("machine:", machine_line(runs))
    print(f"data: {dcp} ({px.total:,} tensor bytes, header {h} bytes, {len(px.chunks)} ranges)")
    walls: dict[str, list[float]] = {k: [] for k in paths}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds + 1):  # round 0: warm-up
        for name, go in paths.items():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            os.sync()
            t = time.perf_counter()
            go()
            dt = time.perf_counter() - t
            if r:
                walls[name].append(dt)
        loads.append(os.getloadavg()[0])
        if r:
            line = " ".join(f"{k}={v[-1]:.2f}" for k, v in walls.items())
            print(f"round {r} (load {loads[-1]:.1f}): {line}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    print(f"\nload (1 min) per round: {' '.join(f'{x:.1f}' for x in loads)}\n")
    print(f"| path | {TIMES} cp (min{DASH}max) | wall s | GB/s |")
    print("|---|---:|---:|---:|")
    for name, w in walls.items():
        rat = [x / c for x, c in zip(w, walls["cp"], strict=True)]
        lo, hi = min(rat), max(rat)
        med = statistics.median(w)
        print(
            f"| {name} | {statistics.median(rat):.2f}{TIMES} ({lo:.2f}{DASH}{hi:.2f}) | "
            f"{med:.3f} | {px.total / med / 1e9:.2f} |"
        )
    for fd in px.fds.values():
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
