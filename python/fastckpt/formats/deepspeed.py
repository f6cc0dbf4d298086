"""DeepSpeed ZeRO 1/2/3 checkpoints (OpenRLHF ``_actor/global_stepN/``), read without torch.

A ZeRO tag folder holds, per data-parallel rank ``R`` (model parallel rank 00 only):

* ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``: ``optimizer_state_dict`` with
  ``zero_stage``, ``partition_count`` and the rank's fp32 master weights as flat 1-D tensors, one
  per parameter group: ``single_partition_of_fp32_groups`` (ZeRO 1/2) or ``fp32_flat_groups``
  (ZeRO-3);
* ``mp_rank_00_model_states.pt`` (ZeRO 1/2) or ``zero_pp_rank_R_mp_rank_00_model_states.pt``
  (ZeRO-3): ``param_shapes`` (per group, name -> shape, in flat order), ``buffer_names``,
  ``frozen_param_shapes`` / ``frozen_param_fragments``, ``shared_params`` {alias: canonical} and
  ``module`` (the state dict: full 16-bit weights under ZeRO 1/2, empty placeholders under ZeRO-3,
  real buffers).

fp32 weights are rebuilt as ``deepspeed.utils.zero_to_fp32`` does (``formats/torch-pickles.md``
§6), but as chunks, never materialised:

* **ZeRO 1/2.** Group ``g`` is the concatenation over ranks of ``partition[g]``; parameters lie
  back to back in ``param_shapes[g]`` order, each followed by its ``param_alignment_paddings``
  entry; the group tail is padded to a multiple of ``2 * W`` (checked as DeepSpeed checks it).
* **ZeRO-3.** Each parameter takes ``ceil(numel / W)`` elements of every rank's flat space (the
  groups of one rank concatenated), the last rank's share zero-padded; rank ``r`` holds elements
  ``[r * part, (r + 1) * part)`` of the flattened parameter.
* **Frozen parameters**: ZeRO-2 keeps them whole in ``frozen_param_fragments`` of the model file
  (16-bit); ZeRO-3 keeps a ``part``-sized fragment per rank. ZeRO-1 does not save them in either
  form: they are read from ``module`` (16-bit), which is where they live (``zero_to_fp32`` drops
  them).
* **Buffers** come from ``module`` of rank 0's model file in their stored dtype (``zero_to_fp32``
  casts floating ones to fp32); **aliases** in ``shared_params`` get their canonical tensor's
  chunks.

A contiguous range of a flat partition becomes a handful of boxes of the output tensor (a partial
row, whole rows, a partial row, recursively), each a strided view of the partition's storage, so
the Rust core copies it like any other chunk. Pickles are read by the stubbing restricted
unpickler: DeepSpeed classes (``LossScaler``, ``ZeroStageEnum``, ``fragment_address``) become
inert stubs; nothing is imported or executed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastckpt._core import FormatError
from fastckpt.catalog import Catalogue, Chunk, TensorEntry, TensorMeta
from fastckpt.formats import Format
from fastckpt.formats.dcp import normalise_name
from fastckpt.unpickle import (
    TORCH_TO_ST,
    Stub,
    TensorRef,
    TorchZip,
    load_state_dict_pickle,
    open_fd,
    torch_itemsize,
)

#: per-rank optimizer states (ZeRO >= 1); group 1 is ``bf16_`` or empty
OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
#: per-rank model states (ZeRO-3)
ZERO3_MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
#: the one model-states file of ZeRO 0/1/2 (per model-parallel rank)
MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
#: MoE expert files, which this reader does not assemble
EXPERT_FILE = re.compile(r"^(expp_rank_\d+_|layer_\d+_expert_\d+_).*\.pt$")
#: cap on a data.pkl (real ones are KB to a few MB)
MAX_PICKLE_BYTES = 1 << 30


def _listing(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def is_zero_name(name: str) -> bool:
    """True for a file name DeepSpeed writes into a ZeRO tag folder."""
    return bool(OPTIM_FILE.match(name) or ZERO3_MODEL_FILE.match(name))


def is_zero_dir(path: Path) -> bool:
    """True if ``path`` is a DeepSpeed ZeRO tag folder (has ZeRO optimizer or model files)."""
    return path.is_dir() and any(is_zero_name(n) for n in _listing(path))


# --------------------------------------------------------------------------------------------
# files


@dataclass
class _File:
    """One parsed ``torch.save`` file of the tag folder."""

    path: Path
    obj: dict[Any, Any]
    archive: TorchZip
    stubs: set[str]

    def run(self, ref: Any, what: str) -> _Run:
        """The contiguous run of elements of a tensor (1-D, or C-contiguous N-D)."""
        if not isinstance(ref, TensorRef):
            raise FormatError(f"{self.path}: {what} is not a tensor (got {_kind(ref)})")
        n = math.prod(ref.shape)
        if n > 1 and ref.stride != _c_strides(ref.shape):
            raise FormatError(
                f"{self.path}: {what} is not contiguous (shape {ref.shape}, strides {ref.stride})"
            )
        entry = self.archive.storage(ref.storage)
        item = torch_itemsize(ref.dtype)
        if ref.storage_offset < 0 or (ref.storage_offset + n) * item > entry.size:
            raise FormatError(
                f"{self.path}: {what} (offset {ref.storage_offset}, {n} elements) runs past its "
                f"storage of {entry.size} bytes"
            )
        return _Run(str(self.path), entry.data_offset, entry.size, ref.storage_offset, n, ref.dtype)

    def whole(self, ref: TensorRef, what: str) -> list[Chunk]:
        """One chunk holding a whole tensor (any strides), bounds-checked."""
        entry = self.archive.storage(ref.storage)
        item, size = torch_itemsize(ref.dtype), entry.size
        if math.prod(ref.shape) == 0:
            return []
        pairs = zip(ref.shape, ref.stride, strict=True)
        last = ref.storage_offset + sum((s - 1) * st for s, st in pairs)
        if ref.storage_offset < 0 or min(ref.stride, default=0) < 0 or (last + 1) * item > size:
            raise FormatError(f"{self.path}: {what} runs past its storage of {entry.size} bytes")
        zeros = (0,) * len(ref.shape)
        chunk = Chunk(str(self.path), entry.data_offset, size, ref.storage_offset, ref.stride,
                      zeros, ref.shape)  # fmt: skip
        return [chunk]


def _kind(value: Any) -> str:
    return value.qualname() if isinstance(value, Stub) else type(value).__name__


def _load(path: Path) -> _File:
    try:
        fd = open_fd(str(path))
    except FileNotFoundError:
        raise FormatError(f"{path}: missing file") from None
    try:
        size = os.fstat(fd).st_size
        if os.pread(fd, 1, 0) == b"\x80":
            raise FormatError(
                f"{path}: a legacy (non-zip) torch.save file; re-save it with a current torch"
            )
        archive = TorchZip(str(path), fd, 0, size)
        pkl = archive.entries[archive.prefix + "data.pkl"]
        if pkl.size > MAX_PICKLE_BYTES:
            raise FormatError(f"{path}: data.pkl is implausibly large ({pkl.size} bytes)")
        obj, stubs = load_state_dict_pickle(archive.read(pkl), source=str(path))
    finally:
        os.close(fd)
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: not a DeepSpeed checkpoint (the pickle holds a {_kind(obj)})")
    return _File(path, obj, archive, stubs)


def _get(f: _File, obj: dict[Any, Any], key: str, where: str = "") -> Any:
    if key not in obj:
        raise FormatError(f"{f.path}: no {key!r}{where} (not a DeepSpeed ZeRO checkpoint file?)")
    return obj[key]


def _int(value: Any, f: _File, what: str) -> int:
    """An int, or an ``IntEnum`` stub pickled as ``ZeroStageEnum(value)``."""
    if isinstance(value, Stub):
        args: tuple[Any, ...] = tuple(value.__dict__.get("_args") or ())
        if len(args) == 1 and isinstance(args[0], int):
            return int(args[0])
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise FormatError(f"{f.path}: {what} is {value!r}, expected an integer")


def _shape(value: Any, f: _File, what: str) -> tuple[int, ...]:
    if isinstance(value, tuple | list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        return tuple(int(v) for v in value)
    raise FormatError(f"{f.path}: shape of {what} is {value!r}, expected a torch.Size")


# --------------------------------------------------------------------------------------------
# flat runs -> boxes


@dataclass(frozen=True)
class _Run:
    """``length`` contiguous elements of ``dtype`` from element ``start`` of a storage."""

    path: str
    data_offset: int
    data_len: int
    start: int
    length: int
    dtype: str


class _Flat:
    """A rank's flat space: several runs (parameter groups) back to back."""

    def __init__(self, runs: list[_Run]) -> None:
        self.runs = runs
        self.total = sum(r.length for r in runs)

    def slice(self, offset: int, count: int) -> list[tuple[_Run, int, int]]:
        """``(run, offset in run, count)`` pieces covering ``[offset, offset + count)``."""
        out: list[tuple[_Run, int, int]] = []
        base = 0
        for run in self.runs:
            lo, hi = max(offset, base), min(offset + count, base + run.length)
            if lo < hi:
                out.append((run, lo - base, hi - lo))
            base += run.length
        return out


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def range_boxes(
    shape: tuple[int, ...], start: int, stop: int
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Boxes ``(offsets, sizes)`` exactly covering C-order elements ``[start, stop)`` of
    ``shape``, in order: at most ``2 * ndim - 1`` of them."""
    if start >= stop:
        return []
    if not shape:
        return [((), ())]
    if len(shape) == 1:
        return [((start,), (stop - start,))]
    inner = math.prod(shape[1:])
    rest = shape[1:]
    r0, a = divmod(start, inner)
    r1, b = divmod(stop, inner)
    if r0 == r1:
        return [((r0, *o), (1, *s)) for o, s in range_boxes(rest, a, b)]
    out: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    if a:
        out += [((r0, *o), (1, *s)) for o, s in range_boxes(rest, a, inner)]
        r0 += 1
    if r1 > r0:
        out.append(((r0, *(0,) * len(rest)), (r1 - r0, *rest)))
    if b:
        out += [((r1, *o), (1, *s)) for o, s in range_boxes(rest, 0, b)]
    return out


class _Builder:
    """Collects the chunks of one output tensor from flat pieces."""

    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name = name
        self.shape = shape
        self.strides = _c_strides(shape)
        self.chunks: list[Chunk] = []
        self.dtype: str | None = None
        self.covered = 0

    def add(self, flat_start: int, run: _Run, run_offset: int, count: int) -> None:
        """Place ``count`` elements of ``run`` (from ``run_offset``) at flat ``flat_start``."""
        if self.dtype is None:
            self.dtype = run.dtype
        elif run.dtype != self.dtype:
            raise FormatError(f"{run.path}: pieces of {self.name!r} are {self.dtype} and "
                              f"{run.dtype}")  # fmt: skip
        for offsets, sizes in range_boxes(self.shape, flat_start, flat_start + count):
            lin = sum(o * s for o, s in zip(offsets, self.strides, strict=True))
            self.chunks.append(
                Chunk(run.path, run.data_offset, run.data_len,
                      run.start + run_offset + lin - flat_start, self.strides, offsets, sizes)
            )  # fmt: skip
        self.covered += count


# --------------------------------------------------------------------------------------------
# the tag folder


@dataclass
class _Layout:
    stage: int
    world: int
    optim: list[_File]
    models: list[_File]  # ZeRO 1/2: [mp_rank_00]; ZeRO-3: one per rank


def _optim_files(directory: Path, names: list[str]) -> tuple[dict[int, Path], str]:
    found: dict[int, Path] = {}
    prefixes: set[str] = set()
    for n in names:
        m = OPTIM_FILE.match(n)
        if not m:
            continue
        if int(m.group(3)) != 0:
            raise FormatError(
                f"{directory / n}: model-parallel rank {m.group(3)}: DeepSpeed checkpoints with "
                "tensor or pipeline parallelism (mp_rank > 00) are not supported"
            )
        prefixes.add(m.group(1) or "")
        found[int(m.group(2))] = directory / n
    if len(prefixes) > 1:
        raise FormatError(
            f"{directory}: both bf16_zero_pp_rank_* and zero_pp_rank_* optimizer files "
            "(two saves mixed in one folder?)"
        )
    return found, prefixes.pop() if prefixes else ""


def _read_layout(directory: Path) -> _Layout:
    names = _listing(directory)
    experts = [n for n in names if EXPERT_FILE.match(n)]
    if experts:
        raise FormatError(
            f"{directory / experts[0]}: DeepSpeed MoE expert checkpoints are not supported"
        )
    optim_paths, prefix = _optim_files(directory, names)
    if not optim_paths:
        raise FormatError(
            f"{directory}: no *_optim_states.pt files: not a ZeRO checkpoint (ZeRO-0 saves only "
            "16-bit weights in mp_rank_00_model_states.pt; convert that file directly)"
        )
    first_rank = min(optim_paths)
    first = _load(optim_paths[first_rank])
    osd = _get(first, first.obj, "optimizer_state_dict")
    if not isinstance(osd, dict):
        raise FormatError(f"{first.path}: optimizer_state_dict is a {_kind(osd)}")
    stage = _int(_get(first, osd, "zero_stage", " in optimizer_state_dict"), first, "zero_stage")
    counts = _get(first, osd, "partition_count", " in optimizer_state_dict")
    world = max(_int(c, first, "partition_count") for c in counts) if isinstance(
        counts, list | tuple) else _int(counts, first, "partition_count")  # fmt: skip
    if stage not in (1, 2, 3):
        raise FormatError(f"{first.path}: unsupported ZeRO stage {stage}")
    for r in range(world):
        if r not in optim_paths:
            raise FormatError(
                f"{directory / f'{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt'}: missing "
                f"rank file (partition_count says {world} data-parallel ranks)"
            )
    extra = sorted(r for r in optim_paths if r >= world)
    if extra:
        raise FormatError(
            f"{optim_paths[extra[0]]}: rank {extra[0]} is outside the {world} data-parallel ranks "
            "of partition_count (files of another save mixed in?)"
        )
    optim = [first if r == first_rank else _load(optim_paths[r]) for r in range(world)]
    for f in optim[1:]:
        o = _get(f, f.obj, "optimizer_state_dict")
        if not isinstance(o, dict) or _int(o.get("zero_stage"), f, "zero_stage") != stage:
            raise FormatError(f"{f.path}: ZeRO stage differs from {first.path.name}'s")
    if stage <= 2:
        model_path = directory / "mp_rank_00_model_states.pt"
        if not model_path.is_file():
            raise FormatError(f"{model_path}: missing file (ZeRO-{stage} model states)")
        models = [_load(model_path)]
    else:
        models = []
        for r in range(world):
            path = directory / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
            if not path.is_file():
                raise FormatError(f"{path}: missing rank file (ZeRO-3 model states, {world} ranks)")
            models.append(_load(path))
    return _Layout(stage, world, optim, models)


def _flat_groups(layout: _Layout) -> list[list[_Run]]:
    """Per rank, the fp32 partitions of every parameter group."""
    key = "single_partition_of_fp32_groups" if layout.stage <= 2 else "fp32_flat_groups"
    out = []
    for f in layout.optim:
        groups = _get(f, f.obj["optimizer_state_dict"], key, " in optimizer_state_dict")
        if not isinstance(groups, list | tuple):
            raise FormatError(f"{f.path}: {key} is a {_kind(groups)}, expected a list")
        runs = [f.run(t, f"{key}[{g}]") for g, t in enumerate(groups)]
        out.append(runs)
    n = {len(r) for r in out}
    if len(n) != 1:
        raise FormatError(f"{layout.optim[0].path}: ranks disagree on the number of {key}")
    return out


def _param_shapes(model: _File) -> list[list[tuple[str, tuple[int, ...]]]]:
    groups = _get(model, model.obj, "param_shapes")
    if isinstance(groups, dict):
        groups = [groups]
    if not isinstance(groups, list | tuple):
        raise FormatError(f"{model.path}: param_shapes is a {_kind(groups)}")
    out = []
    for g in groups:
        if not isinstance(g, dict):
            raise FormatError(f"{model.path}: param_shapes group is a {_kind(g)}")
        out.append([(str(k), _shape(v, model, str(k))) for k, v in g.items()])
    return out


Shapes = list[list[tuple[str, tuple[int, ...]]]]


def _zero12(
    layout: _Layout, shapes: Shapes, ranks: list[list[_Run]], builders: dict[str, _Builder]
) -> None:
    """Place ZeRO 1/2 parameters; ``ranks[r][g]`` is rank ``r``'s flat partition of group ``g``
    (the fp32 weights, or any optimizer state with the same layout: ``exp_avg``, ...)."""
    f0 = layout.optim[0]
    if len(ranks[0]) != len(shapes):
        raise FormatError(
            f"{f0.path}: {len(ranks[0])} fp32 partition groups, but param_shapes in "
            f"{layout.models[0].path.name} has {len(shapes)}"
        )
    paddings = f0.obj["optimizer_state_dict"].get("param_alignment_paddings")
    align = 2 * layout.world
    for g, group in enumerate(shapes):
        flat = _Flat([runs[g] for runs in ranks])
        pads = paddings[g] if isinstance(paddings, list | tuple) and g < len(paddings) else None
        if pads is not None and len(pads) != len(group):
            raise FormatError(
                f"{f0.path}: param_alignment_paddings[{g}] has {len(pads)} entries for "
                f"{len(group)} parameters"
            )
        offset = 0
        for i, (name, shape) in enumerate(group):
            n = math.prod(shape)
            if offset + n > flat.total:
                raise FormatError(
                    f"{f0.path}: parameter {name!r} (group {g}, {n} elements at {offset}) runs "
                    f"past the {flat.total} elements of the group's partitions"
                )
            b = builders[name] = _Builder(name, shape)
            pos = 0
            for run, off, count in flat.slice(offset, n):
                b.add(pos, run, off, count)
                pos += count
            offset += n + (_int(pads[i], f0, "a parameter alignment padding") if pads else 0)
        # DeepSpeed's own check: both counts rounded up to 2 * world size
        consumed, avail = -(-offset // align) * align, -(-flat.total // align) * align
        if consumed != avail:
            raise FormatError(
                f"{f0.path}: param_shapes of group {g} consume {offset} elements out of "
                f"{flat.total} (wrong layout: param_shapes and partitions disagree)"
            )


def _zero3_param(b: _Builder, world: int, flats: list[_Flat], offset: int, where: Path) -> int:
    """Place one ZeRO-3 parameter at ``offset`` of every rank's flat space; returns its part."""
    n = math.prod(b.shape)
    part = -(-n // world)
    for r, flat in enumerate(flats):
        count = max(0, min(part, n - r * part))
        if offset + part > flat.total:
            raise FormatError(
                f"{where}: parameter {b.name!r} ({part} elements per rank at {offset}) runs past "
                f"rank {r}'s {flat.total} flat elements"
            )
        pos = r * part
        for run, off, c in flat.slice(offset, count):
            b.add(pos, run, off, c)
            pos += c
    return part


def _zero3(
    layout: _Layout, shapes: Shapes, ranks: list[list[_Run]], builders: dict[str, _Builder]
) -> None:
    """Place ZeRO-3 parameters; ``ranks[r]`` is rank ``r``'s flat groups (fp32 weights or an
    optimizer state with the same layout)."""
    flats = [_Flat(runs) for runs in ranks]
    f0 = layout.optim[0]
    totals = {f.total for f in flats}
    if len(totals) != 1:
        raise FormatError(f"{f0.path}: ranks hold different numbers of flat fp32 elements")
    offset = 0
    for group in shapes:
        for name, shape in group:
            b = builders[name] = _Builder(name, shape)
            offset += _zero3_param(b, layout.world, flats, offset, f0.path)
    if offset != flats[0].total:
        raise FormatError(
            f"{f0.path}: param_shapes consume {offset * layout.world} elements out of "
            f"{flats[0].total * layout.world} (wrong layout: param_shapes and partitions disagree)"
        )


def _frozen(layout: _Layout, builders: dict[str, _Builder]) -> None:
    m0 = layout.models[0]
    shapes = m0.obj.get("frozen_param_shapes")
    if not shapes:
        return
    if not isinstance(shapes, dict):
        raise FormatError(f"{m0.path}: frozen_param_shapes is a {_kind(shapes)}")
    for name, value in shapes.items():
        name = str(name)
        shape = _shape(value, m0, name)
        b = _Builder(name, shape)
        n = math.prod(shape)
        if layout.stage <= 2:
            frags = _get(m0, m0.obj, "frozen_param_fragments")
            run = m0.run(frags.get(name) if isinstance(frags, dict) else None, f"frozen {name!r}")
            if run.length != n:
                raise FormatError(
                    f"{m0.path}: frozen parameter {name!r} has {run.length} elements, its shape "
                    f"{shape} needs {n}"
                )
            b.add(0, run, 0, n)
        else:
            flats = []
            for m in layout.models:
                frags = _get(m, m.obj, "frozen_param_fragments")
                got = frags.get(name) if isinstance(frags, dict) else None
                flats.append(_Flat([m.run(got, f"frozen fragment {name!r}")]))
            part = _zero3_param(b, layout.world, flats, 0, m0.path)
            short = [m.path for m, f in zip(layout.models, flats, strict=True) if f.total != part]
            if short:
                raise FormatError(
                    f"{short[0]}: frozen fragment of {name!r} is not {part} elements long"
                )
        builders[name] = b


def _normalise(key: str) -> str:
    while True:
        name = normalise_name(key)
        if name == key:
            return name
        key = name


def _st_dtype(directory: Path, key: str, dtype: str) -> str:
    st = TORCH_TO_ST.get(dtype)
    if st is None:
        raise FormatError(f"{directory}: tensor {key!r} has dtype {dtype}, which safetensors "
                          "cannot store")  # fmt: skip
    return st


class ZeroReader:
    """Hands out the chunks computed at catalogue time; keeps the parsed rank files (``layout``)
    so that ``--with-optimizer`` does not read and unpickle them again."""

    def __init__(self, chunks: dict[str, tuple[Chunk, ...]], layout: _Layout) -> None:
        self._chunks = chunks
        self.layout = layout

    def locate(self, metas: list[TensorMeta]) -> list[TensorEntry]:
        return [TensorEntry(meta, self._chunks[meta.key]) for meta in metas]


def read_zero_dir(directory: Path) -> Catalogue:
    """Catalogue a DeepSpeed ZeRO 1/2/3 tag folder (fp32 master weights, buffers, aliases)."""
    layout = _read_layout(directory)
    m0 = layout.models[0]
    shapes = _param_shapes(m0)
    builders: dict[str, _Builder] = {}
    if layout.stage <= 2:
        _zero12(layout, shapes, _flat_groups(layout), builders)
    else:
        _zero3(layout, shapes, _flat_groups(layout), builders)
    _frozen(layout, builders)
    notes = [f"DeepSpeed ZeRO-{layout.stage}, {layout.world} data-parallel ranks"]
    module = m0.obj.get("module")
    if not isinstance(module, dict):
        raise FormatError(f"{m0.path}: module is a {_kind(module)}, expected a state dict")
    raw_buffers = m0.obj.get("buffer_names") or []
    buffers = {str(b) for b in raw_buffers} if isinstance(raw_buffers, list | tuple) else set()
    shared_raw = m0.obj.get("shared_params") or {}
    shared = {str(k): str(v) for k, v in shared_raw.items()} if isinstance(
        shared_raw, dict) else {}  # fmt: skip

    tensors: dict[str, tuple[str, tuple[int, ...], tuple[Chunk, ...]]] = {}  # key -> meta parts
    skipped: list[str] = []
    from_module: list[str] = []

    def put_builder(key: str, b: _Builder) -> None:
        n = math.prod(b.shape)
        if b.covered != n:
            raise FormatError(f"{directory}: {key!r} covered {b.covered} of {n} elements")
        dtype = b.dtype or "float32"
        tensors[key] = (dtype, b.shape, tuple(b.chunks))

    order = [str(k) for k in module] + [n for n in builders if n not in module]
    for key in order:
        value = module.get(key)
        if key in builders:
            put_builder(key, builders[key])
        elif key in buffers:
            if not isinstance(value, TensorRef):
                raise FormatError(f"{m0.path}: buffer {key!r} is a {_kind(value)}")
            tensors[key] = (value.dtype, value.shape, tuple(m0.whole(value, f"buffer {key!r}")))
        elif key in shared:
            continue  # placed below, once its canonical tensor is known
        elif layout.stage <= 2 and isinstance(value, TensorRef):
            # ZeRO-1 saves frozen parameters nowhere but here (16-bit)
            tensors[key] = (value.dtype, value.shape, tuple(m0.whole(value, repr(key))))
            from_module.append(key)
        else:
            skipped.append(key)
    for alias, canonical in shared.items():
        if canonical in tensors and alias not in tensors:
            tensors[alias] = tensors[canonical]
    ordered = {k: tensors[k] for k in order if k in tensors}
    ordered.update({k: v for k, v in tensors.items() if k not in ordered})
    if from_module:
        notes.append(
            "not in the fp32 optimizer partitions (frozen under ZeRO-1), read from the 16-bit "
            "module weights: " + ", ".join(from_module)
        )
    if skipped:
        notes.append(
            "no stored values (ZeRO-3 placeholders; saved with exclude_frozen_parameters?): "
            + ", ".join(skipped)
        )

    metas: dict[str, TensorMeta] = {}
    chunks: dict[str, tuple[Chunk, ...]] = {}
    seen: dict[str, str] = {}
    for key, (dtype, shape, cs) in ordered.items():
        st = _st_dtype(directory, key, dtype)
        name = _normalise(key)
        if name in seen:
            raise FormatError(f"{directory}: keys {seen[name]!r} and {key!r} both map to {name!r}")
        seen[name] = key
        metas[name] = TensorMeta(name, key, st, shape, len(cs), True)
        chunks[key] = cs
    stubs = sorted(set().union(*(f.stubs for f in layout.optim + layout.models)))
    if stubs:
        notes.append("inert stand-ins for pickled classes: " + ", ".join(stubs))
    role = directory.parent
    side_dirs = [
        directory,
        role.parent / f"{directory.name.removeprefix('best_')}_hf",
        role,
        role.parent,
    ]
    return Catalogue(
        format="deepspeed",
        path=directory,
        reader=ZeroReader(chunks, layout),
        tensors=metas,
        skipped=skipped,
        side_dirs=side_dirs,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# optimizer state (--with-optimizer)


@dataclass
class ZeroOptimizer:
    """The optimizer state of a ZeRO tag folder, placed like the fp32 weights.

    Attributes:
        entries: ``state.<fqn>.<name>`` tensors (not model tensors), in parameter order.
        param_groups: the base optimizer's ``param_groups`` with ``params`` as FQNs.
        notes: remarks for the report.
    """

    entries: list[TensorEntry]
    param_groups: list[dict[str, Any]]
    notes: list[str]


def _base_state(layout: _Layout, f: _File) -> dict[Any, Any]:
    """The wrapped torch optimizer's ``state_dict()`` of one rank file."""
    osd = f.obj["optimizer_state_dict"]
    key = "base_optimizer_state" if layout.stage <= 2 else "optimizer_state_dict"
    base = _get(f, osd, key, " in optimizer_state_dict")
    if isinstance(base, list | tuple):
        raise FormatError(
            f"{f.path}: {key} is a per-group list (an elastic checkpoint, saved with padding "
            "removed): --with-optimizer reads the default (non-elastic) ZeRO layout"
        )
    if not isinstance(base, dict) or not isinstance(base.get("state"), dict):
        raise FormatError(f"{f.path}: {key} is not a torch optimizer state dict")
    return base


def read_zero_optimizer(directory: Path, layout: _Layout) -> ZeroOptimizer:
    """Consolidate per-parameter optimizer state (``exp_avg``, ``exp_avg_sq``, ``step``, ...).

    Each rank's torch optimizer holds one flat parameter per group (the rank's fp32 partition),
    so every flat state tensor has the partition's layout and is placed by the same functions as
    the fp32 weights; a scalar state (Adam's ``step``) is given to every parameter of its group.
    """
    m0 = layout.models[0]
    shapes = _param_shapes(m0)
    weights = _flat_groups(layout)
    bases = [_base_state(layout, f) for f in layout.optim]
    n_groups = len(weights[0])
    per_rank: list[list[dict[Any, Any]]] = []
    for f, base in zip(layout.optim, bases, strict=True):
        state = base["state"]
        if set(state) != set(range(n_groups)):
            raise FormatError(
                f"{f.path}: optimizer state keys {sorted(state, key=str)} do not match the "
                f"{n_groups} flat parameter groups"
            )
        groups = []
        for g in range(n_groups):
            s = state[g]
            if not isinstance(s, dict):
                raise FormatError(f"{f.path}: optimizer state of group {g} is a {_kind(s)}")
            groups.append(s)
        per_rank.append(groups)
    names = [str(k) for k in per_rank[0][0]]
    flat_names = []
    scalar_names = []
    for sname in names:  # flat (one element per fp32 element; lengths checked below) or 0-d
        value = per_rank[0][0][sname]
        if isinstance(value, TensorRef) and len(value.shape) == 1:
            flat_names.append(sname)
        elif isinstance(value, TensorRef) and math.prod(value.shape) == 1:
            scalar_names.append(sname)
    placed: dict[str, dict[str, _Builder]] = {}
    for sname in flat_names:
        ranks = []
        for f, groups, wruns in zip(layout.optim, per_rank, weights, strict=True):
            runs = []
            for g, s in enumerate(groups):
                run = f.run(s.get(sname), f"optimizer state {sname!r} of group {g}")
                pads = f.obj["optimizer_state_dict"].get("group_paddings")
                pad = pads[g] if isinstance(pads, list | tuple) and g < len(pads) else 0
                if isinstance(pad, int) and pad > 0 and run.length == wruns[g].length + pad:
                    # the BF16 optimizer saves the last rank's fp32 partition without the
                    # group's alignment padding, but its state with it: drop the padded tail
                    run = dataclasses.replace(run, length=wruns[g].length)
                if run.length != wruns[g].length:
                    raise FormatError(
                        f"{f.path}: optimizer state {sname!r} of group {g} has {run.length} "
                        f"elements, the fp32 partition {wruns[g].length}"
                    )
                runs.append(run)
            ranks.append(runs)
        builders: dict[str, _Builder] = {}
        if layout.stage <= 2:
            _zero12(layout, shapes, ranks, builders)
        else:
            _zero3(layout, shapes, ranks, builders)
        placed[sname] = builders
    # the group of each parameter (ZeRO-3 sub-groups: one per group unless sub_group_size splits)
    group_of: dict[str, int] = {}
    for g, group in enumerate(shapes):
        for name, _ in group:
            group_of[name] = g if len(shapes) == n_groups else 0
    f0 = layout.optim[0]
    scalars: dict[str, list[tuple[str, tuple[int, ...], tuple[Chunk, ...]]]] = {}
    for sname in scalar_names:
        vals = []
        for g, s in enumerate(per_rank[0]):
            ref = s.get(sname)
            if not isinstance(ref, TensorRef):
                raise FormatError(f"{f0.path}: optimizer state {sname!r} of group {g} is missing")
            vals.append((ref.dtype, ref.shape, tuple(f0.whole(ref, f"{sname!r} of group {g}"))))
        scalars[sname] = vals
    if len(shapes) != n_groups and scalar_names:
        raise FormatError(
            f"{f0.path}: {n_groups} optimizer sub-groups for {len(shapes)} parameter groups: "
            "per-group scalar state cannot be assigned to parameters"
        )
    tensors: dict[str, tuple[str, tuple[int, ...], tuple[Chunk, ...]]] = {}
    for group in shapes:
        for name, shape in group:
            fqn = _normalise(name)
            for sname in names:
                if sname in placed:
                    b = placed[sname][name]
                    if b.covered != math.prod(shape):
                        raise FormatError(f"{directory}: {sname} of {name!r} is incomplete")
                    tensors[f"state.{fqn}.{sname}"] = (b.dtype or "float32", shape, tuple(b.chunks))
                elif sname in scalars:
                    tensors[f"state.{fqn}.{sname}"] = scalars[sname][group_of[name]]
    param_groups = []
    raw_groups = bases[0].get("param_groups")
    for g, pg in enumerate(raw_groups if isinstance(raw_groups, list) else []):
        if not isinstance(pg, dict):
            continue
        out = {str(k): v for k, v in pg.items() if k != "params"}
        out["params"] = [_normalise(n) for n, _ in shapes[g]] if len(shapes) == n_groups else []
        param_groups.append(out)
    skipped = sorted(set(names) - set(flat_names) - set(scalar_names))
    notes = [f"optimizer state from the {layout.world} ZeRO-{layout.stage} rank partitions"]
    if skipped:
        notes.append("optimizer state left out (not a flat partition or a scalar): " +
                     ", ".join(skipped))  # fmt: skip
    entries = []
    for name, (dtype, shape, cs) in tensors.items():
        meta = TensorMeta(name, name, _st_dtype(directory, name, dtype), shape, len(cs), False)
        entries.append(TensorEntry(meta, cs))
    return ZeroOptimizer(entries, param_groups, notes)


def _sniff(path: Path) -> bool:
    if path.is_file():  # one file of a ZeRO tag folder: the whole folder is read
        return is_zero_name(path.name) or bool(
            MODEL_FILE.match(path.name) and is_zero_dir(path.parent)
        )
    return is_zero_dir(path)


def _open(path: Path) -> Catalogue:
    return read_zero_dir(path.parent if path.is_file() else path)


FORMAT = Format("deepspeed", sniff=_sniff, open=_open, what="ZeRO *_optim_states.pt files")
