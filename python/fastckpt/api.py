"""The public operations: :func:`convert`, :func:`inspect`, :func:`verify`.

Pipeline of a conversion: detect the format -> catalogue the tensors from metadata -> choose and
name them -> plan shards -> Rust writes every shard (headers first, copies straight from the
memory-mapped sources, GIL released) into a temporary sibling of the destination -> side files and
index -> rename into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastckpt import _core
from fastckpt._core import FastckptError, FormatError, MappingError, ShapeError
from fastckpt.catalog import Catalogue, TensorEntry, TensorInfo
from fastckpt.checkpoint import info_of
from fastckpt.formats.registry import open_catalogue
from fastckpt.fsops import Owner, check_replaceable, move_into_place, reclaim_stale
from fastckpt.output.folder import copy_side_files, fsync_dir, index_bytes, shard_names, write_file
from fastckpt.runs import Run, is_run_dir, looks_like_step, resolve_source, scan_run
from fastckpt.side_files import TORCH_DTYPE_NAMES, find_side_files, tie_word_embeddings
from fastckpt.transforms.heads import split_value_head
from fastckpt.transforms.lora import adapter_config_bytes, has_lora
from fastckpt.transforms.lora import plan as plan_lora
from fastckpt.transforms.optimizer import read_optimizer

PathLike = str | os.PathLike[str]
Progress = Callable[[int, int], object]

_FLOATS = frozenset({"F64", "F32", "F16", "BF16"})
_DTYPE_OPTIONS = {"bf16": "BF16", "fp16": "F16", "fp32": "F32", "bfloat16": "BF16",
                  "float16": "F16", "float32": "F32"}  # fmt: skip
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
EMBED = "model.embed_tokens.weight"
TITAN_EMBED = "tok_embeddings.weight"
LM_HEAD = "lm_head.weight"


def parse_size(value: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units, as transformers); ``"512MiB"`` binary."""
    if isinstance(value, int):
        if value <= 0:
            raise FastckptError(f"shard size must be positive, got {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
    if not m or m.group(2).upper() not in _UNITS:
        raise FastckptError(f"invalid size {value!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise FastckptError(f"shard size must be positive, got {value!r}")
    return size


def _target_dtype(dtype: str | None) -> str | None:
    if dtype is None or dtype == "keep":
        return None
    try:
        return _DTYPE_OPTIONS[dtype.lower()]
    except KeyError:
        raise FastckptError(f"invalid dtype {dtype!r} (use keep, bf16, fp16 or fp32)") from None


@dataclass
class ConvertReport:
    """What :func:`convert` wrote."""

    dst: Path
    files: list[str]
    n_tensors: int
    nbytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. which step of a run was converted

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class CheckpointInfo:
    """What :func:`inspect` finds: the model tensors and what a conversion leaves out."""

    path: Path
    format: str
    tensors: list[TensorInfo]
    total_bytes: int
    skipped: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    """Result of a bitwise comparison of two checkpoints."""

    ok: bool
    n_tensors: int
    mismatches: list[str]
    only_in_a: list[str]
    only_in_b: list[str]
    reasons: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _select(
    cat: Catalogue, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> list[str]:
    inc = [re.compile(p) for p in include or ()]
    exc = [re.compile(p) for p in exclude or ()]
    names = []
    for name, meta in cat.tensors.items():
        chosen = meta.is_model or any(p.search(name) or p.search(meta.key) for p in inc)
        if chosen and not any(p.search(name) for p in exc):
            names.append(name)
    return names


def _same_tensor(a: TensorEntry, b: TensorEntry) -> bool:
    if a.meta.dtype != b.meta.dtype or a.meta.shape != b.meta.shape:
        return False
    return _core.digest(a.source()) == _core.digest(b.source())


class DestinationExistsError(FastckptError):
    """The destination exists and ``overwrite`` was not given."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"destination {path} already exists (overwrite=True replaces it)")
        self.path = path


#: folders that :func:`convert_steps` is filling with ``step_N/`` outputs (resolved)
_STEP_OUTPUTS: set[Path] = set()


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    if dst.is_symlink():
        raise FastckptError(
            f"destination {dst} is a symbolic link (to {os.readlink(dst)}); pass the real "
            "folder, or remove the link"
        )
    s, d = src.resolve(), dst.resolve()
    if looks_like_step(d.name) and d.parent not in _STEP_OUTPUTS and is_run_dir(d.parent):
        raise FastckptError(
            f"destination {dst} would look like a step of the training run {dst.parent} "
            "(fastckpt ls would list it as an incomplete step); choose another name or folder"
        )
    if d == s or s.is_relative_to(d):
        raise FastckptError(f"destination {dst} contains the source {src}; choose another folder")
    if d.is_relative_to(s if s.is_dir() else s.parent) and s.is_dir():
        raise FastckptError(f"destination {dst} is inside the source {src}; choose another folder")
    if dst.exists() and not overwrite:
        raise DestinationExistsError(dst)
    if dst.exists():
        check_replaceable(dst)


def convert(
    src: PathLike,
    dst: PathLike,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    config_from: PathLike | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    num_threads: int | None = None,
    copy_files: bool = True,
    overwrite: bool = False,
    fsync: bool = True,
    progress: Progress | None = None,
    step: str | int | None = None,
    role: str | None = None,
    metric: str | None = None,
    higher_is_better: bool = True,
    drop_value_head: bool = False,
    arch: str | None = None,
    lora: str | None = None,
    lora_alpha: float | None = None,
    lora_rslora: bool | None = None,
    with_optimizer: bool = False,
    ray_address: str | None = None,
) -> ConvertReport:
    """Convert a checkpoint into a Hugging Face folder (safetensors shards + index + side files).

    Args:
        src: the checkpoint (a DCP directory, or a safetensors folder to reshard).
        dst: the folder to create; it appears complete or not at all.
        dtype: ``None``/``"keep"`` (default: never change what was trained), ``"bf16"``,
            ``"fp16"`` or ``"fp32"``; casts floating tensors only and updates config.json.
        max_shard_size: largest shard, ``"5GB"`` style (decimal units) or bytes.
        config_from: folder to copy config/tokenizer files from (default: found beside ``src``).
        include: regexes adding tensors by name or source key (e.g. optimizer state).
        exclude: regexes removing tensors by output name.
        num_threads: copy threads (default ``FASTCKPT_NUM_THREADS`` or the CPU count).
        copy_files: copy config, tokenizer and template files.
        overwrite: replace an existing ``dst``.
        fsync: make the output durable before it is renamed into place.
        progress: ``progress(done_bytes, total_bytes)``, called about every 100 ms.
        step: when ``src`` is a training run: ``"latest"`` (default), ``"best"`` or a number.
        role: when ``src`` is a training run: ``"actor"``/``"policy"`` (default) or ``"critic"``.
        metric: the ``training_info.json`` metric ranking ``step="best"``.
        higher_is_better: ``False`` when a lower ``metric`` is better (a loss).
        drop_value_head: leave out a critic's or reward model's value head (``score.*``,
            ``v_head.*``) to export the policy; kept by default, with a warning naming the
            config the output needs.
        arch: Megatron checkpoints: the architecture whose names to write (``llama``,
            ``mistral``, ``qwen2``, ``qwen3``, ``mixtral``, ``qwen2_moe``, ``qwen3_moe``); default:
            from the config, else from the checkpoint's ``args``.
        lora: what to do with PEFT LoRA tensors (required when there are any): ``"merge"``
            (``W + alpha/r * B @ A`` in fp32, cast back to W's dtype), ``"adapter"``
            (``adapter_model.safetensors`` + ``adapter_config.json``) or ``"strip"`` (base
            weights only).
        lora_alpha: LoRA alpha when no ``lora_train_meta.json`` / ``adapter_config.json``
            beside the checkpoint says it (never guessed).
        lora_rslora: the adapters were trained with rsLoRA (scale ``alpha/sqrt(r)``); default:
            from ``adapter_config.json``, else False.
        with_optimizer: also write the consolidated optimizer state (``optimizer.safetensors``
            with ``state.<fqn>.<name>`` + ``optimizer.json`` with param_groups and step).
        ray_address: write the shards on a Ray cluster (``"auto"``: ``RAY_ADDRESS`` or the
            running cluster), one task per shard on the nodes, which must all see ``src`` and
            ``dst``'s parent on a shared filesystem (checked first); see :mod:`fastckpt.cluster`.
            Needs ``pip install 'fastckpt[ray]'``.

    Returns:
        A :class:`ConvertReport`.
    """
    start = time.perf_counter()
    resolved = resolve_source(
        src, step=step, role=role, metric=metric, higher_is_better=higher_is_better
    )
    src_p, dst_p = resolved.weights, Path(dst)
    target = _target_dtype(dtype)
    shard_limit = parse_size(max_shard_size)
    given_config = find_side_files([Path(config_from)]).config if config_from is not None else None
    cat = open_catalogue(src_p, arch=arch, hf_config=given_config)
    _check_paths(src_p, dst_p, overwrite)
    if cat.undecided is not None and not include:
        raise FormatError(f"{src_p}: {cat.undecided}")
    names = _select(cat, include, exclude)
    if not names:
        raise MappingError(f"{src_p}: no model tensors selected (see `fastckpt inspect`)")
    warnings: list[str] = list(resolved.warnings)
    if TITAN_EMBED in names and EMBED not in names:
        warnings.append(
            f"tensor names are torchtitan's ({TITAN_EMBED}, layers.N.attention.*): fastckpt does "
            "not map them to Hugging Face names yet, so they are written as they are and "
            "transformers cannot load the folder as a model"
        )
    if lora is None and has_lora(names):
        shown = next(n for n in names if ".lora_" in n or ".base_layer." in n)
        raise MappingError(
            f"{src_p}: the checkpoint holds LoRA tensors (e.g. {shown!r}); choose what to "
            "write with --lora merge|adapter|strip (lora=...)"
        )

    if config_from is not None:
        cfg_dir = Path(config_from)
        if not cfg_dir.is_dir():
            raise FileNotFoundError(2, "config folder not found", str(cfg_dir))
        side = find_side_files([cfg_dir])
    else:
        side = find_side_files(cat.side_dirs)
    warnings += side.skipped if copy_files else []
    config = side.config
    # Megatron: a config from its args (made, and maybe refused, only when it is needed)
    derived = getattr(cat.reader, "derived_config", None) if copy_files and config is None else None
    write_derived = isinstance(derived, dict)
    if isinstance(derived, dict):
        config = derived
        warnings.append(
            "no config.json found: wrote one derived from the Megatron args (architecture "
            f"{derived.get('architectures')}); check it, or pass --config-from DIR (the base "
            "model's folder) to copy the real config and tokenizer"
        )
    elif copy_files and config is None:
        looked = [str(config_from)] if config_from else [str(d) for d in cat.side_dirs]
        warnings.append(
            "no config.json found (looked in: " + ", ".join(looked) + "); wrote the weights "
            "only: transformers cannot load the folder until you add config and tokenizer "
            "files (pass --config-from DIR, e.g. the base model's folder)"
        )

    names, head_warnings = split_value_head(names, drop=drop_value_head, config=config)
    warnings += head_warnings
    if not names:
        raise MappingError(f"{src_p}: no model tensors left after dropping the value head")
    entries = cat.locate(names)
    owner = Owner(dst_p)
    tmp = owner.tmp
    lplan = None
    if lora is not None:
        src_dir = src_p if src_p.is_dir() else src_p.parent
        dirs = [cat.path if cat.path.is_dir() else cat.path.parent, src_dir, src_dir.parent]
        dirs += [Path(config_from)] if config_from is not None else []
        lplan = plan_lora(
            entries,
            lora,
            dirs=list(dict.fromkeys([*dirs, *cat.side_dirs])),
            spill_dir=tmp / ".lora-merge",
            alpha=lora_alpha,
            rslora=lora_rslora,
            config=config,
        )
        entries = lplan.entries
        warnings += lplan.warnings
    optim = read_optimizer(cat) if with_optimizer else None
    warnings += optim.warnings if optim is not None else []
    by_name = {e.name: e for e in entries}
    merged = set(lplan.out_dtype) if lplan else set()
    if (
        LM_HEAD in by_name
        and EMBED in by_name
        and not merged & {LM_HEAD, EMBED}
        and tie_word_embeddings(config)
    ):
        if _same_tensor(by_name[LM_HEAD], by_name[EMBED]):
            entries = [e for e in entries if e.name != LM_HEAD]
        else:
            warnings.append(
                f"config.json ties the word embeddings but {LM_HEAD} differs from {EMBED}: "
                "kept both; transformers may re-tie them on load"
            )

    jobs: list[tuple[TensorEntry, str]] = []
    for e in entries:
        stored = lplan.out_dtype.get(e.name, e.meta.dtype) if lplan else e.meta.dtype
        out = target if target is not None and stored in _FLOATS else stored
        jobs.append((e, out))
    sizes = [e.meta.numel * _core.dtype_size(out) for e, out in jobs]
    adapter = lplan is not None and lplan.adapter_config is not None
    plan = [list(range(len(jobs)))] if adapter else _core.plan_shards(sizes, shard_limit)
    files = ["adapter_model.safetensors"] if adapter else shard_names(len(plan)) if plan else []

    dst_p.parent.mkdir(parents=True, exist_ok=True)
    write = _core.write_shards
    if ray_address is not None:  # Ray is imported only here
        from fastckpt.cluster import ray_writer

        files_read = {c.path for e, _ in jobs for c in e.chunks}
        files_read |= {c.path for e in optim.entries for c in e.chunks} if optim else set()
        write = ray_writer(ray_address, sources=sorted(files_read), parent=dst_p.parent)
    warnings += reclaim_stale(dst_p.parent)
    owner.acquire()
    try:
        tmp.mkdir()
        for merge in lplan.merges if lplan else []:
            merge.compute()  # W + s * B @ A in fp32, spilled under tmp/.lora-merge
        shards = [
            (fname, [(jobs[i][0].source(), jobs[i][1]) for i in idx])
            for fname, idx in zip(files, plan, strict=True)
        ]
        if optim is not None and optim.entries:
            shards.append(
                ("optimizer.safetensors", [(e.source(), e.meta.dtype) for e in optim.entries])
            )
        try:
            nbytes = write(
                str(tmp), shards, num_threads=num_threads, fsync=fsync, progress=progress
            )
        except ShapeError as exc:  # chunk coverage or sizes: name the checkpoint too
            raise ShapeError(f"{src_p}: {exc}") from None
        shutil.rmtree(tmp / ".lora-merge", ignore_errors=True)
        written = list(files)
        if optim is not None:
            written += ["optimizer.safetensors"] if optim.entries else []
            write_file(tmp / "optimizer.json", optim.json_bytes(), fsync=fsync)
            written.append("optimizer.json")
        if lplan is not None and lplan.adapter_config is not None:
            data = adapter_config_bytes(lplan.adapter_config)
            write_file(tmp / "adapter_config.json", data, fsync=fsync)
            written.append("adapter_config.json")
            side.files.pop("config.json", None)  # an adapter folder: tokenizer files only
            side.files.pop("generation_config.json", None)
            write_derived = False
        if len(files) > 1:
            weight_map = {
                jobs[i][0].name: fname for fname, idx in zip(files, plan, strict=True) for i in idx
            }
            params = sum(e.meta.numel for e, _ in jobs)
            write_file(
                tmp / "model.safetensors.index.json",
                index_bytes(weight_map, sum(sizes), params),
                fsync=fsync,
            )
            written.append("model.safetensors.index.json")
        if copy_files:
            written += copy_side_files(side, tmp, cast_to=target, fsync=fsync)
            if write_derived and config is not None and "config.json" not in written:
                derived_cfg = dict(config)
                if target is not None:
                    name = TORCH_DTYPE_NAMES[target]
                    derived_cfg["torch_dtype"] = derived_cfg["dtype"] = name
                write_file(
                    tmp / "config.json",
                    (json.dumps(derived_cfg, indent=2) + "\n").encode(),
                    fsync=fsync,
                )
                written.append("config.json")
        if fsync:
            fsync_dir(tmp)
        move_into_place(owner, overwrite=overwrite)
        if fsync:
            fsync_dir(dst_p.parent)
    finally:
        owner.release()
    return ConvertReport(
        dst=dst_p,
        files=written,
        n_tensors=len(jobs),
        nbytes=nbytes,
        seconds=time.perf_counter() - start,
        warnings=warnings,
        notes=resolved.notes,
    )


def _parse_steps(run: Run, steps: str | Sequence[int]) -> list[int]:
    if isinstance(steps, str) and steps.strip() == "all":
        numbers = [s.step for s in run.complete]
        if not numbers:
            run.latest()  # raises, describing the incomplete steps
        return numbers
    if isinstance(steps, str):
        try:
            numbers = [int(p) for p in steps.split(",") if p.strip()]
        except ValueError:
            raise FastckptError(
                f"invalid steps {steps!r} (use all, or numbers such as 100,200,300)"
            ) from None
    else:
        numbers = list(steps)
    for n in numbers:
        run.by_number(n)  # raises on a missing or incomplete step
    return list(dict.fromkeys(numbers))


def convert_steps(
    src: PathLike,
    dst: PathLike,
    *,
    steps: str | Sequence[int] = "all",
    role: str | None = None,
    ray_address: str | None = None,
    max_parallel: int = 8,
    progress: Progress | None = None,
    **options: Any,
) -> list[ConvertReport]:
    """Convert several steps of a training run, each into ``dst/step_N/``.

    Args:
        src: the run directory.
        dst: the folder that receives one Hugging Face folder per step.
        steps: ``"all"`` (every complete step), ``"100,200,300"`` or a list of step numbers.
        role: ``"actor"``/``"policy"`` (default) or ``"critic"``.
        ray_address: convert on a Ray cluster: up to ``max_parallel`` steps at once, their shard
            tasks spread over the nodes. Without it the steps are converted one after the other
            (each local conversion already uses every core and the disk's bandwidth).
        max_parallel: steps converted at once with ``ray_address``.
        progress: ``progress(done_bytes, total_bytes)`` summed over the steps started so far.
        options: any other :func:`convert` keyword (``dtype``, ``max_shard_size``, ...).

    Returns:
        One :class:`ConvertReport` per step, in step order. Each step's folder appears complete or
        not at all; on a failure the steps already written stay.
    """
    run = scan_run(src, role=role)
    numbers = _parse_steps(run, steps)
    dst_p = Path(dst)
    lock = threading.Lock()
    sums: dict[int, tuple[int, int]] = {}

    def one(n: int) -> ConvertReport:
        def step_progress(done: int, total: int) -> None:
            with lock:
                sums[n] = (done, total)
                done_all = sum(d for d, _ in sums.values())
                total_all = sum(t for _, t in sums.values())
            if progress is not None:
                progress(done_all, total_all)

        return convert(
            src,
            dst_p / f"step_{n}",
            step=n,
            role=role,
            ray_address=ray_address,
            progress=step_progress,
            **options,
        )

    _STEP_OUTPUTS.add(dst_p.resolve())  # its step_N/ outputs are not steps of a training run
    try:
        if ray_address is None or len(numbers) == 1:
            return [one(n) for n in numbers]
        from fastckpt.cluster import connect

        connect(ray_address)  # once, before the threads
        with ThreadPoolExecutor(min(max_parallel, len(numbers)), "fastckpt-step") as pool:
            return list(pool.map(one, numbers))
    finally:
        _STEP_OUTPUTS.discard(dst_p.resolve())


def inspect(
    path: PathLike,
    *,
    step: str | int | None = None,
    role: str | None = None,
    metric: str | None = None,
    higher_is_better: bool = True,
) -> CheckpointInfo:
    """Describe a checkpoint: format, model tensors (dtype, shape, chunks), what is skipped.

    ``path`` may be a training run; ``step``, ``role``, ``metric`` and ``higher_is_better`` then
    choose the step as in :func:`convert` (default: the latest complete one).
    """
    resolved = resolve_source(
        path, step=step, role=role, metric=metric, higher_is_better=higher_is_better
    )
    path = resolved.weights
    cat = open_catalogue(path)
    infos = [info_of(m) for m in cat.tensors.values() if m.is_model]
    skipped = [m.key for m in cat.tensors.values() if not m.is_model] + cat.skipped
    return CheckpointInfo(
        path=Path(path),
        format=cat.format,
        tensors=infos,
        total_bytes=sum(i.nbytes for i in infos),
        skipped=skipped,
        notes=[*resolved.notes, *cat.notes, *([cat.undecided] if cat.undecided else [])],
    )


def _tied_omission(missing_side: Catalogue, other: Catalogue, name: str) -> bool:
    """``lm_head.weight`` absent on one side because the other side's copy equals the embedding."""
    if name != LM_HEAD or EMBED not in other.tensors or EMBED not in missing_side.tensors:
        return False
    head, embed = other.locate([LM_HEAD, EMBED])
    return _same_tensor(head, embed)


def verify(a: PathLike, b: PathLike) -> VerifyReport:
    """Compare the model tensors of two checkpoints bit for bit (names, dtypes, shapes, bytes).

    Either side may be a training run: its latest complete step is compared.

    A checkpoint and its converted folder verify as equal even when the conversion left out an
    ``lm_head.weight`` identical to the tied embedding.
    """
    ca = open_catalogue(resolve_source(a).weights)
    cb = open_catalogue(resolve_source(b).weights)
    for cat in (ca, cb):
        if cat.undecided is not None:
            raise FormatError(f"{cat.path}: {cat.undecided}")
    # sorted: the report (and its "first difference") does not depend on the argument order
    names_a, names_b = sorted(ca.model_names()), sorted(cb.model_names())
    set_a, set_b = set(names_a), set(names_b)
    common = [n for n in names_a if n in set_b]
    only_a = [n for n in names_a if n not in set_b]
    only_b = [n for n in names_b if n not in set_a]
    notes = []
    for side, missing, other in ((only_a, cb, ca), (only_b, ca, cb)):
        if LM_HEAD in side and _tied_omission(missing, other, LM_HEAD):
            side.remove(LM_HEAD)
            notes.append(f"{LM_HEAD} omitted on one side: equal to the tied {EMBED}")
    reasons: dict[str, str] = {}
    entries_a = {e.name: e for e in ca.locate(common)}
    entries_b = {e.name: e for e in cb.locate(common)}
    for name in common:
        ea, eb = entries_a[name], entries_b[name]
        if ea.meta.dtype != eb.meta.dtype:
            reasons[name] = f"dtype {ea.meta.dtype} != {eb.meta.dtype}"
        elif ea.meta.shape != eb.meta.shape:
            reasons[name] = f"shape {list(ea.meta.shape)} != {list(eb.meta.shape)}"
        elif _core.digest(ea.source()) != _core.digest(eb.source()):
            reasons[name] = "bytes differ"
    mismatches = [n for n in common if n in reasons]
    return VerifyReport(
        ok=not mismatches and not only_a and not only_b,
        n_tensors=len(common),
        mismatches=mismatches,
        only_in_a=only_a,
        only_in_b=only_b,
        reasons=reasons,
        notes=notes,
    )
