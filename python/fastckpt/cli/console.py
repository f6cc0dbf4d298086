"""What the command line prints: errors and warnings on stderr, the progress bar, summaries."""

from __future__ import annotations

import contextlib
import os
import sys
import textwrap
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from fastckpt.api import ConvertReport

WRAP = 100  # columns of a wrapped warning


def err(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[bold red]error:[/] {message}", markup=True
    )


def warn(message: str) -> None:
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
def errors() -> Iterator[None]:
    """Turn expected failures into one line on stderr and exit code 1."""
    from fastckpt._core import FastckptError

    try:
        yield
    except (FastckptError, OSError) as exc:
        if os.environ.get("FASTCKPT_DEBUG"):
            traceback.print_exc()
        err(describe(exc))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err("interrupted; no output was left behind")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as exc:  # a bug, not bad input: still one line (traceback with DEBUG)
        if os.environ.get("FASTCKPT_DEBUG"):
            traceback.print_exc()
        err(
            f"internal error ({type(exc).__name__}: {str(exc)[:300]}); please report it "
            "(FASTCKPT_DEBUG=1 prints the traceback)"
        )
        raise typer.Exit(2) from None


def describe(exc: BaseException) -> str:
    from fastckpt.api import DestinationExistsError

    if isinstance(exc, DestinationExistsError):
        return f"destination {exc.path} already exists (--overwrite replaces it)"
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror.lower()}"
    return str(exc)


def show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty() and not os.environ.get("FASTCKPT_DISABLE_PROGRESS")


@contextlib.contextmanager
def progress_bar(enabled: bool) -> Iterator[Any]:
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


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def summary(report: ConvertReport) -> str:
    files = sum(f.endswith(".safetensors") for f in report.files)
    speed = human(int(report.nbytes / report.seconds)) if report.seconds > 0 else "-"
    return (
        f"wrote {plural(report.n_tensors, 'tensor')}, {human(report.nbytes)} in "
        f"{plural(files, 'file')} to {report.dst} in {report.seconds:.2f} s ({speed}/s)"
    )


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
