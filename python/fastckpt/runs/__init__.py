"""Training runs: find the steps of a run directory, their roles, weights, metrics and completeness.

RL users point at a run, not at a shard folder. This package recognises the layouts that RL and
post-training frameworks write (``formats/torch-pickles.md`` §5) and resolves a run to the weights
of one step; :mod:`fastckpt.formats.registry` then decides how to read them.

- nemo-rl: ``step_N/`` (``tmp_step_N/`` while writing), roles ``policy/`` and ``value/``,
  weights in ``<role>/weights/`` (DCP v1) or ``<role>/weights/model/`` (v2) or ``iter_*``.
- verl: ``global_step_N/``, roles ``actor/`` and ``critic/``; per-rank ``.pt`` in the role dir, or
  Megatron ``model/dist_ckpt/`` (schema v2) / ``dist_ckpt/`` (v1).
- rlinf: ``[checkpoints/]global_step_N/actor/`` with ``dcp_checkpoint/``,
  ``model_state_dict/full_weights.pt`` or ``local_shard_checkpoint/``.
- prime-rl: ``[checkpoints/]step_N/trainer/`` (DCP), or ``step_N/trainer[_R].pt`` (2025 layout).
- openrlhf: ``_actor/global_stepN/`` (and ``_critic/``) DeepSpeed tags, ``latest``,
  ``metric.json``.
- megatron: ``iter_NNNNNNN/`` (or ``release/``) with ``latest_checkpointed_iteration.txt``.

A step is *complete* only when its framework's completion marker says so: NeMo RL renames
``tmp_step_N`` to ``step_N``; DCP writes ``.metadata`` last; Megatron and veRL write
``latest_checkpointed_iteration.txt`` after every rank saved; veRL's Megatron backend writes
``ckpt_contents.json`` last; DeepSpeed writes ``latest`` after the tag. Incomplete steps are listed
but never chosen.

Example:
    >>> run = scan_run("results/grpo")                              # doctest: +SKIP
    >>> run.best("val:reward").weights                              # doctest: +SKIP
    PosixPath('results/grpo/step_200/policy/weights')

Modules: :mod:`~fastckpt.runs.model` (``Step``, ``Run``, choosing a step),
:mod:`~fastckpt.runs.steps` (a step folder's format, size, completeness),
:mod:`~fastckpt.runs.metrics` (logged metrics and their names), :mod:`~fastckpt.runs.layouts`
(one module per trainer layout), :mod:`~fastckpt.runs.discover` (the table of layouts,
``scan_run``), :mod:`~fastckpt.runs.resolve` (``--step``, ``ls``, ``prune``),
:mod:`~fastckpt.runs.manager` (``CheckpointManager``, which writes runs).
"""

from __future__ import annotations

from fastckpt.runs.discover import is_run_dir, looks_like_step, scan_run
from fastckpt.runs.layouts.trainer import TRAINER_STATE
from fastckpt.runs.metrics import (
    TRAINING_INFO,
    is_bookkeeping,
    is_noise,
    is_step_counter,
    read_metrics,
)
from fastckpt.runs.model import ROLES, PathLike, Resolved, Run, Step, rank_steps
from fastckpt.runs.resolve import leftovers, listing, plan_prune, resolve_source
from fastckpt.runs.steps import TRACKER, weights_format

__all__ = [
    "ROLES",
    "TRACKER",
    "TRAINER_STATE",
    "TRAINING_INFO",
    "PathLike",
    "Resolved",
    "Run",
    "Step",
    "is_bookkeeping",
    "is_noise",
    "is_run_dir",
    "is_step_counter",
    "leftovers",
    "listing",
    "looks_like_step",
    "plan_prune",
    "rank_steps",
    "read_metrics",
    "resolve_source",
    "scan_run",
    "weights_format",
]
