"""A conversion as a pipeline of small stages over one :class:`Plan`.

::

    open_source   resolve a run to one step, catalogue it, check the destination
    select        which catalogue entries are written (model split, --include/--exclude, LoRA)
    find_config   config and tokenizer files, or a config derived from Megatron args
    transform     value head, locate the chunks, LoRA merge/adapter/strip, optimizer state
    tie           leave out an lm_head equal to the tied embedding
    plan_shards   output dtype per tensor, shards of at most max_shard_size
    write         Rust writes the shards into a temporary sibling; index, side files; rename

Each stage reads and extends the plan; none writes outside the temporary folder except the final
rename. :func:`fastckpt.api.convert` composes them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastckpt import _core
from fastckpt._core import FastckptError, FormatError, MappingError, ShapeError
from fastckpt.catalog import Catalogue, TensorEntry
from fastckpt.formats.registry import open_catalogue
from fastckpt.fsops import Owner, check_replaceable, move_into_place, reclaim_stale
from fastckpt.output.folder import copy_side_files, fsync_dir, index_bytes, shard_names, write_file
from fastckpt.runs import is_run_dir, looks_like_step, resolve_source
from fastckpt.side_files import TORCH_DTYPE_NAMES, SideFiles, find_side_files, tie_word_embeddings
from fastckpt.transforms.heads import split_value_head
from fastckpt.transforms.lora import LoraPlan, adapter_config_bytes, has_lora
from fastckpt.transforms.lora import plan as plan_lora
from fastckpt.transforms.optimizer import OptimizerState, read_optimizer

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


def target_dtype(dtype: str | None) -> str | None:
    """The safetensors dtype that ``--dtype`` asks for; None keeps every tensor's own."""
    if dtype is None or dtype == "keep":
        return None
    try:
        return _DTYPE_OPTIONS[dtype.lower()]
    except KeyError:
        raise FastckptError(f"invalid dtype {dtype!r} (use keep, bf16, fp16 or fp32)") from None


@dataclass
class ConvertReport:
    """What :func:`fastckpt.convert` wrote."""

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


class DestinationExistsError(FastckptError):
    """The destination exists and ``overwrite`` was not given."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"destination {path} already exists (overwrite=True replaces it)")
        self.path = path


@dataclass
class Options:
    """The keyword arguments of :func:`fastckpt.convert` (documented there)."""

    dtype: str | None = None
    max_shard_size: int | str = "5GB"
    config_from: PathLike | None = None
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    num_threads: int | None = None
    copy_files: bool = True
    overwrite: bool = False
    fsync: bool = True
    progress: Progress | None = None
    step: str | int | None = None
    role: str | None = None
    metric: str | None = None
    higher_is_better: bool | None = None
    drop_value_head: bool = False
    arch: str | None = None
    lora: str | None = None
    lora_alpha: float | None = None
    lora_rslora: bool | None = None
    with_optimizer: bool = False
    ray_address: str | None = None


@dataclass
class Plan:
    """Everything the stages decide, in the order they decide it."""

    opts: Options
    src: Path  # the weights read (one step of a run, when given a run)
    dst: Path
    target: str | None  # --dtype, as a safetensors dtype
    shard_limit: int
    cat: Catalogue
    notes: list[str]
    warnings: list[str]
    start: float
    names: list[str] = field(default_factory=list)
    side: SideFiles = field(default_factory=SideFiles)
    config: dict[str, object] | None = None
    write_derived: bool = False  # config.json is derived from Megatron args
    entries: list[TensorEntry] = field(default_factory=list)
    lora: LoraPlan | None = None
    optim: OptimizerState | None = None
    jobs: list[tuple[TensorEntry, str]] = field(default_factory=list)  # entry, output dtype
    sizes: list[int] = field(default_factory=list)
    shards: list[list[int]] = field(default_factory=list)  # job indices per output file
    files: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    nbytes: int = 0

    @property
    def adapter(self) -> bool:
        """The output is a PEFT adapter folder, not a model."""
        return self.lora is not None and self.lora.adapter_config is not None


#: folders that :func:`fastckpt.convert_steps` is filling with ``step_N/`` outputs (resolved)
STEP_OUTPUTS: set[Path] = set()


def check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse a destination that is a link, inside or around the source, a step-like name in a
    run, or an existing folder without ``overwrite``."""
    if dst.is_symlink():
        raise FastckptError(
            f"destination {dst} is a symbolic link (to {os.readlink(dst)}); pass the real "
            "folder, or remove the link"
        )
    s, d = src.resolve(), dst.resolve()
    if looks_like_step(d.name) and d.parent not in STEP_OUTPUTS and is_run_dir(d.parent):
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


def select_names(
    cat: Catalogue, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> list[str]:
    """Model entries plus those ``include`` names, less those ``exclude`` names."""
    inc = [re.compile(p) for p in include or ()]
    exc = [re.compile(p) for p in exclude or ()]
    names = []
    for name, meta in cat.tensors.items():
        chosen = meta.is_model or any(p.search(name) or p.search(meta.key) for p in inc)
        if chosen and not any(p.search(name) for p in exc):
            names.append(name)
    return names


def same_tensor(a: TensorEntry, b: TensorEntry) -> bool:
    """Equal dtype, shape and bytes (compared by digest, chunk by chunk, in Rust)."""
    if a.meta.dtype != b.meta.dtype or a.meta.shape != b.meta.shape:
        return False
    return _core.digest(a.source()) == _core.digest(b.source())


# --------------------------------------------------------------------------------------------
# stages


def open_source(src: PathLike, dst: PathLike, opts: Options) -> Plan:
    """Resolve a run to the weights of one step, catalogue them, check the destination."""
    start = time.perf_counter()
    resolved = resolve_source(
        src, step=opts.step, role=opts.role, metric=opts.metric,
        higher_is_better=opts.higher_is_better,
    )  # fmt: skip
    src_p, dst_p = resolved.weights, Path(dst)
    target = target_dtype(opts.dtype)
    shard_limit = parse_size(opts.max_shard_size)
    given = opts.config_from
    given_config = find_side_files([Path(given)]).config if given is not None else None
    cat = open_catalogue(src_p, arch=opts.arch, hf_config=given_config)
    check_paths(src_p, dst_p, opts.overwrite)
    return Plan(
        opts=opts,
        src=src_p,
        dst=dst_p,
        target=target,
        shard_limit=shard_limit,
        cat=cat,
        notes=[*resolved.notes, *cat.notes],
        warnings=[*resolved.warnings, *cat.warnings],
        start=start,
    )


def select(plan: Plan) -> None:
    """Choose the entries to write; refuse an unclear model split or undecided LoRA tensors."""
    opts, cat = plan.opts, plan.cat
    if cat.undecided is not None and not opts.include:
        raise FormatError(f"{plan.src}: {cat.undecided}")
    names = select_names(cat, opts.include, opts.exclude)
    if not names:
        raise MappingError(f"{plan.src}: no model tensors selected (see `fastckpt inspect`)")
    if TITAN_EMBED in names and EMBED not in names:
        plan.warnings.append(
            f"tensor names are torchtitan's ({TITAN_EMBED}, layers.N.attention.*): fastckpt maps "
            "them to Hugging Face names only with the model's config.json (--config-from DIR, "
            "or a config.json beside the checkpoint; families llama, qwen3, qwen3_moe, "
            "deepseek_v3), so they are written as they are and transformers cannot load the "
            "folder as a model"
        )
    if opts.lora is None and has_lora(names):
        shown = next(n for n in names if ".lora_" in n or ".base_layer." in n)
        raise MappingError(
            f"{plan.src}: the checkpoint holds LoRA tensors (e.g. {shown!r}); choose what to "
            "write with --lora merge|adapter|strip (lora=...)"
        )
    plan.names = names


def find_config(plan: Plan) -> None:
    """Side files from ``--config-from`` or beside the checkpoint; a derived config for Megatron
    when none is found; a warning when the output will have no config."""
    opts, cat = plan.opts, plan.cat
    if opts.config_from is not None:
        cfg_dir = Path(opts.config_from)
        if not cfg_dir.is_dir():
            raise FileNotFoundError(2, "config folder not found", str(cfg_dir))
        plan.side = find_side_files([cfg_dir])
    else:
        plan.side = find_side_files(cat.side_dirs)
    plan.warnings += plan.side.skipped if opts.copy_files else []
    config = plan.side.config
    # Megatron: a config from its args (made, and maybe refused, only when it is needed)
    derived = getattr(cat.reader, "derived_config", None)
    derived = derived if opts.copy_files and config is None else None
    if isinstance(derived, dict):
        config = derived
        plan.write_derived = True
        plan.warnings.append(
            "no config.json found: wrote one derived from the Megatron args (architecture "
            f"{derived.get('architectures')}); check it, or pass --config-from DIR (the base "
            "model's folder) to copy the real config and tokenizer"
        )
    elif opts.copy_files and config is None:
        given = opts.config_from
        looked = [str(given)] if given else [str(d) for d in cat.side_dirs]
        plan.warnings.append(
            "no config.json found (looked in: " + ", ".join(looked) + "); wrote the weights "
            "only: transformers cannot load the folder until you add config and tokenizer "
            "files (pass --config-from DIR, e.g. the base model's folder)"
        )
    plan.config = config


def transform(plan: Plan, owner: Owner) -> None:
    """Value head, then the entries' chunks, then LoRA (merges spill under the temporary
    folder, computed in :func:`write`), then the optimizer state."""
    opts, cat = plan.opts, plan.cat
    names, head_warnings = split_value_head(
        plan.names, drop=opts.drop_value_head, config=plan.config
    )
    plan.warnings += head_warnings
    if not names:
        raise MappingError(f"{plan.src}: no model tensors left after dropping the value head")
    plan.names = names
    plan.entries = cat.locate(names)
    if opts.lora is not None:
        src_dir = plan.src if plan.src.is_dir() else plan.src.parent
        dirs = [cat.path if cat.path.is_dir() else cat.path.parent, src_dir, src_dir.parent]
        dirs += [Path(opts.config_from)] if opts.config_from is not None else []
        plan.lora = plan_lora(
            plan.entries,
            opts.lora,
            dirs=list(dict.fromkeys([*dirs, *cat.side_dirs])),
            spill_dir=owner.tmp / ".lora-merge",
            alpha=opts.lora_alpha,
            rslora=opts.lora_rslora,
            config=plan.config,
        )
        plan.entries = plan.lora.entries
        plan.warnings += plan.lora.warnings
    plan.optim = read_optimizer(cat) if opts.with_optimizer else None
    plan.warnings += plan.optim.warnings if plan.optim is not None else []


def tie(plan: Plan) -> None:
    """When config.json ties the embeddings, leave out an ``lm_head`` equal to the embedding
    (as transformers saves); keep both, with a warning, when they differ."""
    by_name = {e.name: e for e in plan.entries}
    merged = set(plan.lora.out_dtype) if plan.lora else set()
    if (
        LM_HEAD not in by_name
        or EMBED not in by_name
        or merged & {LM_HEAD, EMBED}
        or not tie_word_embeddings(plan.config)
    ):
        return
    if same_tensor(by_name[LM_HEAD], by_name[EMBED]):
        plan.entries = [e for e in plan.entries if e.name != LM_HEAD]
    else:
        plan.warnings.append(
            f"config.json ties the word embeddings but {LM_HEAD} differs from {EMBED}: "
            "kept both; transformers may re-tie them on load"
        )


def plan_shards(plan: Plan) -> None:
    """Output dtype of every tensor (``--dtype`` casts floats only), then the shards."""
    lplan = plan.lora
    for e in plan.entries:
        stored = lplan.out_dtype.get(e.name, e.meta.dtype) if lplan else e.meta.dtype
        out = plan.target if plan.target is not None and stored in _FLOATS else stored
        plan.jobs.append((e, out))
    plan.sizes = [e.meta.numel * _core.dtype_size(out) for e, out in plan.jobs]
    if plan.adapter:
        plan.shards = [list(range(len(plan.jobs)))]
        plan.files = ["adapter_model.safetensors"]
    else:
        plan.shards = _core.plan_shards(plan.sizes, plan.shard_limit)
        plan.files = shard_names(len(plan.shards)) if plan.shards else []


def _writer(plan: Plan) -> Callable[..., int]:
    """The Rust writer, or the one that runs it as Ray tasks on the cluster's nodes."""
    if plan.opts.ray_address is None:
        return _core.write_shards
    from fastckpt.cluster import ray_writer  # Ray is imported only here

    files_read = {c.path for e, _ in plan.jobs for c in e.chunks}
    files_read |= {c.path for e in plan.optim.entries for c in e.chunks} if plan.optim else set()
    return ray_writer(plan.opts.ray_address, sources=sorted(files_read), parent=plan.dst.parent)


def write_tensors(plan: Plan, tmp: Path, write: Callable[..., int]) -> None:
    """LoRA merges, then every shard (and the optimizer's) into ``tmp``, by ``write``."""
    opts, optim = plan.opts, plan.optim
    for merge in plan.lora.merges if plan.lora else []:
        merge.compute()  # W + s * B @ A in fp32, spilled under tmp/.lora-merge
    shards = [
        (fname, [(plan.jobs[i][0].source(), plan.jobs[i][1]) for i in idx])
        for fname, idx in zip(plan.files, plan.shards, strict=True)
    ]
    if optim is not None and optim.entries:
        shards.append(
            ("optimizer.safetensors", [(e.source(), e.meta.dtype) for e in optim.entries])
        )
    try:
        plan.nbytes = write(
            str(tmp), shards, num_threads=opts.num_threads, fsync=opts.fsync,
            progress=opts.progress,
        )  # fmt: skip
    except ShapeError as exc:  # chunk coverage or sizes: name the checkpoint too
        raise ShapeError(f"{plan.src}: {exc}") from None
    shutil.rmtree(tmp / ".lora-merge", ignore_errors=True)
    plan.written = list(plan.files)
    if optim is not None and optim.entries:
        plan.written.append("optimizer.safetensors")


def write_extras(plan: Plan, tmp: Path) -> None:
    """optimizer.json, adapter_config.json, the index, side files and a derived config."""
    fsync, side = plan.opts.fsync, plan.side
    if plan.optim is not None:
        write_file(tmp / "optimizer.json", plan.optim.json_bytes(), fsync=fsync)
        plan.written.append("optimizer.json")
    if plan.lora is not None and plan.lora.adapter_config is not None:
        data = adapter_config_bytes(plan.lora.adapter_config)
        write_file(tmp / "adapter_config.json", data, fsync=fsync)
        plan.written.append("adapter_config.json")
        side.files.pop("config.json", None)  # an adapter folder: tokenizer files only
        side.files.pop("generation_config.json", None)
        plan.write_derived = False
    if len(plan.files) > 1:
        weight_map = {
            plan.jobs[i][0].name: fname
            for fname, idx in zip(plan.files, plan.shards, strict=True)
            for i in idx
        }
        params = sum(e.meta.numel for e, _ in plan.jobs)
        data = index_bytes(weight_map, sum(plan.sizes), params)
        write_file(tmp / "model.safetensors.index.json", data, fsync=fsync)
        plan.written.append("model.safetensors.index.json")
    if not plan.opts.copy_files:
        return
    plan.written += copy_side_files(side, tmp, cast_to=plan.target, fsync=fsync)
    if plan.write_derived and plan.config is not None and "config.json" not in plan.written:
        derived = dict(plan.config)
        if plan.target is not None:
            derived["torch_dtype"] = derived["dtype"] = TORCH_DTYPE_NAMES[plan.target]
        data = (json.dumps(derived, indent=2) + "\n").encode()
        write_file(tmp / "config.json", data, fsync=fsync)
        plan.written.append("config.json")


def write(plan: Plan, owner: Owner) -> None:
    """Fill the owned temporary sibling of the destination, then rename it into place."""
    fsync = plan.opts.fsync
    plan.dst.parent.mkdir(parents=True, exist_ok=True)
    writer = _writer(plan)  # Ray: connects and checks the shared filesystem first
    plan.warnings += reclaim_stale(plan.dst.parent)
    owner.acquire()
    try:
        owner.tmp.mkdir()
        write_tensors(plan, owner.tmp, writer)
        write_extras(plan, owner.tmp)
        if fsync:
            fsync_dir(owner.tmp)
        move_into_place(owner, overwrite=plan.opts.overwrite)
        if fsync:
            fsync_dir(plan.dst.parent)
    finally:
        owner.release()


def run(src: PathLike, dst: PathLike, opts: Options) -> ConvertReport:
    """Every stage, in order."""
    plan = open_source(src, dst, opts)
    select(plan)
    find_config(plan)
    owner = Owner(plan.dst)
    transform(plan, owner)
    tie(plan)
    plan_shards(plan)
    write(plan, owner)
    return ConvertReport(
        dst=plan.dst,
        files=plan.written,
        n_tensors=len(plan.jobs),
        nbytes=plan.nbytes,
        seconds=time.perf_counter() - plan.start,
        warnings=plan.warnings,
        notes=plan.notes,
    )
