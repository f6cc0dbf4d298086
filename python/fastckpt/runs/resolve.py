"""From a run to what to convert, list or remove: ``--step``/``--role``/``--metric``, ls, prune.

:func:`resolve_source` is the convert hook (a run directory becomes the weights of one step);
:func:`listing` is what ``fastckpt ls`` prints; :func:`plan_prune` picks the steps to remove.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastckpt._core import FastckptError
from fastckpt.runs.discover import is_run_dir, scan_run
from fastckpt.runs.model import (
    PathLike,
    Resolved,
    Run,
    Step,
    direction,
    higher_is_better_for,
    rank_steps,
)


def resolve_source(
    src: PathLike,
    *,
    step: str | int | None = None,
    role: str | None = None,
    metric: str | None = None,
    higher_is_better: bool | None = None,
) -> Resolved:
    """Resolve ``src`` to a weights path when it is a run directory; else return it unchanged.

    Args:
        src: a checkpoint (returned as is) or a run directory.
        step: ``"latest"`` (default), ``"best"`` or a step number.
        role: ``"actor"``/``"policy"`` (default) or ``"critic"``.
        metric: the metric for ``step="best"`` (default: the run's only validation metric).
        higher_is_better: rank ``metric`` descending (``False``: ascending); default: ascending
            for a loss, perplexity or error metric, else descending.
    """
    p = Path(src)
    if not is_run_dir(p):
        if step is not None or role is not None or metric is not None:
            raise FastckptError(
                f"{p}: --step/--role/--metric need a run directory (step_N/, global_step_N/, "
                "iter_NNNNNNN/ or _actor/ inside), but this is a single checkpoint"
            )
        return Resolved(p)
    run = scan_run(p, role=role)
    chosen, warnings = run.select(step, metric=metric, higher_is_better=higher_is_better)
    assert chosen.weights is not None  # complete steps always have weights
    how = "latest" if step in (None, "latest") else "as requested"
    if step == "best" and metric is None and run.default_metric is None and run.best_step:
        how = "best as the trainer recorded it"
    elif step == "best":
        name = run.resolve_metric(metric)
        how = f"best by {name} = {chosen.metrics[name]:g}, {direction(name, higher_is_better)}"
    note = f"{run.layout} run: step {chosen.step} ({how}), role {run.role}: {chosen.weights}"
    return Resolved(chosen.weights, chosen, run, [note], warnings)


# ---------------------------------------------------------------- ls / prune


def leftovers(run: Run) -> list[Path]:
    """Hidden leftovers of interrupted step removals beside the run's steps (never listed)."""
    from fastckpt.fsops import discarded

    roots = {run.root, *(p.parent for s in run.steps for p in s.paths)}
    return sorted({d for r in roots for d in discarded(r)})


def listing(
    path: PathLike,
    *,
    role: str | None = None,
    metric: str | None = None,
    higher_is_better: bool | None = None,
) -> dict[str, Any]:
    """What ``fastckpt ls`` prints: every step with format, size, completeness, metrics, marks."""
    run = scan_run(path, role=role)
    name = metric if metric is not None else run.default_metric
    best: Step | None = None
    warnings: list[str] = []
    if name is not None:
        ranked, warnings = rank_steps(run.complete, name, higher_is_better=higher_is_better)
        best = ranked[0] if ranked else None
    elif run.best_step is not None:
        best = next((s for s in run.complete if s.step == run.best_step), None)
    warnings += [
        f"{p}: left by an interrupted removal (not a step); `fastckpt prune` or a new "
        "CheckpointManager removes it"
        for p in leftovers(run)
    ]
    latest: Step | None
    try:
        latest = run.latest()
    except FastckptError:
        latest = None
    return {
        "root": str(run.root),
        "layout": run.layout,
        "role": run.role,
        "metric": name,
        "higher_is_better": higher_is_better_for(name, higher_is_better) if name else None,
        "latest": latest.step if latest else None,
        "best": best.step if best else None,
        "steps": [
            {
                "step": s.step,
                "path": str(s.path),
                "weights": str(s.weights) if s.weights else None,
                "format": s.format,
                "size": s.size,
                "complete": s.complete,
                "reason": s.reason,
                "metrics": s.metrics,
                "latest": s is latest,
                "best": s is best,
            }
            for s in run.steps
        ],
        "warnings": warnings,
    }


def plan_prune(
    path: PathLike,
    *,
    keep_top_k: int,
    metric: str | None = None,
    higher_is_better: bool | None = None,
    role: str | None = None,
) -> tuple[list[Step], list[str]]:
    """Complete steps outside the top ``keep_top_k`` by ``metric`` (by recency without one).

    Never chosen: the latest step, an incomplete step (a save in progress), a step lacking the
    metric (it cannot be ranked; reported in the warnings).

    Returns:
        ``(steps_to_remove, warnings)``.
    """
    if keep_top_k < 1:
        raise FastckptError(f"--keep-top-k must be at least 1, got {keep_top_k}")
    run = scan_run(path, role=role)
    done = run.complete
    if not done:
        return [], []
    latest = run.latest()
    warnings: list[str] = []
    if metric is None:
        ranked = sorted(done, key=lambda s: s.step, reverse=True)
    else:
        ranked, lacking = rank_steps(done, metric, higher_is_better=higher_is_better)
        warnings += [w.replace("; skipped", "; kept") for w in lacking]
    remove = [s for s in ranked[keep_top_k:] if s is not latest]
    return sorted(remove, key=lambda s: s.step), warnings
