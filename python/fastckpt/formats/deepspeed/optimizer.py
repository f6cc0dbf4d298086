"""The optimizer state of a ZeRO tag folder (``--with-optimizer``): :func:`read_zero_optimizer`.

Each rank's torch optimizer holds one flat parameter per group (the rank's fp32 partition), so a
flat state tensor (``exp_avg``, ``exp_avg_sq``) is placed by the same functions as the fp32
weights (:mod:`.placement`); a scalar state (Adam's ``step``) is given to every parameter of its
group. The rank files are those already parsed for the weights (``ZeroReader.layout``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastckpt._core import FormatError
from fastckpt.catalog import TensorEntry, TensorMeta
from fastckpt.formats.deepspeed.files import _File, _get, _kind, _Run
from fastckpt.formats.deepspeed.layout import Shapes, _flat_groups, _Layout, _param_shapes
from fastckpt.formats.deepspeed.model import _normalise, _Parts, _st_dtype, _Tensors
from fastckpt.formats.deepspeed.placement import _Builder, _zero3, _zero12
from fastckpt.unpickle import TensorRef


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
    per_rank = [
        _group_states(f, base, n_groups) for f, base in zip(layout.optim, bases, strict=True)
    ]
    names = [str(k) for k in per_rank[0][0]]
    flat_names, scalar_names = _state_kinds(per_rank[0][0], names)
    placed = {sname: _place_flat(layout, shapes, weights, per_rank, sname) for sname in flat_names}
    f0 = layout.optim[0]
    scalars = _scalars(f0, per_rank[0], scalar_names)
    if len(shapes) != n_groups and scalar_names:
        raise FormatError(
            f"{f0.path}: {n_groups} optimizer sub-groups for {len(shapes)} parameter groups: "
            "per-group scalar state cannot be assigned to parameters"
        )
    tensors = _state_tensors(directory, shapes, n_groups, names, placed, scalars)
    param_groups = _param_groups(bases[0], shapes, n_groups)
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


def _group_states(f: _File, base: dict[Any, Any], n_groups: int) -> list[dict[Any, Any]]:
    """One rank's optimizer state per flat parameter group (``state`` keyed ``0..n_groups-1``)."""
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
    return groups


def _state_kinds(first: dict[Any, Any], names: list[str]) -> tuple[list[str], list[str]]:
    """The state names that are flat (1-D) and those that are scalars, going by rank 0's
    group 0; other names are left out."""
    flat_names = []
    scalar_names = []
    for sname in names:  # flat (one element per fp32 element; lengths checked below) or 0-d
        value = first[sname]
        if isinstance(value, TensorRef) and len(value.shape) == 1:
            flat_names.append(sname)
        elif isinstance(value, TensorRef) and math.prod(value.shape) == 1:
            scalar_names.append(sname)
    return flat_names, scalar_names


def _place_flat(
    layout: _Layout,
    shapes: Shapes,
    weights: list[list[_Run]],
    per_rank: list[list[dict[Any, Any]]],
    sname: str,
) -> dict[str, _Builder]:
    """Place the flat state ``sname`` of every rank like the fp32 partitions ``weights``."""
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
    return builders


def _scalars(
    f0: _File, groups: list[dict[Any, Any]], scalar_names: list[str]
) -> dict[str, list[_Parts]]:
    """Per scalar state name, its value in each group of rank 0's file (``f0``)."""
    scalars: dict[str, list[_Parts]] = {}
    for sname in scalar_names:
        vals = []
        for g, s in enumerate(groups):
            ref = s.get(sname)
            if not isinstance(ref, TensorRef):
                raise FormatError(f"{f0.path}: optimizer state {sname!r} of group {g} is missing")
            vals.append((ref.dtype, ref.shape, tuple(f0.whole(ref, f"{sname!r} of group {g}"))))
        scalars[sname] = vals
    return scalars


def _state_tensors(
    directory: Path,
    shapes: Shapes,
    n_groups: int,
    names: list[str],
    placed: dict[str, dict[str, _Builder]],
    scalars: dict[str, list[_Parts]],
) -> _Tensors:
    """``state.<fqn>.<name>`` tensors, in parameter order then state order."""
    # the group of each parameter (ZeRO-3 sub-groups: one per group unless sub_group_size splits)
    group_of: dict[str, int] = {}
    for g, group in enumerate(shapes):
        for name, _ in group:
            group_of[name] = g if len(shapes) == n_groups else 0
    tensors: _Tensors = {}
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
    return tensors


def _param_groups(base: dict[Any, Any], shapes: Shapes, n_groups: int) -> list[dict[str, Any]]:
    """The base optimizer's ``param_groups`` with ``params`` as FQNs (empty when sub-groups do not
    match the parameter groups)."""
    param_groups = []
    raw_groups = base.get("param_groups")
    for g, pg in enumerate(raw_groups if isinstance(raw_groups, list) else []):
        if not isinstance(pg, dict):
            continue
        out = {str(k): v for k, v in pg.items() if k != "params"}
        out["params"] = [_normalise(n) for n, _ in shapes[g]] if len(shapes) == n_groups else []
        param_groups.append(out)
    return param_groups
