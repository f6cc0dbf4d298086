"""Megatron ``torch_dist`` saves: a DCP folder plus ``metadata.json``.

``args`` come from ``common.pt`` (or, megatron-core >= 0.19, the DCP item
``common_state/shard_0_1``); the DCP reader locates the global chunks; the stacked layer (and
expert) axes are exploded into per-layer boxes, giving the canonical form of
:mod:`fastckpt.formats.megatron.canon`.
"""

from __future__ import annotations

from pathlib import Path

from fastckpt._core import FormatError
from fastckpt.catalog import Chunk
from fastckpt.formats.dcp import load_metadata, read_dcp
from fastckpt.formats.megatron.canon import _LAYER, Canon, _canonical
from fastckpt.formats.megatron.layout import Args, _load_zip
from fastckpt.safeio import item_path
from fastckpt.unpickle import MetadataIndex


def _dist_args(directory: Path) -> Args:
    common = directory / "common.pt"
    if common.is_file():
        f = _load_zip(common)
        obj = f.obj
        source = str(common)
    else:  # megatron-core >= 0.19: BYTE_IO item common_state/shard_0_1 = torch.save([common])
        md = load_metadata(directory)
        info = None
        for idx, value in (md.storage_data or {}).items():
            if isinstance(idx, MetadataIndex) and idx.fqn == "common_state/shard_0_1":
                info = value
        if info is None:
            raise FormatError(f"{directory}: neither common.pt nor a common_state item (no args)")
        where = f"{directory / '.metadata'}: entry common_state/shard_0_1"
        path = item_path(directory, info.relative_path, where=where)
        f = _load_zip(path, int(info.offset), int(info.length))
        obj = f.obj[0] if isinstance(f.obj, list) and f.obj else f.obj
        source = f"{path} (common_state)"
    if not isinstance(obj, dict) or "args" not in obj:
        raise FormatError(f"{source}: no 'args' in the common state (Megatron-Bridge save?)")
    version = obj.get("checkpoint_version", 3.0)
    if isinstance(version, int | float) and version < 3:
        raise FormatError(f"{source}: checkpoint_version {version} < 3.0 is not supported")
    return Args(obj["args"], source)


def _explode(c: Chunk, axes: int) -> list[tuple[tuple[int, ...], Chunk]]:
    """Split a box along its ``axes`` leading (stacked) axes: ``(indices, box)`` pairs."""
    out: list[tuple[tuple[int, ...], Chunk]] = [((), c)]
    for _ in range(axes):
        nxt = []
        for idx, b in out:
            for k in range(b.sizes[0]):
                nxt.append(
                    (
                        (*idx, b.offsets[0] + k),
                        b._replace(
                            storage_offset=b.storage_offset + k * b.strides[0],
                            strides=tuple(b.strides[1:]),
                            offsets=b.offsets[1:],
                            sizes=b.sizes[1:],
                        ),
                    )
                )
        out = nxt
    return out


_SKIP_DIST = ("optimizer.", "rng_state", "common_state")


def _read_dist(directory: Path) -> tuple[Args, dict[str, Canon], list[str]]:
    args = _dist_args(directory)
    cat = read_dcp(directory)
    keys = [
        m
        for m in cat.tensors.values()
        if not m.key.startswith(_SKIP_DIST) and "_extra_state" not in m.key
    ]
    entries = cat.reader.locate(keys)
    canon: dict[str, Canon] = {}

    def add(name: str, dtype: str, shape: tuple[int, ...], chunk: Chunk, key: str) -> None:
        cname = _canonical(name)
        if cname is None:
            return
        got = canon.get(cname)
        if got is None:
            got = canon[cname] = Canon(cname, dtype, shape, [], f"{directory} ({key})")
        got.chunks.append(chunk)

    for entry in entries:
        key, shape, dtype = entry.meta.key, entry.meta.shape, entry.meta.dtype
        m = _LAYER.match(key)
        if key.startswith("decoder.layers.") and not m:
            rest = key[len("decoder.layers.") :]
            if rest.startswith("mlp.experts.experts."):
                tail = rest[len("mlp.experts.experts.") :]
                for (layer, e), c in (x for ch in entry.chunks for x in _explode(ch, 2)):
                    name = f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{tail}"
                    add(name, dtype, shape[2:], c, key)
            else:
                for (layer,), c in (x for ch in entry.chunks for x in _explode(ch, 1)):
                    add(f"decoder.layers.{layer}.{rest}", dtype, shape[1:], c, key)
        elif m and m.group(2).startswith("mlp.experts.experts."):
            tail = m.group(2)[len("mlp.experts.experts.") :]
            for (e,), c in (x for ch in entry.chunks for x in _explode(ch, 1)):
                name = f"decoder.layers.{m.group(1)}.mlp.experts.local_experts.{e}.{tail}"
                add(name, dtype, shape[1:], c, key)
        else:
            for c in entry.chunks:
                add(key, dtype, shape, c, key)
    notes = [f"Megatron torch_dist checkpoint ({len(entries)} sharded tensors)"]
    return args, canon, notes
