"""Metrics of a step: the numbers a trainer logged beside its weights, and what their names mean.

``training_info.json`` (NeMo RL, veRL, ...) and OpenRLHF's ``metric.json`` hold them; the name
predicates tell quality metrics from bookkeeping (step counters, timings) for ``--step best`` and
``fastckpt ls``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastckpt.runs.model import Run

TRAINING_INFO = "training_info.json"
# training_info.json entries that are bookkeeping, not quality metrics
_BOOKKEEPING = frozenset(
    {"step", "current_step", "epoch", "current_epoch", "total_steps", "consumed_samples",
     "total_valid_tokens", "global_step", "iteration", "timestamp", "time", "wall_time"}
)  # fmt: skip


def _numeric(doc: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    if not isinstance(doc, dict):
        return out
    for k, v in doc.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        out[str(k)] = float(v)
    return out


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_metrics(step_dir: Path) -> dict[str, float]:
    """Numeric entries of ``training_info.json`` and of OpenRLHF's ``metric.json``."""
    metrics = _numeric(_load_json(step_dir / TRAINING_INFO))
    doc = _load_json(step_dir / "metric.json")
    if isinstance(doc, dict) and "metric_key" in doc:
        value = doc.get("metric_value")
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics[str(doc["metric_key"])] = float(value)
    elif doc is not None:
        metrics.update(_numeric(doc))
    return metrics


def is_step_counter(name: str) -> bool:
    """A ``training_info.json`` entry that repeats the step number."""
    return name in ("step", "current_step", "global_step", "iteration")


def is_noise(name: str) -> bool:
    """A logged number that says how training ran, not how good the model is (left out of
    ``fastckpt ls`` columns): step counters, timings, throughput, schedule, gradient norms."""
    return (
        is_step_counter(name)
        or name in ("epoch", "grad_norm", "learning_rate", "total_flos")
        or (name.endswith(("_runtime", "_per_second")))
    )


def is_bookkeeping(name: str) -> bool:
    """``training_info.json`` entries that count progress rather than measure quality."""
    return name in _BOOKKEEPING


def _default_metric(run: Run) -> str | None:
    """The run's only validation metric (or its only metric), if there is exactly one."""
    names = [n for n in run.metric_names() if n not in _BOOKKEEPING]
    val = [n for n in names if n.startswith(("val:", "val_", "val/", "eval", "validation"))]
    if len(val) == 1:
        return val[0]
    if not val and len(names) == 1:
        return names[0]
    return None
