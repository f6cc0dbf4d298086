"""The tag folder as a whole: which rank files it has, the ZeRO stage and data-parallel world
size, each rank's flat fp32 partitions and the model file's ``param_shapes``, all checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastckpt._core import FormatError
from fastckpt.formats.deepspeed.files import (
    EXPERT_FILE,
    OPTIM_FILE,
    _File,
    _get,
    _int,
    _kind,
    _load,
    _Run,
    _shape,
)
from fastckpt.safeio import listing

#: per parameter group, ``(name, shape)`` in flat order (``param_shapes`` of the model file)
Shapes = list[list[tuple[str, tuple[int, ...]]]]


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
    names = listing(directory)
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


def _param_shapes(model: _File) -> Shapes:
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
