"""The ``fastckpt`` command line (typer + rich).

Examples:
    fastckpt convert results/grpo/step_100/policy/weights ./hf-step100 --dtype bf16
    fastckpt inspect results/grpo/step_100/policy/weights --json
    fastckpt verify results/grpo/step_100/policy/weights ./hf-step100
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import textwrap
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import typer.core

if TYPE_CHECKING:
    from fastckpt.api import ConvertReport


class _Command(typer.core.TyperCommand):
    """Usage lines in the usual form, ``fastckpt convert [OPTIONS] SRC DST`` (typer writes
    required arguments as ``{SRC}``)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:  # typer's own click Context
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p[:1] == "{" and p[-1:] == "}" else p for p in pieces]


app = typer.Typer(
    name="fastckpt",
    help="Convert sharded training checkpoints to Hugging Face safetensors, at copy speed.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # plain click help: rendering it with rich would double the start-up time of `--help`
    rich_markup_mode=None,
)

SrcArg = Annotated[
    Path,
    typer.Argument(
        metavar="SRC",
        help="Checkpoint (DCP dir, veRL rank files, .pt state dict, safetensors) or a run dir.",
        show_default=False,
    ),
]
DstArg = Annotated[
    Path,
    typer.Argument(
        metavar="DST", help="Output folder (created; must not exist).", show_default=False
    ),
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", min=1, help="Copy threads (default: CPU count).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON to stdout.")]
StepOpt = Annotated[
    str | None,
    typer.Option(help="For a run directory: latest (default), best, or a step number."),
]
StepsOpt = Annotated[
    str | None,
    typer.Option(
        "--step",
        help="For a run directory: latest (default), best, a step number, or several steps "
        "(all, or 100,200,300: DST/step_N/ each).",
    ),
]
RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="ADDRESS",
        help="Write the shards on a Ray cluster (auto: RAY_ADDRESS or the running one); its "
        "nodes must share the filesystem. pip install 'fastckpt[ray]'.",
    ),
]
RoleOpt = Annotated[
    str | None, typer.Option(help="For a run directory: actor|policy (default) or critic.")
]
MetricOpt = Annotated[
    str | None, typer.Option(help="training_info.json metric ranking --step best.")
]
PruneMetricOpt = Annotated[
    str | None,
    typer.Option(help="training_info.json metric ranking the steps (default: the run's only one)."),
]
LowerOpt = Annotated[
    bool, typer.Option("--lower-is-better", help="A lower metric is better (e.g. a loss).")
]
PrivateOpt = Annotated[bool, typer.Option("--private", help="Create the Hub repo private.")]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub branch to commit to.")]
CommitMsgOpt = Annotated[str | None, typer.Option(help="Hub commit message.")]
RunArg = Annotated[Path, typer.Argument(metavar="RUN", help="Training run directory.")]
WRAP = 100  # columns of a wrapped warning


def _version(value: bool) -> None:
    if value:
        from fastckpt._core import __version__

        typer.echo(f"fastckpt {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Convert sharded training checkpoints to Hugging Face safetensors, at copy speed."""


def _err(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[bold red]error:[/] {message}", markup=True
    )


def _warn(message: str) -> None:
    """A warning wrapped at word boundaries (paths and names are never split)."""
    from rich.console import Console
    from rich.markup import escape

    lines = textwrap.wrap(
        message,
        width=WRAP - len("warning: "),
        subsequent_indent="  ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        "[yellow]warning:[/] " + escape("\n".join(lines)), markup=True
    )


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn expected failures into one line on stderr and exit code 1."""
    from fastckpt._core import FastckptError

    try:
        yield
    except (FastckptError, OSError) as exc:
        if os.environ.get("FASTCKPT_DEBUG"):
            traceback.print_exc()
        _err(_describe(exc))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        _err("interrupted; no output was left behind")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as exc:  # a bug, not bad input: still one line (traceback with DEBUG)
        if os.environ.get("FASTCKPT_DEBUG"):
            traceback.print_exc()
        _err(
            f"internal error ({type(exc).__name__}: {str(exc)[:300]}); please report it "
            "(FASTCKPT_DEBUG=1 prints the traceback)"
        )
        raise typer.Exit(2) from None


def _describe(exc: BaseException) -> str:
    from fastckpt.api import DestinationExistsError

    if isinstance(exc, DestinationExistsError):
        return f"destination {exc.path} already exists (--overwrite replaces it)"
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror.lower()}"
    return str(exc)


def _show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty() and not os.environ.get("FASTCKPT_DISABLE_PROGRESS")


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        # shown from the first report on, when the total is known (no "0/? bytes")
        task = bar.add_task("converting", total=None, visible=False)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, visible=True)

        yield update


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _summary(report: ConvertReport) -> str:
    files = sum(f.endswith(".safetensors") for f in report.files)
    speed = _human(int(report.nbytes / report.seconds)) if report.seconds > 0 else "-"
    return (
        f"wrote {_plural(report.n_tensors, 'tensor')}, {_human(report.nbytes)} in "
        f"{_plural(files, 'file')} to {report.dst} in {report.seconds:.2f} s ({speed}/s)"
    )


@app.command(cls=_Command)
def convert(
    src: SrcArg,
    dst: DstArg,
    dtype: Annotated[
        str, typer.Option(help="keep | bf16 | fp16 | fp32 (floating tensors only).")
    ] = "keep",
    max_shard_size: Annotated[
        str, typer.Option(help="Largest shard, decimal units (5GB, 500MB) or bytes.")
    ] = "5GB",
    config_from: Annotated[
        Path | None,
        typer.Option(help="Folder to copy config/tokenizer files from (e.g. the base model)."),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option(metavar="REGEX", help="Regex adding tensors by name (repeatable)."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(metavar="REGEX", help="Regex removing tensors by name (repeatable)."),
    ] = None,
    threads: ThreadsOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace DST if it exists.")] = False,
    fsync: Annotated[
        bool, typer.Option("--fsync/--no-fsync", help="Make the output durable (default on).")
    ] = True,
    quiet: QuietOpt = False,
    step: StepsOpt = None,
    role: RoleOpt = None,
    metric: MetricOpt = None,
    lower_is_better: LowerOpt = False,
    ray: RayOpt = None,
    drop_value_head: Annotated[
        bool,
        typer.Option(help="Leave out a value head (score.*, v_head.*): export the policy."),
    ] = False,
    arch: Annotated[
        str | None,
        typer.Option(
            help="Megatron: architecture whose HF names to write (llama, mistral, qwen2, qwen3, "
            "mixtral, qwen2_moe, qwen3_moe, deepseek_v3); default: from the config, else from "
            "args."
        ),
    ] = None,
    lora: Annotated[
        str | None,
        typer.Option(
            help="PEFT LoRA tensors: merge (W + alpha/r*B@A), adapter (adapter_model.safetensors "
            "+ adapter_config.json) or strip (base weights only). Required when there are any."
        ),
    ] = None,
    lora_alpha: Annotated[
        float | None,
        typer.Option(help="LoRA alpha, when no lora_train_meta.json/adapter_config.json has it."),
    ] = None,
    lora_rslora: Annotated[
        bool | None,
        typer.Option(
            "--lora-rslora/--no-lora-rslora",
            help="Adapters trained with rsLoRA (scale alpha/sqrt(r)); default: from "
            "adapter_config.json, else off.",
            show_default=False,
        ),
    ] = None,
    with_optimizer: Annotated[
        bool,
        typer.Option(
            help="Also write optimizer.safetensors (state.<fqn>.<name>) + optimizer.json."
        ),
    ] = False,
    push_to_hub: Annotated[
        str | None, typer.Option(help="Upload DST to this Hub repo (pip install 'fastckpt[hub]').")
    ] = None,
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    commit_message: CommitMsgOpt = None,
) -> None:
    """Convert a checkpoint, or steps of a training run, into Hugging Face folders."""
    from fastckpt.api import convert as do_convert
    from fastckpt.api import convert_steps

    many = step is not None and (step.strip() == "all" or "," in step)
    if many and (metric is not None or lower_is_better):
        _err("--metric/--lower-is-better choose one step (--step best); not with several steps")
        raise typer.Exit(1)
    if many and push_to_hub is not None:
        _err("--push-to-hub uploads one folder; push each DST/step_N/ with `fastckpt push`")
        raise typer.Exit(1)
    with _errors(), _progress_bar(_show_progress(quiet)) as progress:
        options: dict[str, Any] = dict(
            dtype=dtype,
            max_shard_size=max_shard_size,
            config_from=config_from,
            include=include,
            exclude=exclude,
            num_threads=threads,
            overwrite=overwrite,
            fsync=fsync,
            progress=progress,
            role=role,
            drop_value_head=drop_value_head,
            arch=arch,
            lora=lora,
            lora_alpha=lora_alpha,
            lora_rslora=lora_rslora,
            with_optimizer=with_optimizer,
            ray_address=ray,
        )
        if many:
            assert step is not None
            reports = convert_steps(src, dst, steps=step, **options)
        else:
            reports = [
                do_convert(
                    src,
                    dst,
                    step=step,
                    metric=metric,
                    higher_is_better=not lower_is_better,
                    **options,
                )
            ]
    for report in reports:
        for w in report.warnings:
            _warn(w)
        if not quiet:
            for note in report.notes:
                typer.echo(note, err=True)
            typer.echo(_summary(report), err=True)
    if push_to_hub is not None:
        _push(dst, push_to_hub, private, revision, commit_message, quiet)


@app.command(cls=_Command)
def inspect(
    src: SrcArg,
    json_out: JsonOpt = False,
    step: StepOpt = None,
    role: RoleOpt = None,
    metric: MetricOpt = None,
    lower_is_better: LowerOpt = False,
) -> None:
    """Show the format and the tensors (dtype, shape, chunks) of a checkpoint or a run's step."""
    from fastckpt.api import inspect as do_inspect

    with _errors():
        info = do_inspect(
            src, step=step, role=role, metric=metric, higher_is_better=not lower_is_better
        )
    if json_out:
        doc = {
            "path": str(info.path),
            "format": info.format,
            "total_bytes": info.total_bytes,
            "tensors": [
                {
                    "name": t.name,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "chunks": t.chunks,
                    "nbytes": t.nbytes,
                }
                for t in info.tensors
            ],
            "skipped": info.skipped,
            "notes": info.notes,
        }
        typer.echo(json.dumps(doc, indent=2))
        return
    # plain aligned columns: names are never cut, whatever the terminal width, and grep works
    rows = [("name", "dtype", "shape", "chunks", "bytes")]
    rows += [
        (t.name, t.dtype, str(list(t.shape)), str(t.chunks), f"{t.nbytes:,}") for t in info.tensors
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    typer.echo(f"{info.path} ({info.format})")
    for r in rows:
        left = "  ".join(c.ljust(w) for c, w in zip(r[:3], widths[:3], strict=True))
        right = "  ".join(c.rjust(w) for c, w in zip(r[3:], widths[3:], strict=True))
        typer.echo(f"{left}  {right}")
    n_skipped = len(info.skipped)
    typer.echo(
        f"{_plural(len(info.tensors), 'tensor')}, {info.total_bytes:,} bytes; {n_skipped} "
        f"non-model {'entry' if n_skipped == 1 else 'entries'} left out of conversion"
    )


@app.command(cls=_Command)
def verify(
    a: Annotated[
        Path, typer.Argument(metavar="A", help="First checkpoint (a run dir: its latest step).")
    ],
    b: Annotated[
        Path, typer.Argument(metavar="B", help="Second checkpoint (a run dir: its latest step).")
    ],
    json_out: JsonOpt = False,
) -> None:
    """Compare the model tensors of two checkpoints bit for bit; exit 1 on any difference."""
    from fastckpt.api import verify as do_verify

    with _errors():
        report = do_verify(a, b)
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "ok": report.ok,
                    "n_tensors": report.n_tensors,
                    "mismatches": report.mismatches,
                    "reasons": report.reasons,
                    "only_in_a": report.only_in_a,
                    "only_in_b": report.only_in_b,
                    "notes": report.notes,
                },
                indent=2,
            )
        )
    elif report.ok:
        typer.echo(f"ok: {report.n_tensors} tensors identical")
    if not report.ok:
        if report.mismatches:
            first = report.mismatches[0]
            _err(
                f"{len(report.mismatches)} tensors differ; first: {first} ({report.reasons[first]})"
            )
        if report.only_in_a:
            _err(f"{len(report.only_in_a)} tensors only in {a}: {report.only_in_a[:5]}")
        if report.only_in_b:
            _err(f"{len(report.only_in_b)} tensors only in {b}: {report.only_in_b[:5]}")
        raise typer.Exit(1)


def _push(
    folder: Path,
    repo: str,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    quiet: bool,
) -> None:
    from fastckpt.output.hub import push_to_hub

    with _errors():
        report = push_to_hub(
            folder, repo, private=private, revision=revision, commit_message=commit_message
        )
    if not quiet:
        where = report.commit_url or report.repo_url
        typer.echo(f"uploaded {len(report.files)} files from {folder} to {where}", err=True)


@app.command(cls=_Command)
def push(
    folder: Annotated[Path, typer.Argument(help="A converted Hugging Face folder.")],
    repo: Annotated[str, typer.Argument(help="Hub repository, user/name or org/name.")],
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    commit_message: CommitMsgOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Upload a converted folder to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)."""
    _push(folder, repo, private, revision, commit_message, quiet)


@app.command("ls", cls=_Command)
def ls_run(
    run: RunArg,
    role: RoleOpt = None,
    metric: MetricOpt = None,
    lower_is_better: LowerOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """List the steps of a training run: format, size, completeness, metrics; best marked."""
    from fastckpt.runs import listing

    with _errors():
        doc = listing(run, role=role, metric=metric, higher_is_better=not lower_is_better)
    if json_out:
        typer.echo(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    from fastckpt.runs import is_noise

    names: list[str] = []
    for s in doc["steps"]:  # every metric found; the step number has its own column
        names += [k for k in s["metrics"] if k not in names and not is_noise(k)]
    if doc["metric"] and doc["metric"] not in names:
        names.append(doc["metric"])
    table = Table(
        title=f"{doc['root']} ({doc['layout']}, role {doc['role']})", title_justify="left"
    )
    for col in ("step", "format", "size", "complete", *names, ""):
        table.add_column(col, justify="right" if col not in ("format", "complete", "") else "left")
    for s in doc["steps"]:
        marks = " ".join(m for m, on in (("best", s["best"]), ("latest", s["latest"])) if on)
        table.add_row(
            str(s["step"]),
            s["format"],
            _human(s["size"]),
            "yes" if s["complete"] else "NO",
            *[f"{s['metrics'][k]:g}" if k in s["metrics"] else "-" for k in names],
            marks,
        )
    # piped: as wide as the table needs (columns are never squeezed into "…")
    width = None if sys.stdout.isatty() else 1000
    Console(highlight=False, soft_wrap=True, width=width).print(table)
    if doc["metric"]:
        order = "higher" if doc["higher_is_better"] else "lower"
        typer.echo(f"best by {doc['metric']} ({order} is better): {doc['best']}")
    for s in doc["steps"]:
        if not s["complete"]:
            typer.echo(f"step {s['step']} incomplete: {s['reason']}")
    for w in doc["warnings"]:
        _warn(w)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


@app.command(cls=_Command)
def prune(
    run: RunArg,
    keep_top_k: Annotated[
        int, typer.Option(min=0, help="Complete steps to keep (plus the latest).")
    ],
    metric: PruneMetricOpt = None,
    lower_is_better: LowerOpt = False,
    dry_run: Annotated[bool, typer.Option(help="Print what would be removed; remove nothing.")] = (
        False
    ),
) -> None:
    """Remove steps outside the top K by a metric; never the latest or a save in progress."""
    from fastckpt.fsops import clean_discarded, discard_tree
    from fastckpt.runs import leftovers, plan_prune, scan_run

    with _errors():
        remove, warns = plan_prune(
            run, keep_top_k=keep_top_k, metric=metric, higher_is_better=not lower_is_better
        )
        for w in warns:
            _warn(w)
        for s in remove:
            for p in s.paths:
                typer.echo(f"{'would remove' if dry_run else 'removing'} {p}")
                if not dry_run:
                    discard_tree(p)
        if not dry_run:
            for root in {p.parent for p in leftovers(scan_run(run))}:
                for note in clean_discarded(root):
                    _warn(note)
    if not remove:
        typer.echo("nothing to remove")


def main() -> None:
    """Console entry point."""
    app()
