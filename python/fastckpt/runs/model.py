"""What a run is: its steps (:class:`Step`), the run itself (:class:`Run`), a resolved source.

A :class:`Run` chooses among its steps (latest, best by a metric, a number); the layouts in
:mod:`fastckpt.runs.layouts` build it and :mod:`fastckpt.runs.discover` finds which one applies.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fastckpt._core import FastckptError

PathLike = str | os.PathLike[str]

ROLES = ("actor", "policy", "critic")


@dataclass
class Step:
    """One checkpoint of a run, for one role.

    Attributes:
        step: the training step (Megatron ``release`` is step 0).
        path: the step directory (what :func:`prune` removes, with its siblings in other roles).
        weights: what to hand to :func:`fastckpt.convert` (a directory or a file), or ``None``.
        format: ``dcp``, ``safetensors``, ``torch``, ``deepspeed``, ``megatron``, ... or ``"-"``.
        complete: the framework's completion marker is present.
        reason: why the step is incomplete (``None`` when complete).
        metrics: numeric entries of ``training_info.json`` (or OpenRLHF ``metric.json``).
        size: bytes under ``weights``.
    """

    step: int
    path: Path
    weights: Path | None
    format: str
    complete: bool
    reason: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    size: int = 0
    extra_paths: list[Path] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        """Every directory that belongs to this step (all roles)."""
        return [self.path, *self.extra_paths]


@dataclass
class Run:
    """The steps of a run directory for one role, oldest first."""

    root: Path
    layout: str
    role: str
    steps: list[Step]
    tracker: int | None = None
    default_metric: str | None = None
    #: the step the framework itself recorded as best (Trainer ``best_global_step``)
    best_step: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> list[Step]:
        return [s for s in self.steps if s.complete]

    def metric_names(self) -> list[str]:
        names: dict[str, None] = {}
        for s in self.steps:
            for k in s.metrics:
                names.setdefault(k, None)
        return list(names)

    def by_number(self, number: int) -> Step:
        for s in self.steps:
            if s.step == number:
                if not s.complete:
                    raise FastckptError(
                        f"{s.path}: step {number} is incomplete ({s.reason}); complete steps: "
                        f"{_numbers(self.complete)}"
                    )
                return s
        raise FastckptError(
            f"{self.root}: no step {number} (complete steps: {_numbers(self.complete)})"
        )

    def latest(self) -> Step:
        """The tracker's step when it is complete, else the highest complete step."""
        done = self.complete
        if not done:
            raise FastckptError(f"{self.root}: no complete checkpoint ({_describe_steps(self)})")
        if self.tracker is not None:
            for s in done:
                if s.step == self.tracker:
                    return s
        return max(done, key=lambda s: s.step)

    def resolve_metric(self, metric: str | None) -> str:
        """The metric to rank by: ``metric``, else the run's only validation metric."""
        if metric is not None:
            return metric
        if self.default_metric is not None:
            return self.default_metric
        names = self.metric_names()
        raise FastckptError(
            f"{self.root}: which metric? pass --metric NAME (metrics found: "
            f"{', '.join(names) if names else 'none'})"
        )

    def best(
        self, metric: str | None = None, *, higher_is_better: bool | None = None
    ) -> tuple[Step, list[str]]:
        """The complete step with the best ``metric``; ties go to the higher step.

        Returns:
            ``(step, warnings)``: one warning per complete step lacking the metric.
        """
        if metric is None and self.default_metric is None and self.best_step is not None:
            return self.by_number(self.best_step), []
        name = self.resolve_metric(metric)
        ranked, warnings = rank_steps(self.complete, name, higher_is_better=higher_is_better)
        if not ranked:
            raise FastckptError(
                f"{self.root}: no complete step has metric {name!r} (metrics found: "
                f"{', '.join(self.metric_names()) or 'none'})"
            )
        return ranked[0], warnings

    def select(
        self,
        step: str | int | None = None,
        *,
        metric: str | None = None,
        higher_is_better: bool | None = None,
    ) -> tuple[Step, list[str]]:
        """``step``: ``"latest"`` (default), ``"best"`` or a step number."""
        if step is None or step == "latest":
            return self.latest(), []
        if step == "best":
            return self.best(metric, higher_is_better=higher_is_better)
        try:
            number = int(step)
        except ValueError:
            raise FastckptError(f"invalid step {step!r} (use latest, best or a number)") from None
        return self.by_number(number), []


#: name parts of metrics where lower is better (``eval_loss``, ``val/perplexity``, ``wer``, ...)
_LOWER_IS_BETTER = frozenset(
    {"loss", "perplexity", "ppl", "error", "err", "wer", "cer", "mse", "mae", "rmse"}
)


def higher_is_better_for(metric: str, higher_is_better: bool | None = None) -> bool:
    """The direction to rank ``metric`` in: ``higher_is_better`` when given, else lower is better
    for a loss, a perplexity or an error rate (by the name's parts), higher for anything else."""
    if higher_is_better is not None:
        return higher_is_better
    parts = [p for p in re.split(r"[^a-z0-9]+", metric.lower()) if p]
    return not any(p in _LOWER_IS_BETTER or p.endswith("loss") for p in parts)


def direction(metric: str, higher_is_better: bool | None) -> str:
    """``"higher is better"`` or ``"lower is better"``, for notes and listings."""
    return (
        "higher is better" if higher_is_better_for(metric, higher_is_better) else "lower is better"
    )


def rank_steps(
    steps: Iterable[Step], metric: str, *, higher_is_better: bool | None = None
) -> tuple[list[Step], list[str]]:
    """Steps holding ``metric``, best first (ties: higher step first), and warnings for the rest.

    ``higher_is_better=None`` ranks by the metric's name (:func:`higher_is_better_for`)."""
    have: list[Step] = []
    warnings: list[str] = []
    for s in steps:
        value = s.metrics.get(metric)
        if value is None or math.isnan(value):
            warnings.append(f"step {s.step} has no metric {metric!r}; skipped ({s.path})")
        else:
            have.append(s)
    sign = 1.0 if higher_is_better_for(metric, higher_is_better) else -1.0
    have.sort(key=lambda s: (sign * s.metrics[metric], s.step), reverse=True)
    return have, warnings


def _numbers(steps: list[Step]) -> str:
    return ", ".join(str(s.step) for s in steps) or "none"


def _describe_steps(run: Run) -> str:
    if not run.steps:
        return "no steps found"
    return "; ".join(f"step {s.step}: {s.reason}" for s in run.steps if not s.complete)


@dataclass
class Resolved:
    """A source resolved from a run: the weights to read, and how they were chosen."""

    weights: Path
    step: Step | None = None
    run: Run | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
