"""Flat partitions -> boxes of the output tensors: ZeRO 1/2 and ZeRO-3 placement.

A contiguous range of a flat partition becomes a handful of boxes of the output tensor
(:func:`range_boxes`), each a strided view of the partition's storage (``_Builder``). ``_zero12``
and ``_zero3`` apply the two stages' layouts to any state shaped like the fp32 partitions: the
weights themselves, or optimizer state such as ``exp_avg``.
"""

from __future__ import annotations

import math
from pathlib import Path

from fastckpt._core import FormatError
from fastckpt.catalog import Chunk
from fastckpt.formats.deepspeed.files import _c_strides, _int, _Run
from fastckpt.formats.deepspeed.layout import Shapes, _Layout


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
