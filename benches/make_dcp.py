"""Generate a Llama-shaped bf16 DCP checkpoint with real torch, for the benchmarks.

W gloo processes on the CPU each build their local shard from a generator seeded per
(rank, tensor), wrap it as a ``Shard(0)`` DTensor (``--shard1``: o_proj/down_proj as ``Shard(1)``)
and call ``dcp.save({"model": sd})``, the NeMo RL layout (keys ``model.<hf name>``). With
``--hf-twin`` the same state is also saved by ``HuggingFaceStorageWriter(save_distributed=True)``,
the input of torch's ``consolidate_safetensors_files``.

Results are cached by parameters under ``--out`` (default ``bench-data/``)::

    <out>/llama-h2048-l18-v32000-f5504-w2-seed0/
        dcp/        .metadata + __R_0.distcp
        hf-twin/    shard-0000R-model-0000I-of-0000N.safetensors (with --hf-twin)
        hf_mapping.json   HF name -> output file index (1-based), 500 MB split
        DONE.json   parameters, tensor bytes, tensor count

Usage::

    python benches/make_dcp.py --size S
    python benches/make_dcp.py --size M --hf-twin
    python benches/make_dcp.py --hidden 512 --layers 2 --vocab 1000 --ffn 1400 --world 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    DEFAULT_OUT,
    SIZES,
    DataSet,
    ModelShape,
    data_dir,
    is_strided,
    load_manifest,
    parse_size,
    split_shards,
)

TWIN_SHARD_SIZE = "500MB"


def local_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """torch.chunk semantics (what ``Shard`` uses): chunk ``ceil(n/W)``, tail ranks get less."""
    c = -(-n // world)
    start = min(rank * c, n)
    return start, min(start + c, n)


def _seed(seed: int, rank: int, index: int) -> int:
    return (seed * 1_000_003 + rank) * 100_003 + index


def _worker(
    rank: int,
    world: int,
    port: int,
    shape: ModelShape,
    shard1: bool,
    seed: int,
    tmp: str,
    twin: bool,
) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        mesh = init_device_mesh("cpu", (world,))
        gen = torch.Generator()
        sd: dict[str, DTensor] = {}
        for index, (name, gshape) in enumerate(shape.tensors()):
            dim = 1 if (shard1 and is_strided(name)) else 0
            lo, hi = local_range(gshape[dim], world, rank)
            lshape = list(gshape)
            lshape[dim] = hi - lo
            gen.manual_seed(_seed(seed, rank, index))
            local = torch.randn(lshape, generator=gen, dtype=torch.float32).mul_(0.02)
            local = local.to(torch.bfloat16)
            gstride = torch.empty(gshape, device="meta").stride()
            sd[name] = DTensor.from_local(
                local, mesh, [Shard(dim)], run_check=False, shape=torch.Size(gshape), stride=gstride
            )
        dcp.save({"model": sd}, checkpoint_id=os.path.join(tmp, "dcp"))
        if twin:
            from torch.distributed.checkpoint import HuggingFaceStorageWriter

            with open(os.path.join(tmp, "hf_mapping.json")) as f:
                mapping = json.load(f)
            writer = HuggingFaceStorageWriter(
                os.path.join(tmp, "hf-twin"), fqn_to_index_mapping=mapping, save_distributed=True
            )
            dcp.save(sd, storage_writer=writer)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def twin_mapping(shape: ModelShape, max_shard_size: str = TWIN_SHARD_SIZE) -> dict[str, int]:
    """HF name -> 1-based output file index, split as transformers would (500 MB shards)."""
    tensors = shape.tensors()
    sizes = [2 * _numel(s) for _, s in tensors]
    mapping: dict[str, int] = {}
    for i, shard in enumerate(split_shards(sizes, parse_size(max_shard_size)), start=1):
        for j in shard:
            mapping[tensors[j][0]] = i
    return mapping


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def ensure(
    shape: ModelShape,
    *,
    world: int = 2,
    shard1: bool = False,
    hf_twin: bool = False,
    seed: int = 0,
    out: Path = DEFAULT_OUT,
    quiet: bool = False,
) -> DataSet:
    """Return the cached data set for these parameters, generating what is missing."""
    root = data_dir(out, shape, world, shard1, seed)
    manifest = load_manifest(root)
    if manifest is not None and (not hf_twin or manifest.get("hf_twin")):
        return _dataset(root, manifest)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with open(tmp / "hf_mapping.json", "w") as f:
        json.dump(twin_mapping(shape), f, indent=1)

    import torch.multiprocessing as mp

    mp.spawn(
        _worker,
        args=(world, _free_port(), shape, shard1, seed, str(tmp), hf_twin),
        nprocs=world,
        join=True,
    )
    manifest = {
        "hidden": shape.hidden,
        "layers": shape.layers,
        "vocab": shape.vocab,
        "ffn": shape.ffn,
        "world": world,
        "shard1": shard1,
        "seed": seed,
        "hf_twin": hf_twin,
        "nbytes": shape.nbytes(),
        "n_tensors": len(shape.tensors()),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    with open(tmp / "DONE.json", "w") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(root, ignore_errors=True)
    os.rename(tmp, root)
    if not quiet:
        print(f"generated {root} in {manifest['seconds']} s", file=sys.stderr)
    return _dataset(root, manifest)


def _dataset(root: Path, manifest: dict[str, object]) -> DataSet:
    shape = ModelShape(
        int(manifest["hidden"]),  # type: ignore[call-overload]
        int(manifest["layers"]),  # type: ignore[call-overload]
        int(manifest["vocab"]),  # type: ignore[call-overload]
        int(manifest["ffn"]),  # type: ignore[call-overload]
    )
    return DataSet(
        root=root,
        dcp=root / "dcp",
        hf_twin=(root / "hf-twin") if manifest.get("hf_twin") else None,
        shape=shape,
        world=int(manifest["world"]),  # type: ignore[call-overload]
        shard1=bool(manifest["shard1"]),
        nbytes=int(manifest["nbytes"]),  # type: ignore[call-overload]
        n_tensors=int(manifest["n_tensors"]),  # type: ignore[call-overload]
    )


def shape_from_args(args: argparse.Namespace) -> ModelShape:
    """Preset from ``--size``, overridden field by field by ``--hidden`` etc."""
    base = SIZES[args.size]
    return ModelShape(
        hidden=args.hidden or base.hidden,
        layers=args.layers if args.layers is not None else base.layers,
        vocab=args.vocab or base.vocab,
        ffn=args.ffn or base.ffn,
    )


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """Options shared with compare.py."""
    p.add_argument("--size", choices=sorted(SIZES), default="S", help="preset (default S)")
    p.add_argument("--hidden", type=int, help="override the preset's hidden size")
    p.add_argument("--layers", type=int, help="override the preset's layer count")
    p.add_argument("--vocab", type=int, help="override the preset's vocabulary size")
    p.add_argument("--ffn", type=int, help="override the preset's MLP size")
    p.add_argument("--world", type=int, default=2, help="ranks that save (default 2)")
    p.add_argument("--shard1", action="store_true", help="o_proj/down_proj as Shard(1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="cache folder (bench-data/)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_shape_args(p)
    p.add_argument("--hf-twin", action="store_true", help="also save with HuggingFaceStorageWriter")
    args = p.parse_args(argv)
    ds = ensure(
        shape_from_args(args),
        world=args.world,
        shard1=args.shard1,
        hf_twin=args.hf_twin,
        seed=args.seed,
        out=args.out,
    )
    print(json.dumps(ds.to_json(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
