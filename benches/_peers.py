"""The torch peers of the benchmark, each a whole process (imports included), plus the check.

Subcommands::

    nemo DCP OUT         NeMo RL's convert_dcp_to_hf: dcp_to_torch_save -> torch.load ->
                         safetensors.torch.save_file per shard (the .pt is written inside OUT and
                         removed at the end, as NeMo RL does)
    ram DCP OUT          DCP loaded in RAM (_load_state_dict + _EmptyStateDictLoadPlanner, what
                         dcp_to_torch_save does) -> save_file per shard
    consolidate HF OUT MAPPING
                         torch's consolidate_safetensors_files on the HuggingFaceStorageWriter
                         twin, with the 500 MB file mapping
    check DCP OUT REF    untimed: OUT's safetensors files byte-identical to REF's, and a few
                         tensors of OUT equal to torch's own DCP load

Options: ``--max-shard-size 500MB`` (nemo, ram), ``--threads 2`` (consolidate), ``--fsync``
(fsync every output file and directory at the end).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fsync_tree, parse_size, shard_file_name, split_shards

WRAPPER = "model"


def _load_dcp(dcp_dir: str) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict[str, Any] = {}
    _load_state_dict(
        sd,
        storage_reader=FileSystemReader(dcp_dir),
        planner=_EmptyStateDictLoadPlanner(),
        no_dist=True,
    )
    return sd


def _save_sharded(sd: dict[str, Any], out: Path, max_shard_size: str) -> None:
    """save_file per shard, split as transformers does, plus a transformers-style index."""
    from safetensors.torch import save_file

    names = list(sd)
    sizes = [sd[k].numel() * sd[k].element_size() for k in names]
    shards = split_shards(sizes, parse_size(max_shard_size))
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = shard_file_name(i, len(shards))
        save_file({names[j]: sd[names[j]] for j in shard}, str(out / fname), {"format": "pt"})
        for j in shard:
            weight_map[names[j]] = fname
    if len(shards) > 1:
        index = {
            "metadata": {
                "total_parameters": sum(sd[k].numel() for k in names),
                "total_size": sum(sizes),
            },
            "weight_map": weight_map,
        }
        with open(out / "model.safetensors.index.json", "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")


def _strip(sd: dict[str, Any]) -> dict[str, Any]:
    """Strip the DCP wrapper (``{"model": {...}}``) once; also accept flat ``model.`` keys."""
    if set(sd) == {WRAPPER} and isinstance(sd[WRAPPER], dict):
        inner: dict[str, Any] = sd[WRAPPER]
        return inner
    p = WRAPPER + "."
    return {k[len(p) :] if k.startswith(p) else k: v for k, v in sd.items()}


def nemo(dcp_dir: str, out: Path, max_shard_size: str) -> None:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out.mkdir(parents=True, exist_ok=True)
    pt = out / "pytorch_model.bin"
    dcp_to_torch_save(dcp_dir, pt)
    sd = _strip(torch.load(pt))
    _save_sharded(sd, out, max_shard_size)
    pt.unlink()


def ram(dcp_dir: str, out: Path, max_shard_size: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _save_sharded(_strip(_load_dcp(dcp_dir)), out, max_shard_size)


def consolidate(hf_dir: str, out: Path, mapping_path: str, threads: int) -> None:
    from torch.distributed.checkpoint._consolidate_hf_safetensors import (
        consolidate_safetensors_files,
    )

    with open(mapping_path) as f:
        mapping = json.load(f)
    out.mkdir(parents=True, exist_ok=True)
    consolidate_safetensors_files(hf_dir, str(out), mapping, num_threads=threads)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def check(dcp_dir: str, out: Path, ref: Path, n_sample: int) -> int:
    """Bit-for-bit: every .safetensors in ``ref`` has an identical twin in ``out``; sampled tensors
    of ``out`` equal torch's DCP load. Prints a JSON report; returns the exit code."""
    import torch
    from safetensors import safe_open

    ref_files = sorted(p.name for p in ref.glob("*.safetensors"))
    out_files = sorted(p.name for p in out.glob("*.safetensors"))
    files_equal = ref_files == out_files and all(_sha(out / n) == _sha(ref / n) for n in ref_files)
    index_equal = None
    if (ref / "model.safetensors.index.json").exists():
        a = (ref / "model.safetensors.index.json").read_bytes()
        b = (out / "model.safetensors.index.json").read_bytes() if out_files else b""
        index_equal = a == b
    full = _strip(_load_dcp(dcp_dir))
    names = sorted(full)
    step = max(1, len(names) // n_sample)
    sample = [*names[::step][:n_sample], names[-1]]
    mismatched: list[str] = []
    where: dict[str, str] = {}
    for fname in out_files:
        with safe_open(str(out / fname), "pt") as f:
            for k in f.keys():
                where[k] = fname
    missing = sorted(set(names) - set(where))
    extra = sorted(set(where) - set(names))
    for k in sample:
        if k not in where:
            continue
        with safe_open(str(out / where[k]), "pt") as f:
            t = f.get_tensor(k)
        if t.dtype != full[k].dtype or not torch.equal(t, full[k]):
            mismatched.append(k)
    ok = files_equal and not mismatched and not missing and not extra and index_equal is not False
    print(
        json.dumps(
            {
                "ok": ok,
                "files_identical_to_reference": files_equal,
                "index_identical_to_reference": index_equal,
                "files": out_files,
                "sampled_tensors": len(sample),
                "mismatched": mismatched,
                "missing": missing,
                "extra": extra,
            }
        )
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["nemo", "ram", "consolidate", "check"])
    p.add_argument("src")
    p.add_argument("out", type=Path)
    p.add_argument("extra", nargs="?")
    p.add_argument("--max-shard-size", default="500MB")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fsync", action="store_true")
    p.add_argument("--sample", type=int, default=8)
    a = p.parse_args(argv)
    if a.what == "nemo":
        nemo(a.src, a.out, a.max_shard_size)
    elif a.what == "ram":
        ram(a.src, a.out, a.max_shard_size)
    elif a.what == "consolidate":
        if a.extra is None:
            p.error("consolidate needs MAPPING")
        consolidate(a.src, a.out, a.extra, a.threads)
    else:
        if a.extra is None:
            p.error("check needs REF")
        return check(a.src, a.out, Path(a.extra), a.sample)
    if a.fsync:
        fsync_tree(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
