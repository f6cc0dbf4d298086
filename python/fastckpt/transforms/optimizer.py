"""Optimizer state: consolidate FQN-keyed state into ``optimizer.safetensors`` + ``optimizer.json``.

Output (``convert(with_optimizer=True)`` / ``--with-optimizer``):

* ``optimizer.safetensors``: ``state.<fqn>.<name>`` for every per-parameter state tensor
  (``exp_avg``, ``exp_avg_sq``, ``step``, ...), full (unsharded) and in its stored dtype, written
  by the same Rust writer as the weights; the names are those of
  ``get_optimizer_state_dict(..., StateDictOptions(full_state_dict=True))["state"]``.
* ``optimizer.json``: ``{"param_groups": [...], "step": N}`` with each group's ``params`` as FQNs.

Sources:

* DCP: ``<prefix>.state.<fqn>.<name>`` and ``<prefix>.param_groups.<i>.<key>`` (``optim.``,
  ``optim.optim.``, ``app.optimizers.``, ``fsdp_checkpoint.optimizers.`` ...), split with the
  planner data so that dotted FQNs stay whole (accelerate's separate ``optimizer_N/`` folder
  too). Non-tensor values are small ``torch.save`` items, read with the restricted unpickler.
* veRL per-rank files ``optim_world_size_{W}_rank_{R}.pt``: ``torch.optim`` state dicts keyed by
  parameter index (or by FQN), whose values are FSDP2 DTensors (or plain tensors). Index ``i`` is
  the ``i``-th parameter of the model file (``named_parameters()`` order; *inferred*, checked: the
  counts must match and every state tensor must have its parameter's shape). FSDP1 flat states
  fail those checks and are refused.
* DeepSpeed ZeRO 1/2/3 tag folders: each rank's torch optimizer holds one flat parameter per group
  (the rank's fp32 partition), so ``exp_avg`` / ``exp_avg_sq`` have the partition's layout and are
  placed exactly like the fp32 weights (``formats/deepspeed/``, ``read_zero_optimizer``); ``step``
  (one per group) is given to every parameter of the group. Frozen parameters have no state.

Integer-keyed (unkeyed) states in DCP are refused: nothing maps an index to a name there.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastckpt import _core
from fastckpt._core import FormatError
from fastckpt.catalog import Catalogue, TensorEntry, TensorMeta, reading
from fastckpt.formats.dcp import DcpReader, normalise_name, read_dcp
from fastckpt.formats.deepspeed import ZeroReader, read_zero_optimizer
from fastckpt.formats.torch_assemble import TorchSaveReader, _assemble
from fastckpt.formats.torch_load import (
    MAX_PICKLE_BYTES,
    _flat_param_message,
    _RankFile,
    record_tensor,
)
from fastckpt.formats.torch_ranks import _rank_files
from fastckpt.safeio import item_path
from fastckpt.unpickle import (
    BytesStorageMetadata,
    DTensorRef,
    MetadataIndex,
    Stub,
    TensorRef,
    TorchZip,
    load_state_dict_pickle,
    open_fd,
)

#: veRL per-rank optimizer files
OPTIM_FILE = re.compile(r"^optim_world_size_(\d+)_rank_(\d+)\.pt$")
#: cap on one pickled param_groups value inside a DCP item
MAX_VALUE_BYTES = 1 << 26

_UNKEYED = (
    "optimizer state keyed by parameter index ({example}): an unkeyed optimizer.state_dict() "
    "(FSDP1 flat parameters or a plain torch.optim state dict) cannot be mapped to parameter "
    "names; save it FQN-keyed with torch.distributed.checkpoint.state_dict."
    "get_optimizer_state_dict (FSDP2 / use_orig_params=True)"
)


@dataclass
class OptimizerState:
    """Consolidated optimizer state, ready to write."""

    entries: list[TensorEntry]  # named state.<fqn>.<name>
    param_groups: list[dict[str, Any]]
    step: int | float | None
    notes: list[str]
    warnings: list[str] = field(default_factory=list)  # values left out of optimizer.json

    def json_bytes(self) -> bytes:
        doc = {"param_groups": self.param_groups, "step": self.step}
        return (json.dumps(doc, indent=2, default=_jsonable) + "\n").encode()


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


def _scalar(entry: TensorEntry) -> float:
    import numpy as np

    out = np.empty(1, dtype=np.float64)
    _core.gather(entry.source(), "F64", out)
    return float(out[0])


def _step(entries: list[TensorEntry]) -> int | float | None:
    steps = [e for e in entries if e.name.endswith(".step") and e.meta.numel == 1]
    if not steps:
        return None
    if any(e.meta.dtype not in ("F64", "F32", "F16", "BF16") for e in steps):
        import numpy as np

        values = []
        for e in steps:
            raw = np.empty(_core.dtype_size(e.meta.dtype), dtype=np.uint8)
            _core.gather(e.source(), e.meta.dtype, raw)
            values.append(int.from_bytes(raw.tobytes(), "little", signed=True))
        return max(values)
    best = max(_scalar(e) for e in steps)
    return int(best) if best.is_integer() else best


def read_optimizer(cat: Catalogue) -> OptimizerState:
    """The optimizer state of a catalogued checkpoint (DCP, veRL rank files or DeepSpeed ZeRO)."""
    with reading(cat.path):
        return _read_optimizer(cat)


def _read_optimizer(cat: Catalogue) -> OptimizerState:
    if cat.format == "dcp" and cat.optimizer_dir is not None:  # accelerate: optimizer_N/
        optim = read_dcp(cat.optimizer_dir)
        assert isinstance(optim.reader, DcpReader)
        return _from_dcp(optim, optim.reader)
    if cat.format == "dcp" and isinstance(cat.reader, DcpReader):
        return _from_dcp(cat, cat.reader)
    if cat.format == "torch_ranks":
        return _from_rank_files(cat)
    if cat.format == "deepspeed":
        return _from_zero(cat)
    raise FormatError(
        f"{cat.path}: --with-optimizer reads DCP checkpoints, veRL optim_world_size_W_rank_R.pt "
        f"files and DeepSpeed ZeRO folders; this {cat.format} checkpoint has no optimizer state "
        "fastckpt can consolidate"
    )


# --------------------------------------------------------------------------------------------
# DeepSpeed ZeRO


def _from_zero(cat: Catalogue) -> OptimizerState:
    if not isinstance(cat.reader, ZeroReader):
        raise FormatError(f"{cat.path}: not a DeepSpeed ZeRO catalogue")
    zero = read_zero_optimizer(cat.path, cat.reader.layout)
    dropped: list[str] = []
    groups = [
        _plain_group(g, i, dropped, keep_params=True) for i, g in enumerate(zero.param_groups)
    ]
    return OptimizerState(entries=zero.entries, param_groups=groups, step=_step(zero.entries),
                          notes=zero.notes, warnings=dropped)  # fmt: skip


# --------------------------------------------------------------------------------------------
# DCP


def _split(path: tuple[Any, ...]) -> tuple[tuple[Any, ...], str, tuple[Any, ...]] | None:
    """``(prefix, "state" | "param_groups", rest)`` of an optimizer planner path.

    A flattened optimizer state dict (torchtitan's ``OptimizersContainer``, or
    ``StateDictOptions(flatten_optimizer_state_dict=True)``) keeps ``state.<fqn>.<name>`` as one
    key: ``("optimizer", "state.layers.0.w.exp_avg")`` reads as ``state``, ``(fqn, name)``."""
    last = path[-1] if path else None
    if isinstance(last, str) and last.startswith("state.") and last.count(".") >= 2:
        fqn, name = last[len("state.") :].rsplit(".", 1)
        return path[:-1], "state", (fqn, name)
    for i in range(len(path) - 2, 0, -1):
        if path[i] == "state" and len(path) == i + 3:
            return path[:i], "state", path[i + 1 :]
        if path[i] == "param_groups" and len(path) == i + 3:
            return path[:i], "param_groups", path[i + 1 :]
    return None


def _read_bytes_item(directory: Path, reader: DcpReader, key: str) -> Any:
    info = reader.md.storage_data.get(MetadataIndex(key))
    if info is None:
        raise FormatError(f"{directory}: no storage entry for {key!r}")
    path = item_path(directory, info.relative_path, where=f"{directory / '.metadata'}: {key!r}")
    offset, length = int(info.offset), int(info.length)
    if length > MAX_VALUE_BYTES:
        raise FormatError(f"{path}: item {key!r} is implausibly large ({length} bytes)")
    fd = open_fd(str(path))
    try:
        archive = TorchZip(str(path), fd, offset, length)
        pkl = archive.entries[archive.prefix + "data.pkl"]
        value, _ = load_state_dict_pickle(archive.read(pkl), source=f"{path} ({key})")
    finally:
        os.close(fd)
    return value


def _from_dcp(cat: Catalogue, reader: DcpReader) -> OptimizerState:
    md = reader.md
    planner = md.planner_data or {}
    state: dict[tuple[Any, ...], list[tuple[str, Any, Any]]] = {}
    groups: dict[tuple[Any, ...], dict[int, dict[str, Any]]] = {}
    group_keys: list[tuple[tuple[Any, ...], int, str, str]] = []
    model_keys = {m.key for m in cat.tensors.values() if m.is_model}
    for key, item in md.state_dict_metadata.items():
        if key in model_keys:
            continue
        raw = planner.get(key)
        path = tuple(raw) if isinstance(raw, tuple | list) and raw else tuple(key.split("."))
        split = _split(path)
        if split is None:
            continue
        prefix, kind, rest = split
        if kind == "state":
            state.setdefault(prefix, []).append((key, rest[0], rest[1]))
        elif str(rest[0]).isdigit():
            groups.setdefault(prefix, {}).setdefault(int(rest[0]), {})
            group_keys.append((prefix, int(rest[0]), str(rest[1]), key))
            del item
    if not state:
        raise FormatError(f"{cat.path}: no optimizer state (<prefix>.state.<fqn>.<name>) found")
    if len(state) > 1:
        shown = ", ".join(".".join(map(str, p)) for p in state)
        raise FormatError(f"{cat.path}: several optimizer states ({shown}); not supported")
    ((prefix, items),) = state.items()
    pname = ".".join(map(str, prefix))
    for key, fqn, _ in items:
        if isinstance(fqn, int) or str(fqn).isdigit():
            raise FormatError(f"{cat.path}: " + _UNKEYED.format(example=key))
    metas = []
    by_key = {m.key: m for m in cat.tensors.values()}
    for key, fqn, name in items:
        meta = by_key.get(key)
        if meta is None:  # not a tensor (a pickled value): optimizers keep only tensors here
            continue
        metas.append(replace(meta, name=f"state.{normalise_name(str(fqn))}.{name}"))
    entries = reader.locate(metas)
    dropped: list[str] = []
    param_groups = _dcp_groups(cat, reader, prefix, group_keys, dropped)
    return OptimizerState(
        entries=entries,
        param_groups=param_groups,
        step=_step(entries),
        notes=[f"optimizer state under {pname}."],
        warnings=dropped,
    )


def _dcp_groups(
    cat: Catalogue,
    reader: DcpReader,
    prefix: tuple[Any, ...],
    keys: list[tuple[tuple[Any, ...], int, str, str]],
    dropped: list[str],
) -> list[dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    by_key = {m.key: m for m in cat.tensors.values()}
    for p, idx, field_name, key in keys:
        if p != prefix:
            continue
        item = reader.md.state_dict_metadata[key]
        if isinstance(item, BytesStorageMetadata):
            where = f"param_groups[{idx}].{field_name}"
            value = _plain(_read_bytes_item(cat.path, reader, key), dropped, where)
            if value is _DROPPED:
                continue
        elif key in by_key and by_key[key].numel == 1:
            (entry,) = reader.locate([by_key[key]])
            value = _scalar(entry)
        else:
            continue
        if field_name == "params" and isinstance(value, list):
            value = [normalise_name(str(v)) for v in value]
        out.setdefault(idx, {})[field_name] = value
    return [out[i] for i in sorted(out)]


#: most values (list items, dict entries) one param_groups value may expand to in optimizer.json
MAX_PLAIN_VALUES = 100_000


def _plain(value: Any, dropped: list[str], where: str, budget: list[int] | None = None) -> Any:
    """A JSON-friendly copy of a small unpickled value: only plain values (None, bool, int,
    float, str, and lists, tuples and str/int-keyed dicts of them) reach the output. Anything
    else (a pickled class fastckpt does not know, a tensor) is dropped with a warning."""
    budget = [MAX_PLAIN_VALUES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise FormatError(f"{where}: optimizer value is implausibly large")
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, list | tuple):
        items = [_plain(v, dropped, f"{where}[{i}]", budget) for i, v in enumerate(value)]
        return [v for v in items if v is not _DROPPED]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str | int) or isinstance(k, bool):
                dropped.append(f"{where}: dropped a key of type {type(k).__name__}")
                continue
            item = _plain(v, dropped, f"{where}.{k}", budget)
            if item is not _DROPPED:
                out[str(k)] = item
        return out
    what = value.qualname() if isinstance(value, Stub) else type(value).__name__
    dropped.append(f"optimizer.json: {where}: dropped a value of type {what} (not plain data)")
    return _DROPPED


_DROPPED = object()


def _plain_group(
    group: Any, index: int, dropped: list[str], *, keep_params: bool = False
) -> dict[str, Any]:
    """One param group as plain JSON data (see :func:`_plain`)."""
    if not isinstance(group, dict):
        dropped.append(f"optimizer.json: param_groups[{index}] is not a dict; dropped")
        return {}
    kept = {k: v for k, v in group.items() if keep_params or k != "params"}
    out = _plain(kept, dropped, f"param_groups[{index}]")
    return out if isinstance(out, dict) else {}


# --------------------------------------------------------------------------------------------
# veRL per-rank files


def _optim_files(directory: Path, world: int) -> list[tuple[int, Path]]:
    names = sorted(os.listdir(directory))
    found = {}
    for n in names:
        m = OPTIM_FILE.match(n)
        if m:
            if int(m.group(1)) != world:
                raise FormatError(
                    f"{directory / n}: world size {m.group(1)}, but the model files have {world}"
                )
            found[int(m.group(2))] = directory / n
    if not found:
        raise FormatError(
            f"{directory}: no optim_world_size_{world}_rank_R.pt files (the run was saved "
            "without optimizer state)"
        )
    for r in range(world):
        if r not in found:
            raise FormatError(
                f"{directory / f'optim_world_size_{world}_rank_{r}.pt'}: missing optimizer file"
            )
    return [(r, found[r]) for r in range(world)]


def _load_optim(path: Path, rank: int) -> tuple[TorchZip, int, dict[Any, Any], list[Any]]:
    try:
        fd = open_fd(str(path))
    except FileNotFoundError:
        raise FormatError(f"{path}: missing file") from None
    try:
        archive = TorchZip(str(path), fd, 0, os.fstat(fd).st_size)
        pkl = archive.entries[archive.prefix + "data.pkl"]
        if pkl.size > MAX_PICKLE_BYTES:
            raise FormatError(f"{path}: data.pkl is implausibly large ({pkl.size} bytes)")
        obj, _ = load_state_dict_pickle(archive.read(pkl), source=str(path))
    except BaseException:
        os.close(fd)
        raise
    if not isinstance(obj, dict) or not isinstance(obj.get("state"), dict):
        os.close(fd)
        raise FormatError(f"{path}: not a torch.optim state dict (no 'state' entry)")
    groups = obj.get("param_groups")
    return archive, fd, obj["state"], groups if isinstance(groups, list) else []


def _from_rank_files(cat: Catalogue) -> OptimizerState:
    directory = cat.path
    model_ranks, _ = _rank_files(directory)
    world = len(model_ranks)
    params = [m for m in cat.tensors.values() if m.is_model]
    files: list[_RankFile] = []
    groups0: list[Any] = []
    for rank, path in _optim_files(directory, world):
        archive, fd, state, groups = _load_optim(path, rank)
        try:
            if rank == 0:
                groups0 = groups
            listed = [len(g.get("params", [])) for g in groups if isinstance(g, dict)]
            n_params = sum(listed) or len(state)
            out = _RankFile(path, rank, {}, {}, {})
            for pid, states in state.items():
                fqn = _fqn_of(path, pid, params, n_params)
                if not isinstance(states, dict):
                    raise FormatError(f"{path}: state of parameter {pid!r} is not a dict")
                for sname, value in states.items():
                    if not isinstance(value, TensorRef | DTensorRef):
                        continue
                    key = f"state.{fqn.name}.{sname}"
                    if "_flat_param" in str(pid):
                        raise FormatError(_flat_param_message(str(path), str(pid)))
                    if math.prod(value.shape) > 1 and value.shape != fqn.shape:
                        raise FormatError(
                            f"{path}: state {sname!r} of parameter {pid!r} has shape "
                            f"{list(value.shape)}, but {fqn.name} is {list(fqn.shape)}: "
                            + _UNKEYED.format(example=f"state[{pid!r}]")
                        )
                    record_tensor(out, archive, rank, key, value)
            files.append(out)
        finally:
            os.close(fd)
    metas, placed = _assemble(files, directory)
    reader = TorchSaveReader(placed)
    located = reader.locate([replace(m, is_model=False, name=m.key) for m in metas.values()])
    names = [p.name for p in params]
    param_groups = []
    dropped: list[str] = []
    for gi, g in enumerate(groups0):
        if not isinstance(g, dict):
            continue
        group = _plain_group(g, gi, dropped)
        ids = g.get("params", [])
        if not isinstance(ids, list | tuple):
            raise FormatError(f"{directory}: param_groups[{gi}].params is not a list")
        group["params"] = [
            names[i] if isinstance(i, int) and 0 <= i < len(names) else i
            for i in ids
            if isinstance(i, int | str)
        ]
        param_groups.append(group)
    return OptimizerState(
        entries=located,
        param_groups=param_groups,
        step=_step(located),
        notes=[
            f"optimizer state from {world} optim_world_size_{world}_rank_R.pt files "
            "(parameter index i = the i-th tensor of the model files)"
        ],
        warnings=dropped,
    )


def _fqn_of(path: Path, pid: Any, params: list[TensorMeta], n_params: int) -> TensorMeta:
    if isinstance(pid, str) and not pid.isdigit():
        for p in params:
            if p.name == normalise_name(pid) or p.key == pid:
                return p
        raise FormatError(f"{path}: optimizer state for {pid!r}, which is not a model tensor")
    if n_params != len(params):
        raise FormatError(
            f"{path}: the optimizer has {n_params} parameters but the model files hold "
            f"{len(params)} tensors: " + _UNKEYED.format(example=f"state[{pid!r}]")
        )
    idx = int(pid)
    if not 0 <= idx < len(params):
        raise FormatError(f"{path}: optimizer state for parameter {idx} of {len(params)}")
    return params[idx]
