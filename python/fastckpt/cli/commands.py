"""The ``fastckpt`` commands: convert, inspect, verify, push, ls, prune."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fastckpt.cli import console
from fastckpt.cli.options import (
    ArchOpt,
    Command,
    CommitMsgOpt,
    ConfigFromOpt,
    DirectionOpt,
    DropHeadOpt,
    DstArg,
    DtypeOpt,
    ExcludeOpt,
    FsyncOpt,
    IncludeOpt,
    JsonOpt,
    LoraAlphaOpt,
    LoraOpt,
    MetricOpt,
    OptimizerOpt,
    OverwriteOpt,
    PrivateOpt,
    PruneMetricOpt,
    PushOpt,
    QuietOpt,
    RayOpt,
    RevisionOpt,
    RoleOpt,
    RsloraOpt,
    RunArg,
    ShardSizeOpt,
    SrcArg,
    StepOpt,
    StepsOpt,
    ThreadsOpt,
)

app = typer.Typer(
    name="fastckpt",
    help="Convert sharded training checkpoints to Hugging Face safetensors, at copy speed.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # plain click help: rendering it with rich would double the start-up time of `--help`
    rich_markup_mode=None,
)


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


@app.command(cls=Command)
def convert(
    src: SrcArg,
    dst: DstArg,
    dtype: DtypeOpt = "keep",
    max_shard_size: ShardSizeOpt = "5GB",
    config_from: ConfigFromOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    threads: ThreadsOpt = None,
    overwrite: OverwriteOpt = False,
    fsync: FsyncOpt = True,
    quiet: QuietOpt = False,
    step: StepsOpt = None,
    role: RoleOpt = None,
    metric: MetricOpt = None,
    higher_is_better: DirectionOpt = None,
    ray: RayOpt = None,
    drop_value_head: DropHeadOpt = False,
    arch: ArchOpt = None,
    lora: LoraOpt = None,
    lora_alpha: LoraAlphaOpt = None,
    lora_rslora: RsloraOpt = None,
    with_optimizer: OptimizerOpt = False,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    commit_message: CommitMsgOpt = None,
) -> None:
    """Convert a checkpoint, or steps of a training run, into Hugging Face folders."""
    from fastckpt.api import convert as do_convert
    from fastckpt.api import convert_steps

    many = step is not None and (step.strip() == "all" or "," in step)
    if many and (metric is not None or higher_is_better is not None):
        console.err(
            "--metric/--lower-is-better choose one step (--step best); not with several steps"
        )
        raise typer.Exit(1)
    if many and push_to_hub is not None:
        console.err("--push-to-hub uploads one folder; push each DST/step_N/ with `fastckpt push`")
        raise typer.Exit(1)
    with console.errors(), console.progress_bar(console.show_progress(quiet)) as progress:
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
                    higher_is_better=higher_is_better,
                    **options,
                )
            ]
    for report in reports:
        for w in report.warnings:
            console.warn(w)
        if not quiet:
            for note in report.notes:
                typer.echo(note, err=True)
            typer.echo(console.summary(report), err=True)
    if push_to_hub is not None:
        _push(dst, push_to_hub, private, revision, commit_message, quiet)


@app.command(cls=Command)
def inspect(
    src: SrcArg,
    json_out: JsonOpt = False,
    step: StepOpt = None,
    role: RoleOpt = None,
    metric: MetricOpt = None,
    higher_is_better: DirectionOpt = None,
) -> None:
    """Show the format and the tensors (dtype, shape, chunks) of a checkpoint or a run's step."""
    from fastckpt.api import inspect as do_inspect

    with console.errors():
        info = do_inspect(
            src, step=step, role=role, metric=metric, higher_is_better=higher_is_better
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
        f"{console.plural(len(info.tensors), 'tensor')}, {info.total_bytes:,} bytes; {n_skipped} "
        f"non-model {'entry' if n_skipped == 1 else 'entries'} left out of conversion"
    )


@app.command(cls=Command)
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

    with console.errors():
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
            console.err(
                f"{len(report.mismatches)} tensors differ; first: {first} ({report.reasons[first]})"
            )
        if report.only_in_a:
            console.err(f"{len(report.only_in_a)} tensors only in {a}: {report.only_in_a[:5]}")
        if report.only_in_b:
            console.err(f"{len(report.only_in_b)} tensors only in {b}: {report.only_in_b[:5]}")
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

    with console.errors():
        report = push_to_hub(
            folder, repo, private=private, revision=revision, commit_message=commit_message
        )
    if not quiet:
        where = report.commit_url or report.repo_url
        typer.echo(f"uploaded {len(report.files)} files from {folder} to {where}", err=True)


@app.command(cls=Command)
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


@app.command("ls", cls=Command)
def ls_run(
    run: RunArg,
    role: RoleOpt = None,
    metric: MetricOpt = None,
    higher_is_better: DirectionOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List the steps of a training run: format, size, completeness, metrics; best marked."""
    from fastckpt.runs import listing

    with console.errors():
        doc = listing(run, role=role, metric=metric, higher_is_better=higher_is_better)
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
            console.human(s["size"]),
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
        console.warn(w)


@app.command(cls=Command)
def prune(
    run: RunArg,
    keep_top_k: Annotated[
        int, typer.Option(min=0, help="Complete steps to keep (plus the latest).")
    ],
    metric: PruneMetricOpt = None,
    higher_is_better: DirectionOpt = None,
    dry_run: Annotated[bool, typer.Option(help="Print what would be removed; remove nothing.")] = (
        False
    ),
) -> None:
    """Remove steps outside the top K by a metric; never the latest or a save in progress."""
    from fastckpt.fsops import clean_discarded, discard_tree
    from fastckpt.runs import leftovers, plan_prune, scan_run

    with console.errors():
        remove, warns = plan_prune(
            run, keep_top_k=keep_top_k, metric=metric, higher_is_better=higher_is_better
        )
        for w in warns:
            console.warn(w)
        for s in remove:
            for p in s.paths:
                typer.echo(f"{'would remove' if dry_run else 'removing'} {p}")
                if not dry_run:
                    discard_tree(p)
        if not dry_run:
            for root in {p.parent for p in leftovers(scan_run(run))}:
                for note in clean_discarded(root):
                    console.warn(note)
    if not remove:
        typer.echo("nothing to remove")


def main() -> None:
    """Console entry point."""
    app()
