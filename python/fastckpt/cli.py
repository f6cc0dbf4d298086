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
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from fastckpt.api import ConvertReport

app = typer.Typer(
    name="fastckpt",
    help="Convert sharded training checkpoints to Hugging Face safetensors, at copy speed.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

SrcArg = Annotated[Path, typer.Argument(help="Checkpoint: a DCP directory or safetensors folder.")]
DstArg = Annotated[Path, typer.Argument(help="Output folder (created; must not exist).")]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", help="Copy threads (default: CPU count).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON to stdout.")]


def _err(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[bold red]error:[/] {message}", markup=True
    )


def _warn(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[yellow]warning:[/] {message}", markup=True
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


def _describe(exc: BaseException) -> str:
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
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("convert", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _summary(report: ConvertReport) -> str:
    return (
        f"wrote {report.n_tensors} tensors, {report.nbytes / 1e9:.2f} GB in "
        f"{sum(f.endswith('.safetensors') for f in report.files)} files to {report.dst} "
        f"in {report.seconds:.2f} s ({report.gb_per_s:.2f} GB/s)"
    )


@app.command()
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
        list[str] | None, typer.Option(help="Regex adding tensors by name (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Regex removing tensors by name (repeatable).")
    ] = None,
    threads: ThreadsOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace DST if it exists.")] = False,
    fsync: Annotated[
        bool, typer.Option("--fsync/--no-fsync", help="Make the output durable (default on).")
    ] = True,
    quiet: QuietOpt = False,
) -> None:
    """Convert a checkpoint into a Hugging Face folder (safetensors + index + config)."""
    from fastckpt.api import convert as do_convert

    with _errors(), _progress_bar(_show_progress(quiet)) as progress:
        report = do_convert(
            src,
            dst,
            dtype=dtype,
            max_shard_size=max_shard_size,
            config_from=config_from,
            include=include,
            exclude=exclude,
            num_threads=threads,
            overwrite=overwrite,
            fsync=fsync,
            progress=progress,
        )
    for w in report.warnings:
        _warn(w)
    if not quiet:
        typer.echo(_summary(report), err=True)


@app.command()
def inspect(src: SrcArg, json_out: JsonOpt = False) -> None:
    """Show the format and the tensors (dtype, shape, chunks) of a checkpoint."""
    from fastckpt.api import inspect as do_inspect

    with _errors():
        info = do_inspect(src)
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
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{info.path} ({info.format})", title_justify="left")
    for col in ("name", "dtype", "shape", "chunks", "bytes"):
        table.add_column(col, justify="right" if col in ("chunks", "bytes") else "left")
    for t in info.tensors:
        table.add_row(t.name, t.dtype, str(list(t.shape)), str(t.chunks), f"{t.nbytes:,}")
    console = Console(highlight=False)
    console.print(table)
    console.print(
        f"{len(info.tensors)} tensors, {info.total_bytes:,} bytes; "
        f"{len(info.skipped)} non-model entries left out of conversion"
    )


@app.command()
def verify(
    a: Annotated[Path, typer.Argument(help="First checkpoint.")],
    b: Annotated[Path, typer.Argument(help="Second checkpoint.")],
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


def main() -> None:
    """Console entry point."""
    app()
