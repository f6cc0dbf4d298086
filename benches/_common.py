"""Shared helpers for the benchmark scripts: model shapes, shard splitting, cache paths.

Nothing here imports torch, so the timing harness stays light.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

BENCHES = Path(__file__).resolve().parent
REPO = BENCHES.parent
DEFAULT_OUT = REPO / "bench-data"


@dataclass(frozen=True)
class ModelShape:
    """A Llama-shaped bf16 model (norms included), as a training state dict holds it."""

    hidden: int
    layers: int
    vocab: int
    ffn: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(HF name, global shape) in ``LlamaForCausalLM.state_dict()`` order."""
        h, f = self.hidden, self.ffn
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (h, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (f, h)),
                (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def nbytes(self) -> int:
        """Tensor bytes (bf16)."""
        total = 0
        for _, shape in self.tensors():
            n = 2
            for d in shape:
                n *= d
            total += n
        return total


SIZES: dict[str, ModelShape] = {
    # CI smoke: ~137 MB
    "S": ModelShape(hidden=1024, layers=4, vocab=8192, ffn=2816),
    # the PERFORMANCE.md anchor model: 165 tensors, 2,083,672,064 bytes
    "M": ModelShape(hidden=2048, layers=18, vocab=32000, ffn=5504),
}

STRIDED_SUFFIXES = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def is_strided(name: str) -> bool:
    """Whether ``--shard1`` saves this tensor as ``Shard(1)`` (RowParallel-like)."""
    return name.endswith(STRIDED_SUFFIXES)


def parse_size(text: str) -> int:
    """Decimal size string (``500MB``) or plain bytes -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    for unit in ("KB", "MB", "GB", "TB", "B"):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * units[unit])
    return int(t)


def split_shards(sizes: list[int], limit: int) -> list[list[int]]:
    """huggingface_hub's greedy splitter (formats/hf-output.md section 3): indices per shard."""
    shards: list[list[int]] = []
    current: list[int] = []
    current_size = 0
    for i, size in enumerate(sizes):
        if size > limit:
            shards.append([i])
            continue
        if current and current_size + size > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(i)
        current_size += size
    if current:
        shards.append(current)
    return shards


def shard_file_name(i: int, n: int) -> str:
    """Output file name of shard ``i`` (0-based) out of ``n``."""
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def data_dir(out: Path, shape: ModelShape, world: int, shard1: bool, seed: int) -> Path:
    """Cache directory for one parameter set."""
    tag = f"llama-h{shape.hidden}-l{shape.layers}-v{shape.vocab}-f{shape.ffn}-w{world}-seed{seed}"
    if shard1:
        tag += "-shard1"
    return out / tag


@dataclass
class DataSet:
    """A generated checkpoint: the DCP folder and, optionally, its HF-writer twin."""

    root: Path
    dcp: Path
    hf_twin: Path | None
    shape: ModelShape
    world: int
    shard1: bool
    nbytes: int
    n_tensors: int

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def load_manifest(root: Path) -> dict[str, object] | None:
    """The ``DONE.json`` written after a complete generation, or None."""
    p = root / "DONE.json"
    if not p.is_file():
        return None
    with open(p) as f:
        result: dict[str, object] = json.load(f)
    return result


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """fsync every regular file under ``path`` (or ``path`` itself), then the directories."""
    p = Path(path)
    files = [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()]
    dirs = [] if p.is_file() else [p, *[q for q in p.rglob("*") if q.is_dir()]]
    for q in files:
        fd = os.open(q, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for q in dirs:
        fd = os.open(q, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


if __name__ == "__main__":  # pragma: no cover - tiny CLI for the fsync peer step
    if len(sys.argv) == 3 and sys.argv[1] == "fsync":
        fsync_tree(sys.argv[2])
    else:
        sys.exit("usage: _common.py fsync PATH")
