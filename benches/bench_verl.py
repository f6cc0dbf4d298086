"""veRL FSDP2 rank files -> HF safetensors: fastckpt vs veRL's model merger vs ``cp -r``.

Standalone script (pytest collects the module because of its name, but it defines no tests and
imports nothing heavy at module level)::

    python benches/bench_verl.py                    # ~1.5 GB (hidden 2048, 12 layers), 3 rounds
    python benches/bench_verl.py --layers 2 --rounds 1 --warmup 0   # quick look
    python benches/bench_verl.py --peer reimpl      # the merger's algorithm without verl

**Data.** W=2 gloo processes on the CPU each build a Llama-shaped ``LlamaForCausalLM`` (bf16,
untied ``lm_head``) on the meta device, wrap every decoder layer and then the root with FSDP2
``fully_shard`` on a CPU ``init_device_mesh("cpu", (W,), mesh_dim_names=["fsdp"])`` (veRL's
``create_device_mesh``), ``to_empty(device="cpu")``, fill each rank's local shard from a generator
seeded per (rank, tensor), and save exactly what veRL's ``FSDPCheckpointManager.save_checkpoint``
saves for the model: ``torch.save(model.state_dict(), "model_world_size_W_rank_R.pt")`` (a dict of
``Shard(0)`` DTensors), plus ``fsdp_config.json`` (``{"FSDP_version": 2, "world_size": W}``) and
``huggingface/`` (``config.save_pretrained`` and a small tokenizer's ``save_pretrained``: the
merger re-saves the tokenizer and fails without one). Cached under
``bench-data/verl-fsdp2-llama-h…-l…-v…-f…-w2-seed0/actor`` (a folder without ``DONE.json`` is
regenerated). The master weights are bf16 here (veRL's default is fp32; the merger would cast to
bf16, and fastckpt keeps dtypes unless ``--dtype bf16``), so both outputs hold the same values.

**Commands**, each a whole process (start-up and imports included), after an untimed
``rm -rf OUT; sync``, in interleaved rounds (``--warmup`` untimed rounds first), medians:

- ``cp``: ``cp -r ACTOR OUT``, the yardstick (the rank files, ``fsdp_config.json``,
  ``huggingface/``); ratios are to that round's ``cp``;
- ``fastckpt``: ``fastckpt convert ACTOR OUT --overwrite --quiet --no-fsync`` (threads = cores,
  the default 5 GB shard limit: one ``model.safetensors``, like the merger's ``save_pretrained``);
- ``fastckpt-500MB``: the same with ``--max-shard-size 500MB`` (3 shards, the split
  ``compare.py`` uses for DCP; one writer per shard; ``--no-split`` leaves it out);
- ``verl-merger``: ``python -m verl.model_merger merge --backend fsdp --local_dir ACTOR
  --target_dir OUT`` in the ``--verl-python`` interpreter (default ``/tmp/verl-venv/bin/python``).
  veRL 0.9.1 runs here CPU-only from ``pip install verl --no-deps`` into a
  ``--system-site-packages`` venv plus the missing imports ``ray tensordict==0.10.0 codetiming
  omegaconf hydra-core`` (torch/transformers/numpy pinned to the system versions; pip warns that
  verl 0.9.1 asks for transformers < 5.11, and the merge works with the installed one). Its
  algorithm: ``torch.load`` every rank (a thread pool), for each key
  ``torch.cat(local shards, dim=placement.dim)`` in bf16, build the model from the config under
  ``init_empty_weights``, ``to_empty``, ``save_pretrained(state_dict=...)``, re-save the tokenizer;
- ``reimpl`` (``--peer reimpl``, or automatically when verl's merger does not import): that same
  algorithm re-implemented in a few lines of torch + transformers, for machines without verl.

**Measured**: wall s (spawn to exit), GB/s (tensor bytes / median wall), CPU s of the process tree,
peak summed ``RssAnon`` of the process tree polled every 3 ms (``compare.run_measured``), and the
median of per-round ratios to ``cp``. **Verification** (untimed, once): fastckpt's and the peer's
outputs have the same tensor names, dtypes and shapes and ``torch.equal`` values, and equal the
generator's global tensors (regenerated from the seeds); byte identity of the weight files is
reported, not required (``save_pretrained`` adds its own header metadata).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_OUT, ModelShape, load_manifest
from compare import (
    PY,
    Sample,
    fastckpt_exe,
    fastckpt_works,
    machine_line,
    pressure,
    run_measured,
    wait_idle,
)

TIMES, DASH = "\u00d7", "\u2013"
HEADS = 16
DEFAULT_VERL_PY = "/tmp/verl-venv/bin/python"
LABELS = {
    "cp": "`cp -r` (yardstick)",
    "fastckpt": "`fastckpt convert --no-fsync` (default 5 GB limit: 1 shard)",
    "fastckpt-500MB": "`fastckpt convert --no-fsync --max-shard-size 500MB` (500 MB shards)",
    "verl-merger": "`python -m verl.model_merger merge --backend fsdp`",
    "reimpl": "merger algorithm re-implemented (torch.load, cat, save_pretrained)",
}

# veRL 0.9.1 FSDPModelMerger.merge_and_save + save_hf_model_and_tokenizer, condensed: every rank
# loaded whole, DTensor local shards cast to bf16 and concatenated along the Shard dim, plain
# tensors taken from rank 0, the model built empty from the config and save_pretrained'ed.
REIMPL = r"""
import json, os, sys
from concurrent.futures import ThreadPoolExecutor
import torch
from torch.distributed.tensor import DTensor
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
src, dst = sys.argv[1], sys.argv[2]
world = json.load(open(os.path.join(src, "fsdp_config.json")))["world_size"]
def load(rank):
    path = os.path.join(src, f"model_world_size_{world}_rank_{rank}.pt")
    return torch.load(path, map_location="cpu", weights_only=False)
with ThreadPoolExecutor(max_workers=min(32, os.cpu_count())) as ex:
    ranks = list(ex.map(load, range(world)))
merged = {}
for key in list(ranks[0]):
    parts = [r.pop(key) for r in ranks]
    if isinstance(parts[0], DTensor):
        (pl,) = parts[0].placements
        local = [p._local_tensor.bfloat16() for p in parts]
        merged[key] = local[0] if pl.is_replicate() else torch.cat(local, dim=pl.dim).contiguous()
    else:
        merged[key] = parts[0].bfloat16()
del ranks
hf = os.path.join(src, "huggingface")
config = AutoConfig.from_pretrained(hf)
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
model.to_empty(device="cpu")
model.save_pretrained(dst, state_dict=merged)
AutoTokenizer.from_pretrained(hf).save_pretrained(dst)
"""

# Untimed check: both outputs hold the same tensors, and they are the generator's tensors.
CHECK = r"""
import json, sys
from pathlib import Path
import torch
from safetensors import safe_open
sys.path.insert(0, sys.argv[1])
from bench_verl import expected_tensor
a, b, manifest = Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
def tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k)
    return out
ta, tb = tensors(a), tensors(b)
bad = [k for k in sorted(set(ta) | set(tb)) if k not in ta or k not in tb
       or ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k])]
names = [n for n, _ in json.loads(sys.argv[5])]
wrong = [n for i, n in enumerate(names)
         if n not in ta or not torch.equal(ta[n], expected_tensor(manifest, i))]
fa = sorted(p.name for p in a.glob("*.safetensors"))
fb = sorted(p.name for p in b.glob("*.safetensors"))
same_bytes = fa == fb and all((a / n).read_bytes() == (b / n).read_bytes() for n in fa)
print(json.dumps({"tensors": len(ta), "mismatched": bad[:10], "n_mismatched": len(bad),
                  "not_generated": wrong[:10], "files_fastckpt": fa, "files_peer": fb,
                  "byte_identical": same_bytes, "ok": not bad and not wrong and len(ta) > 0}))
"""


# ---------------------------------------------------------------------------------------------
# data


def shape_for(args: argparse.Namespace) -> ModelShape:
    return ModelShape(hidden=args.hidden, layers=args.layers, vocab=args.vocab, ffn=args.ffn)


def cache_dir(out: Path, shape: ModelShape, world: int, seed: int) -> Path:
    tag = f"h{shape.hidden}-l{shape.layers}-v{shape.vocab}-f{shape.ffn}-w{world}-seed{seed}"
    return out / f"verl-fsdp2-llama-{tag}"


def _seed(seed: int, rank: int, index: int) -> int:
    return (seed * 1_000_003 + rank) * 100_003 + index


def _local_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    c = -(-n // world)  # torch.chunk, as Shard(0) splits
    lo = min(rank * c, n)
    return lo, min(lo + c, n)


def expected_tensor(manifest: dict[str, object], index: int):  # type: ignore[no-untyped-def]
    """The global tensor ``index`` as the generator made it (rank pieces concatenated)."""
    import torch

    shape = ModelShape(*(int(manifest[k]) for k in ("hidden", "layers", "vocab", "ffn")))  # type: ignore[call-overload]
    world, seed = int(manifest["world"]), int(manifest["seed"])  # type: ignore[call-overload]
    gshape = shape.tensors()[index][1]
    gen = torch.Generator()
    parts = []
    for rank in range(world):
        lo, hi = _local_rows(gshape[0], world, rank)
        gen.manual_seed(_seed(seed, rank, index))
        local = torch.randn((hi - lo, *gshape[1:]), generator=gen, dtype=torch.float32)
        parts.append(local.mul_(0.02).to(torch.bfloat16))
    return torch.cat(parts)


def llama_config(shape: ModelShape):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=shape.vocab,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )


def _tokenizer():  # type: ignore[no-untyped-def]
    """A small word-level tokenizer (no download): veRL saves the training tokenizer here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(256)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _worker(rank: int, world: int, port: int, shape: ModelShape, seed: int, actor: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=["fsdp"])
        config = llama_config(shape)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        gen = torch.Generator()
        names = [n for n, _ in shape.tensors()]
        params = dict(model.named_parameters())
        assert list(params) == names, (list(params)[:5], names[:5])
        with torch.no_grad():
            for index, name in enumerate(names):
                local = params[name].to_local()
                gen.manual_seed(_seed(seed, rank, index))
                src = torch.randn(local.shape, generator=gen, dtype=torch.float32)
                local.copy_(src.mul_(0.02).to(torch.bfloat16))
        sd = model.state_dict()
        torch.save(sd, os.path.join(actor, f"model_world_size_{world}_rank_{rank}.pt"))
        if rank == 0:
            hf = os.path.join(actor, "huggingface")
            os.makedirs(hf, exist_ok=True)
            model.config.save_pretrained(hf)
            _tokenizer().save_pretrained(hf)
            with open(os.path.join(actor, "fsdp_config.json"), "w") as f:
                json.dump({"FSDP_version": 2, "world_size": world}, f, indent=4)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def ensure(shape: ModelShape, world: int, seed: int, out: Path) -> tuple[Path, dict[str, object]]:
    """The cached actor folder for these parameters (generated when missing) and its manifest."""
    root = cache_dir(out, shape, world, seed)
    manifest = load_manifest(root)
    if manifest is not None:
        return root / "actor", manifest
    import torch.multiprocessing as mp
    from make_dcp import _free_port

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "actor").mkdir(parents=True)
    mp.spawn(
        _worker,
        args=(world, _free_port(), shape, seed, str(tmp / "actor")),
        nprocs=world,
        join=True,
    )
    manifest = {
        "hidden": shape.hidden,
        "layers": shape.layers,
        "vocab": shape.vocab,
        "ffn": shape.ffn,
        "world": world,
        "seed": seed,
        "nbytes": shape.nbytes(),
        "n_tensors": len(shape.tensors()),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (tmp / "DONE.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    os.rename(tmp, root)
    print(f"generated {root} in {manifest['seconds']} s", file=sys.stderr)
    return root / "actor", manifest


# ---------------------------------------------------------------------------------------------
# commands


def verl_usable(py: str) -> tuple[bool, str]:
    if not Path(py).exists():
        return False, f"{py} does not exist"
    r = subprocess.run(
        [py, "-m", "verl.model_merger", "merge", "--help"], capture_output=True, text=True
    )
    if r.returncode != 0:
        return False, (r.stderr or r.stdout).strip().splitlines()[-1][-300:]
    v = subprocess.run(
        [py, "-c", "import importlib.metadata as m; print(m.version('verl'))"],
        capture_output=True,
        text=True,
    )
    return True, v.stdout.strip()


Commands = dict[str, tuple[list[str], Path]]


def commands(
    actor: Path, runs: Path, fck: str, peers: list[str], verl_py: str, split: bool
) -> Commands:
    cmds: Commands = {}
    out = runs / "cp"
    cmds["cp"] = (["cp", "-r", str(actor), str(out)], out)
    out = runs / "fastckpt"
    cmds["fastckpt"] = (
        [fck, "convert", str(actor), str(out), "--overwrite", "--quiet", "--no-fsync"],
        out,
    )
    if split:
        out = runs / "fastckpt-500MB"
        argv = [fck, "convert", str(actor), str(out), "--overwrite", "--quiet", "--no-fsync"]
        cmds["fastckpt-500MB"] = ([*argv, "--max-shard-size", "500MB"], out)
    if "verl-merger" in peers:
        out = runs / "verl-merger"
        argv = [verl_py, "-m", "verl.model_merger", "merge", "--backend", "fsdp"]
        cmds["verl-merger"] = ([*argv, "--local_dir", str(actor), "--target_dir", str(out)], out)
    if "reimpl" in peers:
        out = runs / "reimpl"
        cmds["reimpl"] = ([PY, "-c", REIMPL, str(actor), str(out)], out)
    return cmds


def run_once(argv: list[str], out: Path):  # type: ignore[no-untyped-def]
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    return run_measured(argv)


def verify(
    actor: Path,
    runs: Path,
    cmds: Commands,
    peer: str,
    manifest: dict[str, object],
    shape: ModelShape,
) -> dict[str, object]:
    outs = {}
    for name in ("fastckpt", peer):
        argv, out = cmds[name]
        scratch = runs / f"verify-{name}"
        argv = [str(scratch) if a == str(out) else a for a in argv]
        shutil.rmtree(scratch, ignore_errors=True)
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode:
            return {"ok": False, "failed": name, "stderr": r.stderr[-2000:]}
        outs[name] = scratch
    c = subprocess.run(
        [
            PY,
            "-c",
            CHECK,
            str(Path(__file__).resolve().parent),
            str(outs["fastckpt"]),
            str(outs[peer]),
            json.dumps(manifest),
            json.dumps(shape.tensors()),
        ],
        capture_output=True,
        text=True,
    )
    try:
        result: dict[str, object] = json.loads(c.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        result = {"ok": False, "stderr": c.stderr[-2000:]}
    for p in outs.values():
        shutil.rmtree(p, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12, help="12: 1.48 GB (default)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--ffn", type=int, default=5504)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="cache folder (bench-data/)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--peer",
        choices=["auto", "verl", "reimpl", "both"],
        default="auto",
        help="auto: verl's merger if it runs from --verl-python, else the re-implementation",
    )
    p.add_argument("--verl-python", default=DEFAULT_VERL_PY, help="interpreter with verl")
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--no-split", action="store_true", help="leave out the 500MB-shard row")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="S",
        help="before the rounds, wait up to S seconds for the 1-min load to fall below 1",
    )
    p.add_argument("--json", type=Path, help="write every sample here")
    args = p.parse_args(argv)

    shape = shape_for(args)
    actor, manifest = ensure(shape, args.world, args.seed, args.out)
    nbytes = int(manifest["nbytes"])  # type: ignore[call-overload]
    runs = args.out / "_runs_verl"
    runs.mkdir(parents=True, exist_ok=True)
    fck = fastckpt_exe()
    works, why = fastckpt_works(fck)
    if not works or fck is None:
        sys.exit(f"fastckpt unusable: {why}")

    ok_verl, verl_info = verl_usable(args.verl_python)
    if args.peer == "verl" and not ok_verl:
        sys.exit(f"verl's merger unusable: {verl_info}")
    peers = {
        "auto": ["verl-merger"] if ok_verl else ["reimpl"],
        "verl": ["verl-merger"],
        "reimpl": ["reimpl"],
        "both": (["verl-merger"] if ok_verl else []) + ["reimpl"],
    }[args.peer]
    if not ok_verl:
        print(f"verl's merger not used: {verl_info}", file=sys.stderr)
    cmds = commands(actor, runs, fck, peers, args.verl_python, not args.no_split)
    report: dict[str, object] = {
        "data": {**manifest, "actor": str(actor)},
        "machine": machine_line(runs),
        "verl": verl_info if ok_verl else f"unusable: {verl_info}",
        "argv": sys.argv,
    }
    verified: dict[str, dict[str, object]] = {}
    if not args.no_verify:
        verified = {pr: verify(actor, runs, cmds, pr, manifest, shape) for pr in peers}
        report["verify"] = verified

    waited = wait_idle(args.wait_idle)
    load_before, psi_before = os.getloadavg(), pressure()
    samples: dict[str, list[Sample]] = {k: [] for k in cmds}
    ratios: dict[str, list[float]] = {k: [] for k in cmds}
    for rnd in range(args.warmup + args.rounds):
        timed = rnd >= args.warmup
        cp_wall = 1.0
        for name, (cmd, out) in cmds.items():
            s = run_once(cmd, out)
            tag = f"round {rnd - args.warmup + 1}" if timed else "warm-up"
            status = f"{s.wall:7.3f} s {s.cpu:6.2f} cpu-s {s.peak_mib:7.1f} MiB"
            print(f"{tag:8} {name:12} {status if not s.rc else s.err[-800:]}", file=sys.stderr)
            if s.rc:
                return 1
            if timed:
                samples[name].append(s)
                cp_wall = s.wall if name == "cp" else cp_wall
                ratios[name].append(s.wall / cp_wall)
        for _, out in cmds.values():
            shutil.rmtree(out, ignore_errors=True)
    os.sync()
    shutil.rmtree(runs, ignore_errors=True)

    rows: list[dict[str, float]] = []
    names = list(cmds)
    for name in cmds:
        ss = samples[name]
        wall = statistics.median(s.wall for s in ss)
        rows.append(
            {
                "index": names.index(name),
                "ratio": statistics.median(ratios[name]),
                "ratio_min": min(ratios[name]),
                "ratio_max": max(ratios[name]),
                "wall_s": wall,
                "gb_s": nbytes / wall / 1e9,
                "cpu_s": statistics.median(s.cpu for s in ss),
                "peak_anon_mib": max(s.peak_mib for s in ss),
            }
        )
    load = [[round(x, 2) for x in load_before], [round(x, 2) for x in os.getloadavg()]]
    psi = [psi_before, pressure()]
    report.update(rows=rows, load=load, psi_avg60=psi, waited_idle_s=round(waited, 1))
    report["names"] = names

    m = report["machine"]
    assert isinstance(m, dict)
    print(
        f"\n## veRL FSDP2, {manifest['n_tensors']} tensors, {nbytes:,} bytes "
        f"({nbytes / 1e9:.2f} GB) bf16, {manifest['world']} ranks Shard(0); warm, "
        f"{args.rounds} rounds + {args.warmup} warm-up, medians"
    )
    print(
        f"machine: {m['cores']} cores, {m['ram_gib']} GiB RAM, kernel {m['kernel']}, "
        f"{m['filesystem']}; python {m['python']}, torch {m['torch']}, fastckpt {m['fastckpt']}, "
        f"verl {report['verl']}; load {load[0]} → {load[1]}, PSI some avg60 {psi[0]} → {psi[1]}"
    )
    for pr, v in verified.items():
        print(f"verify (untimed) fastckpt vs {pr}: {json.dumps(v)}")
    print("\n| command | ratio to cp | wall s | GB/s | CPU s | peak RssAnon MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['ratio']:.2f}{TIMES} ({r['ratio_min']:.2f}{DASH}{r['ratio_max']:.2f})"
        print(
            f"| {LABELS[names[int(r['index'])]]} | {ratio} | {r['wall_s']:.2f} | {r['gb_s']:.2f} "
            f"| {r['cpu_s']:.2f} | {r['peak_anon_mib']:.0f} |"
        )
    by = {names[int(r["index"])]: r for r in rows}
    for pr in peers:
        speed = by[pr]["wall_s"] / by["fastckpt"]["wall_s"]
        print(f"fastckpt is {speed:.1f}{TIMES} faster than {pr}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=vars) + "\n")
    bad = any(not v.get("ok") for v in verified.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
