"""Side-by-side benchmark: fastckpt against cp, cat and the torch peers (PERFORMANCE.md section 5).

Every command is a whole subprocess (start-up and imports included). One process runs all of
them in interleaved rounds (1 warm-up round, then ``--rounds``); before every timed run the
outputs are removed and ``sync`` runs, untimed. Reported per command: the median of the per-round
ratios to that round's ``cp -r``, the median wall time, GB/s (tensor bytes / wall), CPU seconds
(user + sys of the process tree) and the peak of the summed ``RssAnon`` over the process tree,
polled every few ms.

Modes (several may be given; default warm):
  warm       page cache warm, no fsync anywhere
  --durable  every command fsyncs its outputs: ``cp -r && find OUT -exec sync {} +`` (an fsync
             of every file and directory), fastckpt with its default fsync, the torch peers
             fsync their files at the end
  --cold     before each run: ``sync``, then posix_fadvise(DONTNEED) on the input files only

Usage::

    python benches/compare.py --size S --rounds 3
    python benches/compare.py --size M --rounds 3 --durable --json results.json
    python benches/compare.py --size M --shard1 --commands cp,fastckpt-2t
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCHES, DataSet
from make_dcp import add_shape_args, ensure, shape_from_args

PY = sys.executable
PEERS = str(BENCHES / "_peers.py")
SHARD = "500MB"
POLL_S = 0.003
TIMES, DASH = "\u00d7", "\u2013"


# ---------------------------------------------------------------------------------------------
# process-tree measurement


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _rss_anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_anon_kib(root: int) -> int:
    """Sum of RssAnon over ``root`` and all its descendants, in KiB."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += _rss_anon_kib(pid)
        todo += _children(pid)
    return total


@dataclass
class Sample:
    """One timed run."""

    wall: float
    cpu: float
    peak_mib: float
    rc: int
    err: str = ""


def run_measured(argv: list[str], env: dict[str, str] | None = None) -> Sample:
    """Run ``argv`` as a whole process; wall, CPU of the tree, and peak summed RssAnon."""
    peak = [0]
    stop = threading.Event()
    with tempfile.TemporaryFile() as err:
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)

        def poll() -> None:
            while True:
                kib = tree_rss_anon_kib(p.pid)
                peak[0] = max(peak[0], kib)
                if stop.wait(POLL_S):
                    return

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = p.wait()
        t1 = time.perf_counter()
        stop.set()
        th.join()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        err.seek(0)
        msg = err.read().decode(errors="replace")[-2000:] if rc else ""
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return Sample(t1 - t0, cpu, peak[0] / 1024, rc, msg)


# ---------------------------------------------------------------------------------------------
# commands


@dataclass
class Command:
    """One peer: a name, its argv for a mode, its output path and its input folders."""

    name: str
    argv: list[str]
    out: Path
    inputs: list[Path]
    samples: list[Sample] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def fastckpt_exe() -> str | None:
    """The fastckpt console script next to this interpreter (not a pyenv shim), or on PATH."""
    here = Path(PY).parent / "fastckpt"
    if here.exists():
        return str(here)
    return shutil.which("fastckpt")


def fastckpt_works(exe: str | None) -> tuple[bool, str]:
    if exe is None:
        return False, "no fastckpt executable"
    r = subprocess.run([exe, "--help"], capture_output=True, text=True)
    if r.returncode != 0:
        return False, "fastckpt --help failed: " + (r.stderr or r.stdout).strip()[-300:]
    r = subprocess.run([exe, "convert", "--help"], capture_output=True, text=True)
    if r.returncode != 0:
        return False, "fastckpt convert --help failed: " + r.stderr.strip()[-300:]
    return True, ""


def build_commands(
    mode: str, ds: DataSet, runs: Path, fck: str | None, selected: set[str] | None
) -> list[Command]:
    dcp = str(ds.dcp)
    durable = mode == "durable"
    cmds: list[Command] = []

    def add(name: str, argv: list[str], inputs: list[Path] | None = None) -> None:
        if selected is not None and name not in selected and name != "cp":
            return
        cmds.append(Command(name, argv, runs / name, inputs or [ds.dcp]))

    out = lambda name: str(runs / name)  # noqa: E731
    if durable:
        script = 'cp -r "$1" "$2" && find "$2" -exec sync {} +'
        add("cp", ["sh", "-c", script, "sh", dcp, out("cp")])
    else:
        add("cp", ["cp", "-r", dcp, out("cp")])
        add("cat", ["sh", "-c", 'cat "$1"/.metadata "$1"/*.distcp > /dev/null', "sh", dcp])
    if fck is not None:
        for threads in (2, 1):
            name = f"fastckpt-{threads}t"
            argv = [fck, "convert", dcp, out(name), "--overwrite", "--quiet"]
            argv += ["--threads", str(threads), "--max-shard-size", SHARD]
            if not durable:
                argv.append("--no-fsync")
            add(name, argv)
    sync = ["--fsync"] if durable else []
    if fck is not None and ds.hf_twin is not None:  # the same input as consolidate
        argv = [fck, "convert", str(ds.hf_twin), out("fastckpt-hf"), "--overwrite", "--quiet"]
        argv += ["--threads", "2", "--max-shard-size", SHARD]
        add("fastckpt-hf", argv + ([] if durable else ["--no-fsync"]), [ds.hf_twin])
    if ds.hf_twin is not None:
        mapping = str(ds.root / "hf_mapping.json")
        argv = [PY, PEERS, "consolidate", str(ds.hf_twin), out("consolidate"), mapping]
        add("consolidate", [*argv, "--threads", "2", *sync], [ds.hf_twin])
    add(
        "dcp-ram-save",
        [PY, PEERS, "ram", dcp, out("dcp-ram-save"), "--max-shard-size", SHARD, *sync],
    )
    add("nemo-rl", [PY, PEERS, "nemo", dcp, out("nemo-rl"), "--max-shard-size", SHARD, *sync])
    accelerate = Path(PY).parent / "accelerate"
    if accelerate.exists():  # one model.safetensors, never fsynced (no option for it)
        add("accelerate", [str(accelerate), "merge-weights", dcp, out("accelerate")])
    return cmds


LABELS = {
    "cp": "`cp -r` (yardstick)",
    "cat": "`cat > /dev/null` (read floor)",
    "fastckpt-2t": "fastckpt convert, 2 threads",
    "fastckpt-1t": "fastckpt convert, 1 thread",
    "fastckpt-hf": "fastckpt convert of the HF-storage twin, 2 threads",
    "consolidate": "torch `consolidate_safetensors_files` of the twin, 2 threads",
    "dcp-ram-save": "DCP loaded in RAM + `save_file`",
    "nemo-rl": "NeMo-RL path: `dcp_to_torch_save` → `torch.load` → `save_file`",
    "accelerate": "`accelerate merge-weights` (DCP in RAM, one file)",
}


def drop_cache(paths: list[Path]) -> None:
    """posix_fadvise(DONTNEED) on every file under ``paths`` (after a sync: clean pages go)."""
    for root in paths:
        for p in root.rglob("*"):
            if p.is_file():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def prepare(cmd: Command, mode: str, all_inputs: list[Path]) -> None:
    """Untimed: remove the outputs, sync; in cold mode drop the inputs from the page cache."""
    if cmd.out.exists():
        shutil.rmtree(cmd.out)
    os.sync()
    if mode == "cold":
        drop_cache(all_inputs)


# ---------------------------------------------------------------------------------------------
# report


def machine_line(path: Path) -> dict[str, object]:
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    fs = subprocess.run(
        ["findmnt", "-no", "FSTYPE,SOURCE", "-T", str(path)], capture_output=True, text=True
    ).stdout.strip()

    def ver(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "-"

    cp_ver = subprocess.run(["cp", "--version"], capture_output=True, text=True).stdout
    return {
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "filesystem": fs,
        "python": platform.python_version(),
        "torch": ver("torch"),
        "safetensors": ver("safetensors"),
        "fastckpt": ver("fastckpt"),
        "coreutils": (cp_ver.splitlines() or ["-"])[0].split()[-1],
    }


def pressure() -> dict[str, float]:
    """PSI "some avg60" for cpu and io (share of time something waited), when the kernel has it."""
    out: dict[str, float] = {}
    for res in ("cpu", "io"):
        try:
            with open(f"/proc/pressure/{res}") as f:
                first = f.readline().split()
            out[res] = float(dict(x.split("=") for x in first[1:])["avg60"])
        except (OSError, KeyError, ValueError):
            pass
    return out


def wait_idle(max_s: float, below: float = 1.0) -> float:
    """Wait up to ``max_s`` seconds for the 1-minute load average to drop below ``below``."""
    t0 = time.perf_counter()
    while max_s > 0 and os.getloadavg()[0] >= below and time.perf_counter() - t0 < max_s:
        time.sleep(5)
    return time.perf_counter() - t0


def summarize(cmds: list[Command], nbytes: int) -> list[dict[str, object]]:
    rows = []
    for c in cmds:
        ok = [s for s in c.samples if s.rc == 0]
        if not ok:
            rows.append({"command": c.name, "failed": c.samples[-1].err if c.samples else "-"})
            continue
        wall = statistics.median(s.wall for s in ok)
        rows.append(
            {
                "command": c.name,
                "ratio_to_cp": statistics.median(c.ratios) if c.ratios else None,
                "ratio_min": min(c.ratios) if c.ratios else None,
                "ratio_max": max(c.ratios) if c.ratios else None,
                "wall_s": wall,
                "gb_s": nbytes / wall / 1e9,
                "cpu_s": statistics.median(s.cpu for s in ok),
                "peak_anon_mib": max(s.peak_mib for s in ok),
                "walls": [round(s.wall, 4) for s in c.samples],
                "argv": c.argv,
            }
        )
    return rows


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        f"| command | {TIMES} cp (min{DASH}max) | wall s | GB/s | CPU s | peak anon MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = LABELS.get(str(r["command"]), str(r["command"]))
        if "failed" in r:
            lines.append(f"| {label} | FAILED: {str(r['failed']).strip()[-120:]} | | | | |")
            continue
        ratio = f"{r['ratio_to_cp']:.2f}{TIMES} ({r['ratio_min']:.2f}{DASH}{r['ratio_max']:.2f})"
        mib = float(r["peak_anon_mib"])  # type: ignore[arg-type]
        mib_s = f"{mib:.0f}" if mib >= 10 else f"{mib:.1f}"
        lines.append(
            f"| {label} | {ratio} | {r['wall_s']:.3f} | {r['gb_s']:.2f} | {r['cpu_s']:.2f} "
            f"| {mib_s} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# verification and start-up


def verify(ds: DataSet, runs: Path, fck: str) -> dict[str, object]:
    """Untimed, once: fastckpt's output against ``fastckpt verify`` and the save_file reference."""
    out, ref = runs / "verify-fastckpt", runs / "verify-reference"
    for p in (out, ref):
        shutil.rmtree(p, ignore_errors=True)
    conv = [fck, "convert", str(ds.dcp), str(out), "--quiet", "--max-shard-size", SHARD]
    r = subprocess.run([*conv, "--overwrite"], capture_output=True, text=True)
    result: dict[str, object] = {"convert_rc": r.returncode}
    if r.returncode != 0:
        result["convert_stderr"] = r.stderr[-1000:]
        result["ok"] = False
        return result
    v = subprocess.run([fck, "verify", str(ds.dcp), str(out)], capture_output=True, text=True)
    result["fastckpt_verify_rc"] = v.returncode
    result["fastckpt_verify_out"] = (v.stdout + v.stderr).strip()[-500:]
    subprocess.run([PY, PEERS, "ram", str(ds.dcp), str(ref), "--max-shard-size", SHARD], check=True)
    c = subprocess.run(
        [PY, PEERS, "check", str(ds.dcp), str(out), str(ref)], capture_output=True, text=True
    )
    try:
        result["reference"] = json.loads(c.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        result["reference"] = {"ok": False, "stderr": c.stderr[-1000:]}
    ref_ok = bool(result["reference"].get("ok"))  # type: ignore[union-attr]
    twin_ok = True
    if ds.hf_twin is not None:  # the twin's pieces, put together, equal the DCP tensor for tensor
        shutil.rmtree(out, ignore_errors=True)
        t = subprocess.run([*conv[:2], str(ds.hf_twin), *conv[3:]], capture_output=True, text=True)
        tv = subprocess.run([fck, "verify", str(ds.dcp), str(out)], capture_output=True, text=True)
        twin_ok = t.returncode == 0 and tv.returncode == 0
        result["twin_verify_out"] = (t.stderr + tv.stdout + tv.stderr).strip()[-500:]
    result["ok"] = v.returncode == 0 and c.returncode == 0 and ref_ok and twin_ok
    for p in (out, ref):
        shutil.rmtree(p, ignore_errors=True)
    return result


def startup(fck: str, n: int = 5) -> dict[str, object]:
    """T6: median wall of ``fastckpt --help`` and of ``import fastckpt`` (torch must stay out)."""
    probe = "import sys, fastckpt; sys.exit(1 if 'torch' in sys.modules else 0)"
    helps, imports, torch_free = [], [], True
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([fck, "--help"], capture_output=True)
        helps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = subprocess.run([PY, "-c", probe], capture_output=True)
        imports.append(time.perf_counter() - t0)
        torch_free &= r.returncode == 0
    base = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", "pass"], capture_output=True)
        base.append(time.perf_counter() - t0)
    return {
        "help_ms": round(statistics.median(helps) * 1e3, 1),
        "import_ms": round(statistics.median(imports) * 1e3, 1),
        "bare_python_ms": round(statistics.median(base) * 1e3, 1),
        "torch_free": torch_free,
    }


# ---------------------------------------------------------------------------------------------


def run_mode(
    mode: str, ds: DataSet, runs: Path, fck: str | None, args: argparse.Namespace
) -> dict[str, object]:
    selected = set(args.commands.split(",")) if args.commands else None
    cmds = build_commands(mode, ds, runs, fck, selected)
    inputs = [ds.dcp] + ([ds.hf_twin] if ds.hf_twin else [])
    waited = wait_idle(args.wait_idle)
    load_before, psi_before = os.getloadavg(), pressure()
    t_mode = time.perf_counter()
    for rnd in range(args.warmup + args.rounds):
        timed = rnd >= args.warmup
        cp_wall = None
        for c in cmds:
            if c.samples and c.samples[-1].rc != 0 and not timed:
                continue
            prepare(c, mode, inputs)
            s = run_measured(c.argv)
            tag = "warm-up" if not timed else f"round {rnd - args.warmup + 1}"
            status = f"{s.wall:7.3f} s {s.cpu:6.2f} cpu-s {s.peak_mib:7.0f} MiB"
            if s.rc:
                status = f"FAILED rc={s.rc}: {s.err.strip()[-300:]}"
            print(f"[{mode}] {tag:8} {c.name:13} {status}", file=sys.stderr, flush=True)
            if not timed:
                if s.rc:
                    c.samples = [s]
                continue
            c.samples.append(s)
            if c.name == "cp" and s.rc == 0:
                cp_wall = s.wall
            if s.rc == 0 and cp_wall:
                c.ratios.append(s.wall / cp_wall)
        for c in cmds:
            if c.out.exists():
                shutil.rmtree(c.out)
    os.sync()
    rows = summarize(cmds, ds.nbytes)
    return {
        "mode": mode,
        "rows": rows,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "psi_avg60_before": psi_before,
        "psi_avg60_after": pressure(),
        "waited_idle_s": round(waited, 1),
        "seconds": round(time.perf_counter() - t_mode, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_shape_args(p)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3; headline 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds (default 1)")
    p.add_argument("--warm", action="store_true", help="warm mode (the default if no mode given)")
    p.add_argument("--durable", action="store_true", help="every command fsyncs its outputs")
    p.add_argument("--cold", action="store_true", help="inputs dropped from the page cache")
    p.add_argument("--commands", help="comma list to run (cp always runs): " + ",".join(LABELS))
    p.add_argument("--no-verify", action="store_true", help="skip the bit-for-bit check")
    p.add_argument("--no-twin", action="store_true", help="skip consolidate (no HF twin)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="S",
        help="before each mode, wait up to S seconds for the 1-min load to fall below 1",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    modes = [m for m in ("warm", "durable", "cold") if getattr(args, m)] or ["warm"]

    shape = shape_from_args(args)
    ds = ensure(
        shape,
        world=args.world,
        shard1=args.shard1,
        hf_twin=not args.no_twin,
        seed=args.seed,
        out=args.out,
    )
    if args.no_twin:
        ds.hf_twin = None
    runs = args.out / "_runs"
    runs.mkdir(parents=True, exist_ok=True)

    fck = fastckpt_exe()
    works, why = fastckpt_works(fck)
    if not works:
        print(f"warning: fastckpt rows skipped ({why})", file=sys.stderr)
        fck = None

    report: dict[str, object] = {
        "data": ds.to_json(),
        "machine": machine_line(runs),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "argv": sys.argv,
    }
    if fck is not None:
        report["startup"] = startup(fck)
        if not args.no_verify:
            report["verify"] = verify(ds, runs, fck)
    results = [run_mode(m, ds, runs, fck, args) for m in modes]
    report["modes"] = results

    gb = ds.nbytes / 1e9
    kind = "Shard(1) o_proj/down_proj" if ds.shard1 else "Shard(0)"
    print(
        f"\n## {ds.n_tensors} tensors, {ds.nbytes:,} bytes ({gb:.2f} GB) bf16, "
        f"{ds.world} ranks, {kind}; output {SHARD} shards; {args.rounds} rounds + "
        f"{args.warmup} warm-up, medians"
    )
    m = report["machine"]
    assert isinstance(m, dict)
    print(
        f"machine: {m['cores']} cores, {m['ram_gib']} GiB RAM, kernel {m['kernel']}, "
        f"{m['filesystem']}; python {m['python']}, torch {m['torch']}, safetensors "
        f"{m['safetensors']}, fastckpt {m['fastckpt']}, coreutils {m['coreutils']}"
    )
    if "startup" in report:
        s = report["startup"]
        assert isinstance(s, dict)
        print(
            f"start-up: `fastckpt --help` {s['help_ms']} ms, `import fastckpt` {s['import_ms']} ms "
            f"(bare python {s['bare_python_ms']} ms), torch-free: {s['torch_free']}"
        )
    if "verify" in report:
        v = report["verify"]
        assert isinstance(v, dict)
        print(f"verify (untimed): ok={v.get('ok')}; {json.dumps(v.get('reference'))}")
        if not v.get("ok") and v.get("twin_verify_out"):
            print(f"  HF-storage twin: {v['twin_verify_out']}")
        if v.get("fastckpt_verify_rc"):
            print(f"  fastckpt verify: rc={v['fastckpt_verify_rc']} {v['fastckpt_verify_out']}")
    for r in results:
        label = {"warm": "warm", "durable": "durable (fsync)", "cold": "cold (inputs dropped)"}
        print(
            f"\n### {label[str(r['mode'])]}: load {r['load_before']} → {r['load_after']}, "
            f"PSI some avg60 {r['psi_avg60_before']} → {r['psi_avg60_after']}, "
            f"{r['seconds']} s\n"
        )
        rows = r["rows"]
        assert isinstance(rows, list)
        print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    failed = any("failed" in row for r in results for row in r["rows"])  # type: ignore[attr-defined]
    bad_verify = isinstance(report.get("verify"), dict) and not report["verify"].get("ok")  # type: ignore[union-attr]
    return 1 if failed or bad_verify else 0


if __name__ == "__main__":
    sys.exit(main())
