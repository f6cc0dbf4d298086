"""PyTorch Distributed Checkpoint (DCP) directories: ``.metadata`` + ``__R_N.distcp``.

``.metadata`` is unpickled with the restricted unpickler; each chunk's bytes are located inside its
``.distcp`` item (a whole ``torch.save`` zip) from the item's central directory and ``data.pkl``.
No tensor data is read here. Format facts: ``shared/formats/dcp.md``.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from fastckpt._core import FormatError, ShapeError
from fastckpt.catalog import Catalogue, Chunk, TensorEntry, TensorMeta
from fastckpt.formats import Format
from fastckpt.safeio import plain_name, read_regular, short
from fastckpt.unpickle import (
    METADATA_GLOBALS,
    TORCH_TO_ST,
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorRef,
    TensorStorageMetadata,
    TorchZip,
    open_fd,
    restricted_loads,
)

#: size cap for a ``.metadata`` pickle (real ones are KB to a few MB; Megatron's can be larger)
MAX_METADATA_BYTES = 2_000_000_000

#: wrappers around the model state dict, as planner_data path prefixes, best first
MODEL_WRAPPERS: tuple[tuple[str, ...], ...] = (
    ("model",),  # NeMo RL, torchtitan, plain {"model": sd}
    ("fsdp_checkpoint", "model"),  # RLinf
    ("app", "model"),  # prime-rl
    ("state_dict",),
    ("module",),
)

#: top-level groups that trainers save beside the model (torchtitan, accelerate, NeMo, ...): never
#: model weights, whatever the wrapper
TRAINER_GROUPS = frozenset(
    {"optimizer", "optimizers", "optim", "optim_state", "optimizer_state", "lr_scheduler",
     "lr_schedulers", "scheduler", "schedulers", "train_state", "trainer_state", "dataloader",
     "data_loader", "dataloaders", "rng", "rng_state", "rng_states", "extra_state", "grad_scaler",
     "scaler", "ema"}
)  # fmt: skip

#: module-wrapper name components that never belong in a Hugging Face name
_WRAPPER_PARTS = re.compile(
    r"(?:^|(?<=\.))(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\."
)

_RANK_METADATA = re.compile(r"^__\d+\.metadata$")
#: accelerate ``save_state()``: the model DCP, and its optimizer's beside it
ACCELERATE_MODEL = re.compile(r"^pytorch_model_fsdp_(\d+)$")


def accelerate_model_dir(path: Path) -> Path | None:
    """The model DCP of an accelerate ``save_state()`` folder (``pytorch_model_fsdp_0/``)."""
    model = path / "pytorch_model_fsdp_0"
    return model if path.is_dir() and is_dcp_dir(model) else None


def is_dcp_dir(path: Path) -> bool:
    """True if ``path`` looks like a DCP directory (complete or not)."""
    if not path.is_dir():
        return False
    if (path / ".metadata").is_file():
        return True
    return any(name.endswith(".distcp") or _RANK_METADATA.match(name) for name in os.listdir(path))


def _load_metadata_file(path: Path) -> Metadata:
    size = path.stat().st_size
    if size > MAX_METADATA_BYTES:
        raise FormatError(f"{path}: metadata file is implausibly large ({size} bytes)")
    data = read_regular(path, limit=MAX_METADATA_BYTES)  # a FIFO or device is refused, not read
    md = restricted_loads(data, allowed=METADATA_GLOBALS, source=str(path))
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise FormatError(f"{path}: not a DCP metadata file (got {type(md).__name__})")
    if md.storage_data is None:
        raise FormatError(f"{path}: metadata has no storage_data")
    check_metadata(md, path)
    return md


def _ints(value: Any, n: int | None = None) -> bool:
    return (
        isinstance(value, tuple | list)
        and (n is None or len(value) == n)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


def check_metadata(md: Metadata, path: Path) -> None:
    """Refuse DCP metadata whose records lack fields or hold values of the wrong type, naming
    the entry (the readers then rely on every field they use)."""

    def bad(entry: Any, what: str) -> FormatError:
        return FormatError(f"{path}: entry {short(entry)}: {what}")

    if not isinstance(md.storage_data, dict):
        raise FormatError(f"{path}: storage_data is not a dict")
    if md.planner_data is not None and not isinstance(md.planner_data, dict):
        raise FormatError(f"{path}: planner_data is not a dict")
    for fqn, item in md.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise bad(fqn, "key is not a string")
        if isinstance(item, TensorStorageMetadata):
            d = item.__dict__
            if not _ints(d.get("size")):
                raise bad(fqn, "missing or invalid size")
            props = d.get("properties")
            if not isinstance(getattr(props, "__dict__", {}).get("dtype"), str):
                raise bad(fqn, "missing or invalid properties (dtype)")
            chunks = d.get("chunks")
            if not isinstance(chunks, list):
                raise bad(fqn, "missing or invalid chunks")
            rank = len(d["size"])
            for c in chunks:
                cd = getattr(c, "__dict__", {})
                if not (_ints(cd.get("offsets"), rank) and _ints(cd.get("sizes"), rank)):
                    raise bad(fqn, "a chunk without valid offsets and sizes")
        planned = (md.planner_data or {}).get(fqn)
        if isinstance(planned, tuple | list) and not all(isinstance(p, str | int) for p in planned):
            raise bad(fqn, "invalid planner_data path")
    for idx, info in md.storage_data.items():
        if not isinstance(idx, MetadataIndex) or not isinstance(idx.fqn, str):
            raise FormatError(f"{path}: storage_data key {short(idx)} is not a MetadataIndex")
        if idx.offset is not None and not _ints(idx.offset):
            raise bad(idx.fqn, "storage_data key with an invalid offset")
        d = getattr(info, "__dict__", {})
        if not (
            isinstance(d.get("relative_path"), str) and _ints((d.get("offset"), d.get("length")))
        ):
            raise bad(idx.fqn, "storage_data record without a valid relative_path/offset/length")
        transforms = d.get("transform_descriptors")
        if transforms is not None and not (
            isinstance(transforms, list | tuple) and all(isinstance(t, str) for t in transforms)
        ):
            raise bad(idx.fqn, "invalid transform_descriptors")


def _merge_rank_metadata(paths: list[Path]) -> Metadata:
    """Merge per-rank ``__R.metadata`` files (``use_collectives=False``): chunks deduplicated."""
    merged = Metadata()
    merged.state_dict_metadata = {}
    merged.storage_data = {}
    merged.planner_data = {}
    for path in paths:
        md = _load_metadata_file(path)
        for fqn, item in md.state_dict_metadata.items():
            have = merged.state_dict_metadata.get(fqn)
            if have is None:
                if isinstance(item, TensorStorageMetadata):
                    copy = TensorStorageMetadata()
                    copy.__dict__.update(item.__dict__)
                    copy.chunks = list(item.chunks)
                    item = copy
                merged.state_dict_metadata[fqn] = item
            elif isinstance(have, TensorStorageMetadata):
                if not isinstance(item, TensorStorageMetadata) or tuple(item.size) != tuple(
                    have.size
                ):
                    raise FormatError(f"{path}: entry {fqn!r} disagrees with another rank's")
                seen = {tuple(c.offsets) for c in have.chunks}
                for chunk in item.chunks:
                    if tuple(chunk.offsets) not in seen:
                        seen.add(tuple(chunk.offsets))
                        have.chunks.append(chunk)
        merged.storage_data.update(md.storage_data)
        if md.planner_data:
            merged.planner_data.update(md.planner_data)
    return merged


def load_metadata(directory: Path) -> Metadata:
    """Load ``.metadata`` (or merge ``__R.metadata`` files); say so when the save is unfinished."""
    global_md = directory / ".metadata"
    if global_md.is_file():
        return _load_metadata_file(global_md)
    per_rank = sorted(p for p in directory.iterdir() if _RANK_METADATA.match(p.name))
    if per_rank:
        return _merge_rank_metadata(per_rank)
    tmp = " (.metadata.tmp exists)" if (directory / ".metadata.tmp").exists() else ""
    raise FormatError(
        f"{directory}: no .metadata file{tmp}: the DCP save did not finish (rank 0 writes "
        ".metadata last), so this checkpoint is incomplete"
    )


#: what to do with a checkpoint whose items went through stream transforms
_DECOMPRESS_HINT = (
    "let torch undo the transforms first (python -m torch.distributed.checkpoint.format_utils "
    "dcp_to_torch SRC full.pt), then convert full.pt"
)


def describe_transforms(descriptors: Any) -> str:
    """Name the stream transforms of a ``_StorageInfo`` (``['stream.zstd/1']``) for a message."""
    descs = [str(d) for d in descriptors]
    known = {"stream.zstd": "ZStandard-compressed"}
    kinds = [known.get(d.split("/", 1)[0].split("@", 1)[0], "") for d in descs]
    if all(kinds) and len(set(kinds)) == 1:
        what = f"{kinds[0]} (DCP transform {', '.join(descs)}, written by FileSystemWriter("
        return what + "_extensions=[ZStandard()]))"
    return f"stored through DCP stream transforms {descs}"


def normalise_name(name: str) -> str:
    """Drop module-wrapper components (``_fsdp_wrapped_module.``, ``_orig_mod.``, ``module.``)."""
    name = _WRAPPER_PARTS.sub("", name)
    return name.removeprefix("module.")


def _paths(md: Metadata) -> dict[str, tuple[Any, ...]]:
    planner = md.planner_data or {}
    out: dict[str, tuple[Any, ...]] = {}
    for fqn in md.state_dict_metadata:
        path = planner.get(fqn)
        out[fqn] = tuple(path) if isinstance(path, tuple | list) and path else (fqn,)
    return out


def _under(path: tuple[Any, ...], wrapper: tuple[Any, ...]) -> bool:
    return len(path) > len(wrapper) and path[: len(wrapper)] == wrapper


def _choose_wrapper(
    paths: dict[str, tuple[Any, ...]], tensor_keys: list[str]
) -> tuple[tuple[Any, ...], str | None]:
    """The planner-data prefix that holds the model state dict (stripped exactly once), and,
    when that cannot be told, why (then no entry is taken as a model weight)."""
    tensor_paths = [paths[k] for k in tensor_keys]
    for wrapper in MODEL_WRAPPERS:
        if any(_under(p, wrapper) for p in tensor_paths):
            return wrapper, None
    # the model at the top level (torchtitan: dotted keys beside optimizer/lr_scheduler/...)
    others = [p for p in tensor_paths if str(p[0]) not in TRAINER_GROUPS]
    if all(len(p) == 1 for p in others) and others:
        return (), None
    # an unknown wrapper ending in "model" (e.g. ("trainer", "model")), if there is one
    ending_in_model = {p[: i + 1] for p in others for i in range(len(p) - 1) if p[i] == "model"}
    if len(ending_in_model) == 1:
        return ending_in_model.pop(), None
    groups = sorted({str(p[0]) for p in tensor_paths if len(p) > 1})
    shown = ", ".join(groups[:12]) + (", ..." if len(groups) > 12 else "")
    flat = sum(len(p) == 1 for p in tensor_paths)
    if flat:
        shown += f" and {flat} top-level tensors"
    return (), (
        f"cannot tell which entries hold the model weights (groups: {shown}); pick them by name "
        "with include= / --include REGEX (and exclude= / --exclude REGEX)"
    )


def read_dcp(directory: Path) -> Catalogue:
    """Catalogue a DCP directory from its metadata alone (no item is opened)."""
    md = load_metadata(directory)
    paths = _paths(md)
    tensor_keys = [
        k for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
    ]
    wrapper, undecided = _choose_wrapper(paths, tensor_keys)
    tensors: dict[str, TensorMeta] = {}
    skipped: list[str] = []
    model_keys: dict[str, str] = {}
    for key, item in md.state_dict_metadata.items():
        if isinstance(item, BytesStorageMetadata) or not isinstance(item, TensorStorageMetadata):
            skipped.append(key)
            continue
        path = paths[key]
        is_model = (
            undecided is None
            and _under(path, wrapper)
            and (bool(wrapper) or str(path[0]) not in TRAINER_GROUPS)
        )
        torch_dtype = str(item.properties.dtype)
        st_dtype = TORCH_TO_ST.get(torch_dtype)
        if st_dtype is None:
            if is_model:
                raise FormatError(
                    f"{directory}: tensor {key!r} has dtype {torch_dtype}, which safetensors "
                    "cannot store"
                )
            skipped.append(key)
            continue
        name = normalise_name(".".join(str(p) for p in path[len(wrapper) :])) if is_model else key
        if is_model:
            if "_flat_param" in name:
                raise FormatError(
                    f"{directory}: tensor {key!r} is an FSDP1 flat parameter (LOCAL_STATE_DICT); "
                    "flat parameters have no per-tensor shapes and cannot be converted: save with "
                    "SHARDED_STATE_DICT or FSDP2"
                )
            if name in model_keys:
                raise FormatError(
                    f"{directory}: keys {model_keys[name]!r} and {key!r} both map to {name!r}"
                )
            model_keys[name] = key
        elif name in tensors:  # a non-model key equal to a model name: keep the model one
            name = "__" + key
        tensors[name] = TensorMeta(
            name=name,
            key=key,
            dtype=st_dtype,
            shape=tuple(int(s) for s in item.size),
            n_chunks=len(item.chunks),
            is_model=is_model,
        )
    parent = directory.parent
    side_dirs = [
        directory,
        directory / "huggingface",
        directory / "hf",
        parent / "huggingface",
        parent / "hf",
        parent / "tokenizer",
        parent,
    ]
    notes = []
    if wrapper:
        notes.append(f"model weights under {'.'.join(map(str, wrapper))}.")
    transforms = sorted(
        {str(d) for info in md.storage_data.values() for d in info.transform_descriptors or ()}
    )
    if transforms:
        notes.append(
            f"items are {describe_transforms(transforms)}: tensors cannot be read; "
            f"{_DECOMPRESS_HINT}."
        )
    accelerate = ACCELERATE_MODEL.match(directory.name)
    optimizer_dir = parent / f"optimizer_{accelerate.group(1)}" if accelerate else None
    return Catalogue(
        format="dcp",
        path=directory,
        reader=DcpReader(directory, md),
        tensors=tensors,
        skipped=skipped,
        side_dirs=side_dirs,
        notes=notes,
        undecided=undecided,
        optimizer_dir=optimizer_dir if optimizer_dir and is_dcp_dir(optimizer_dir) else None,
    )


class DcpReader:
    """Locates the chunks of DCP tensors inside their ``.distcp`` items."""

    def __init__(self, directory: Path, md: Metadata) -> None:
        self.directory = directory
        self.md = md

    def locate(self, metas: list[TensorMeta]) -> list[TensorEntry]:
        # (file, item offset, item length, fqn, chunk metadata) grouped by file
        by_file: dict[str, list[tuple[int, int, TensorMeta, Any]]] = defaultdict(list)
        found: dict[tuple[str, tuple[int, ...]], Chunk] = {}
        for meta in metas:
            item = self.md.state_dict_metadata[meta.key]
            for chunk in item.chunks:
                sizes = tuple(int(s) for s in chunk.sizes)
                if 0 in sizes:
                    continue  # zero-size chunks (uneven DTensor tails) hold nothing
                info = self.md.storage_data.get(MetadataIndex(meta.key, tuple(chunk.offsets)))
                if info is None:
                    raise FormatError(
                        f"{self.directory}: no storage entry for tensor {meta.key!r} chunk at "
                        f"{tuple(chunk.offsets)}"
                    )
                rel = plain_name(
                    info.relative_path,
                    where=f"{self.directory / '.metadata'}: tensor {meta.key!r}",
                )
                if info.transform_descriptors:
                    raise FormatError(
                        f"{self.directory / rel}: tensor {meta.key!r} is "
                        f"{describe_transforms(info.transform_descriptors)}; fastckpt copies "
                        "tensor bytes straight from uncompressed DCP items and cannot read it: "
                        f"{_DECOMPRESS_HINT}"
                    )
                by_file[rel].append((int(info.offset), int(info.length), meta, chunk))
        for rel, items in by_file.items():
            path = self.directory / rel
            fd = self._open(path, items[0][2])
            try:
                size = os.fstat(fd).st_size
                for offset, length, meta, chunk in items:
                    found[(meta.key, tuple(chunk.offsets))] = self._chunk(
                        path, fd, size, offset, length, meta, chunk
                    )
            finally:
                os.close(fd)
        out = []
        for meta in metas:
            item = self.md.state_dict_metadata[meta.key]
            chunks = tuple(
                found[(meta.key, tuple(c.offsets))]
                for c in item.chunks
                if (meta.key, tuple(c.offsets)) in found
            )
            out.append(TensorEntry(meta, chunks))
        return out

    def _open(self, path: Path, meta: TensorMeta) -> int:
        try:
            return open_fd(str(path))
        except FileNotFoundError:
            raise FormatError(
                f"{path}: missing data file (needed for tensor {meta.key!r})"
            ) from None

    def _chunk(
        self, path: Path, fd: int, size: int, offset: int, length: int, meta: TensorMeta, chunk: Any
    ) -> Chunk:
        where = f"tensor {meta.key!r}"
        if offset < 0 or length < 0 or offset + length > size:
            raise FormatError(
                f"{path}: {where} needs bytes [{offset}, {offset + length}) but the file has "
                f"{size} bytes (truncated?)"
            )
        try:
            archive = TorchZip(str(path), fd, offset, length)
            ref = archive.load_pickle()
            if not isinstance(ref, TensorRef):
                raise FormatError(f"{path}: item at byte {offset} is not a tensor")
            entry = archive.storage(ref.storage)
        except FormatError as exc:
            raise FormatError(f"{exc} ({where})") from None
        sizes = tuple(int(s) for s in chunk.sizes)
        if ref.shape != sizes:
            raise ShapeError(
                f"{path}: {where} chunk at {tuple(chunk.offsets)} stores shape {ref.shape}, "
                f"metadata says {sizes}"
            )
        st = TORCH_TO_ST.get(ref.dtype)
        if st != meta.dtype:
            raise FormatError(
                f"{path}: {where} is stored as {ref.dtype}, metadata says {meta.dtype}"
            )
        return Chunk(
            path=str(path),
            data_offset=entry.data_offset,
            data_len=entry.size,
            storage_offset=ref.storage_offset,
            strides=ref.stride,
            offsets=tuple(int(o) for o in chunk.offsets),
            sizes=sizes,
        )


def _sniff(path: Path) -> bool:
    if path.is_file():
        return path.name == ".metadata"
    return is_dcp_dir(path) or accelerate_model_dir(path) is not None


def _open(path: Path) -> Catalogue:
    accelerate = accelerate_model_dir(path)
    if accelerate is not None:  # an accelerate save_state() folder
        cat = read_dcp(accelerate)
        cat.side_dirs += [path, path.parent]
        cat.notes.append(f"accelerate save_state() folder: model from {accelerate.name}/")
        return cat
    return read_dcp(path.parent if path.is_file() else path)


FORMAT = Format("dcp", sniff=_sniff, open=_open, what=".metadata/.distcp files")
