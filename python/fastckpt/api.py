"""The public operations: :func:`convert`, :func:`convert_steps`, :func:`inspect`, :func:`verify`.

A conversion is the pipeline of :mod:`fastckpt.pipeline`: resolve the step -> detect the format and
catalogue the tensors from metadata (:mod:`fastckpt.formats`) -> choose and transform them -> plan
shards -> the Rust core writes every shard (headers first, copies straight from the memory-mapped
sources, GIL released) into a temporary sibling of the destination -> side files and index ->
rename into place. See ``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastckpt import _core
from fastckpt._core import FastckptError, FormatError
from fastckpt.catalog import Catalogue, TensorInfo
from fastckpt.checkpoint import info_of
from fastckpt.formats.registry import open_catalogue
from fastckpt.pipeline import (
    EMBED,
    LM_HEAD,
    STEP_OUTPUTS,
    ConvertReport,
    DestinationExistsError,
    Options,
    Progress,
    parse_size,
    run,
    same_tensor,
)
from fastckpt.runs import Run, resolve_source, scan_run

PathLike = str | os.PathLike[str]

__all__ = [
    "CheckpointInfo",
    "ConvertReport",
    "DestinationExistsError",
    "VerifyReport",
    "convert",
    "convert_steps",
    "inspect",
    "parse_size",
    "verify",
]


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
    higher_is_better: bool | None = None,
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
        higher_is_better: whether a higher ``metric`` is better; default: lower is better for a
            loss, perplexity or error metric (``eval_loss``, ``val/ppl``, ...), higher otherwise.
        drop_value_head: leave out a critic's or reward model's value head (``score.*``,
            ``v_head.*``) to export the policy; kept by default, with a warning naming the
            config the output needs.
        arch: Megatron checkpoints: the architecture whose names to write (``llama``,
            ``mistral``, ``qwen2``, ``qwen3``, ``mixtral``, ``qwen2_moe``, ``qwen3_moe``,
            ``deepseek_v3``); default: from the config, else from the checkpoint's ``args``.
            torchtitan checkpoints: the adapter family (``llama``, ``qwen3``, ``qwen3_moe``,
            ``deepseek_v3``); default: the config's ``model_type``.
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
    return run(
        src,
        dst,
        Options(
            dtype=dtype,
            max_shard_size=max_shard_size,
            config_from=config_from,
            include=include,
            exclude=exclude,
            num_threads=num_threads,
            copy_files=copy_files,
            overwrite=overwrite,
            fsync=fsync,
            progress=progress,
            step=step,
            role=role,
            metric=metric,
            higher_is_better=higher_is_better,
            drop_value_head=drop_value_head,
            arch=arch,
            lora=lora,
            lora_alpha=lora_alpha,
            lora_rslora=lora_rslora,
            with_optimizer=with_optimizer,
            ray_address=ray_address,
        ),
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

    STEP_OUTPUTS.add(dst_p.resolve())  # its step_N/ outputs are not steps of a training run
    try:
        if ray_address is None or len(numbers) == 1:
            return [one(n) for n in numbers]
        from fastckpt.cluster import connect

        connect(ray_address)  # once, before the threads
        with ThreadPoolExecutor(min(max_parallel, len(numbers)), "fastckpt-step") as pool:
            return list(pool.map(one, numbers))
    finally:
        STEP_OUTPUTS.discard(dst_p.resolve())


def inspect(
    path: PathLike,
    *,
    step: str | int | None = None,
    role: str | None = None,
    metric: str | None = None,
    higher_is_better: bool | None = None,
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
    return same_tensor(head, embed)


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
