"""The fp32 weights of a ZeRO tag folder as a :class:`Catalogue` (:func:`read_zero_dir`).

Trainable parameters come from the ranks' fp32 partitions (:mod:`.placement`), frozen ones from
``frozen_param_fragments`` (ZeRO 2/3) or ``module`` (ZeRO-1), buffers from ``module`` of rank 0's
model file, aliases from ``shared_params``. :class:`ZeroReader` hands out the chunks and keeps the
parsed files for ``--with-optimizer`` (:mod:`.optimizer`).
"""

from __future__ import annotations

import math
from pathlib import Path

from fastckpt._core import FormatError
from fastckpt.catalog import Catalogue, Chunk, TensorEntry, TensorMeta
from fastckpt.formats.dcp import normalise_name
from fastckpt.formats.deepspeed.files import _get, _kind, _shape
from fastckpt.formats.deepspeed.layout import _flat_groups, _Layout, _param_shapes, _read_layout
from fastckpt.formats.deepspeed.placement import _Builder, _Flat, _zero3, _zero3_param, _zero12
from fastckpt.unpickle import TORCH_TO_ST, TensorRef

#: one tensor: (torch dtype, shape, chunks)
_Parts = tuple[str, tuple[int, ...], tuple[Chunk, ...]]
#: tensors by key, in order
_Tensors = dict[str, _Parts]


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
    builders = _fp32_builders(layout)
    notes = [f"DeepSpeed ZeRO-{layout.stage}, {layout.world} data-parallel ranks"]
    ordered, skipped, from_module = _module_tensors(directory, layout, builders)
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
    metas, chunks = _metas(directory, ordered)
    stubs = sorted(set().union(*(f.stubs for f in layout.optim + layout.models)))
    if stubs:
        notes.append("inert stand-ins for pickled classes: " + ", ".join(stubs))
    return Catalogue(
        format="deepspeed",
        path=directory,
        reader=ZeroReader(chunks, layout),
        tensors=metas,
        skipped=skipped,
        side_dirs=_side_dirs(directory),
        notes=notes,
    )


def _fp32_builders(layout: _Layout) -> dict[str, _Builder]:
    """The fp32 master weights (ZeRO 1/2 or ZeRO-3 placement) and the frozen parameters."""
    shapes = _param_shapes(layout.models[0])
    builders: dict[str, _Builder] = {}
    if layout.stage <= 2:
        _zero12(layout, shapes, _flat_groups(layout), builders)
    else:
        _zero3(layout, shapes, _flat_groups(layout), builders)
    _frozen(layout, builders)
    return builders


def _module_tensors(
    directory: Path, layout: _Layout, builders: dict[str, _Builder]
) -> tuple[_Tensors, list[str], list[str]]:
    """The tensors in ``module`` order (then the rest of ``builders``), with buffers, ZeRO-1
    frozen weights and aliases; also the keys skipped and the keys read from ``module``."""
    m0 = layout.models[0]
    module = m0.obj.get("module")
    if not isinstance(module, dict):
        raise FormatError(f"{m0.path}: module is a {_kind(module)}, expected a state dict")
    raw_buffers = m0.obj.get("buffer_names") or []
    buffers = {str(b) for b in raw_buffers} if isinstance(raw_buffers, list | tuple) else set()
    shared_raw = m0.obj.get("shared_params") or {}
    shared = {str(k): str(v) for k, v in shared_raw.items()} if isinstance(
        shared_raw, dict) else {}  # fmt: skip

    tensors: _Tensors = {}
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
    return ordered, skipped, from_module


def _metas(
    directory: Path, ordered: _Tensors
) -> tuple[dict[str, TensorMeta], dict[str, tuple[Chunk, ...]]]:
    """Tensor metadata under normalised names, and the chunks by stored key."""
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
    return metas, chunks


def _side_dirs(directory: Path) -> list[Path]:
    """Where side files (config, tokenizer) are looked for: the tag folder, OpenRLHF's
    ``<tag>_hf`` sibling, the role folder and the run folder."""
    role = directory.parent
    return [
        directory,
        role.parent / f"{directory.name.removeprefix('best_')}_hf",
        role,
        role.parent,
    ]
