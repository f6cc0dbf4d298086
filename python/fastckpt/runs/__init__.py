"""Training runs: find the steps of a run directory, their roles, weights, metrics and completeness.

RL users point at a run, not at a shard folder. This module recognises the layouts that RL and
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
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastckpt._core import FastckptError, FormatError

PathLike = str | os.PathLike[str]

TRACKER = "latest_checkpointed_iteration.txt"
TRAINING_INFO = "training_info.json"
ROLES = ("actor", "policy", "critic")

_NEMO_STEP = re.compile(r"^(tmp_)?step_(\d+)$")
_GLOBAL_STEP = re.compile(r"^global_step_(\d+)$")
#: torchtitan: dump_folder/checkpoint/step-N/ (a DCP)
_TITAN_STEP = re.compile(r"^step-(\d+)$")
_DS_TAG = re.compile(r"^(best_)?global_step(\d+)$")
_ITER = re.compile(r"^iter_(\d{7,})$")
#: transformers Trainer: output_dir/checkpoint-N/ with trainer_state.json
_TRAINER_CKPT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
#: what a Trainer checkpoint holds its weights as (any one of them)
_TRAINER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json", "pytorch_model_fsdp_0")  # fmt: skip
_RANK_METADATA = re.compile(r"^__(\d+)\.metadata$")
_DISTCP = re.compile(r"^__(\d+)_\d+\.distcp$")
_VERL_MODEL = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
# training_info.json entries that are bookkeeping, not quality metrics
_BOOKKEEPING = frozenset(
    {"step", "current_step", "epoch", "current_epoch", "total_steps", "consumed_samples",
     "total_valid_tokens", "global_step", "iteration", "timestamp", "time", "wall_time"}
)  # fmt: skip

# role directory names per layout: fastckpt role -> directory
_ROLE_DIRS: dict[str, dict[str, str]] = {
    "nemo-rl": {"policy": "policy", "critic": "value"},
    "verl": {"policy": "actor", "critic": "critic"},
    "rlinf": {"policy": "actor", "critic": "critic"},
    "prime-rl": {"policy": "trainer"},
    "openrlhf": {"policy": "_actor", "critic": "_critic"},
    "megatron": {"policy": ""},
    "trainer": {"policy": ""},
    "torchtitan": {"policy": ""},
}


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
        self, metric: str | None = None, *, higher_is_better: bool = True
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
        higher_is_better: bool = True,
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


def rank_steps(
    steps: Iterable[Step], metric: str, *, higher_is_better: bool = True
) -> tuple[list[Step], list[str]]:
    """Steps holding ``metric``, best first (ties: higher step first), and warnings for the rest."""
    have: list[Step] = []
    warnings: list[str] = []
    for s in steps:
        value = s.metrics.get(metric)
        if value is None or math.isnan(value):
            warnings.append(f"step {s.step} has no metric {metric!r}; skipped ({s.path})")
        else:
            have.append(s)
    sign = 1.0 if higher_is_better else -1.0
    have.sort(key=lambda s: (sign * s.metrics[metric], s.step), reverse=True)
    return have, warnings


def _numbers(steps: list[Step]) -> str:
    return ", ".join(str(s.step) for s in steps) or "none"


def _describe_steps(run: Run) -> str:
    if not run.steps:
        return "no steps found"
    return "; ".join(f"step {s.step}: {s.reason}" for s in run.steps if not s.complete)


# ---------------------------------------------------------------- small file readers


def _read_int(path: Path) -> int | None:
    """A tracker file: an int, or Megatron's ``release`` (step 0)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    if text == "release":
        return 0
    m = re.search(r"(\d+)\s*$", text)  # "123", or a DeepSpeed tag "global_step123"
    return int(m.group(1)) if m else None


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


def _size(path: Path | None) -> int:
    if path is None:
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


# ---------------------------------------------------------------- weights inside a step


def _dcp_state(path: Path) -> tuple[bool, str | None]:
    """(complete, reason) for a DCP directory."""
    names = os.listdir(path)
    if (path / ".metadata").is_file():
        # .metadata is written last, but a folder removed in place (by fastckpt < 0.2 or another
        # tool) can keep it after its data files are gone
        if any(n.endswith(".distcp") for n in names):
            return True, None
        return False, f"DCP .metadata without .distcp data files in {path.name}/ (half deleted?)"
    ranks = {int(m.group(1)) for n in names if (m := _DISTCP.match(n))}
    metas = {int(m.group(1)) for n in names if (m := _RANK_METADATA.match(n))}
    if metas and ranks <= metas:
        return True, None
    return False, f"DCP save without .metadata in {path.name}/ (interrupted or in progress)"


def _is_dcp(path: Path) -> bool:
    if not path.is_dir():
        return False
    return any(
        n == ".metadata" or _DISTCP.match(n) or _RANK_METADATA.match(n) for n in os.listdir(path)
    )


def weights_format(path: Path) -> str:
    """Name the format of a weights path; :mod:`fastckpt.formats.registry` decides where it can."""
    from fastckpt.formats.registry import detect

    try:
        fmt = detect(path)
        if fmt == "dcp" and (path / "metadata.json").is_file():
            return "megatron-dist"
        return fmt
    except (FastckptError, OSError):
        pass
    if path.is_dir():
        names = os.listdir(path)
        if any(n.startswith("mp_rank_") for n in names):
            return "megatron"
        if any(n.endswith("model_states.pt") for n in names):
            return "deepspeed"
        if any(n.endswith(".pt") or n.endswith(".bin") for n in names):
            return "torch"
    elif path.suffix in (".pt", ".bin", ".pth"):
        return "torch"
    return "unknown"


def _state(path: Path) -> tuple[bool, str | None]:
    """(complete, reason) for a weights path from its own files."""
    if path.is_file():
        return True, None
    if _is_dcp(path):
        return _dcp_state(path)
    names = os.listdir(path)
    ranks = [(int(m.group(1)), int(m.group(2))) for n in names if (m := _VERL_MODEL.match(n))]
    if ranks:
        world = ranks[0][0]
        missing = sorted(set(range(world)) - {r for w, r in ranks if w == world})
        if missing:
            return False, f"missing model files for ranks {missing} of {world}"
    if not names:
        return False, f"{path.name}/ is empty"
    return True, None


def _nemo_weights(role_dir: Path) -> Path | None:
    w = role_dir / "weights"
    if not w.is_dir():
        return None
    if _is_dcp(w):
        return w  # DTensor v1
    model = w / "model"
    if model.is_dir():
        return model  # DTensor v2 (DCP or safetensors)
    iters = sorted(p for p in w.iterdir() if _ITER.match(p.name) or p.name == "release")
    if iters:
        return iters[-1]  # Megatron (Bridge)
    if any(w.glob("*.safetensors")):
        return w  # LoRA adapter / HF folder
    return w


def _verl_weights(role_dir: Path) -> tuple[Path | None, str | None]:
    """(weights, manifest reason) for a veRL / RLinf role directory."""
    if (role_dir / "model" / "dist_ckpt").is_dir():  # veRL Megatron, schema v2
        if not (role_dir / "ckpt_contents.json").is_file():
            return (
                role_dir / "model" / "dist_ckpt",
                "no ckpt_contents.json (Megatron save in progress)",
            )
        return role_dir / "model" / "dist_ckpt", None
    if (role_dir / "dist_ckpt").is_dir():  # veRL Megatron, schema v1
        return role_dir / "dist_ckpt", None
    for sub in ("dcp_checkpoint", "model_state_dict/full_weights.pt", "local_shard_checkpoint"):
        if (role_dir / sub).exists():  # RLinf
            return role_dir / sub, None
    iters = sorted(p for p in role_dir.iterdir() if _ITER.match(p.name) or p.name == "release")
    if iters:
        return iters[-1], None  # RLinf Megatron
    if any(_VERL_MODEL.match(n) for n in os.listdir(role_dir)) or _is_dcp(role_dir):
        return role_dir, None
    return None, None


# ---------------------------------------------------------------- layouts


def _children(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return []


def _find_layout(root: Path) -> tuple[str, Path] | None:
    """``(layout, steps_root)`` for a run directory, or ``None``."""
    if not root.is_dir():
        return None
    names = {p.name for p in _children(root)}
    if "_actor" in names or "_critic" in names:
        return "openrlhf", root
    if (root / "latest").is_file() and any(_DS_TAG.match(n) for n in names):
        return "openrlhf", root.parent  # pointed at _actor/ itself
    if any(_ITER.match(n) for n in names) or ("release" in names and (root / TRACKER).is_file()):
        return "megatron", root
    for n in sorted(names):
        if _NEMO_STEP.match(n):
            if (root / n / "trainer").is_dir() or any((root / n).glob("trainer*.pt")):
                return "prime-rl", root
            return "nemo-rl", root
        if _GLOBAL_STEP.match(n):
            actor = root / n / "actor"
            if any((actor / s).exists() for s in ("dcp_checkpoint", "local_shard_checkpoint",
                                                   "model_state_dict")):  # fmt: skip
                return "rlinf", root
            return "verl", root
    if any(_TRAINER_CKPT.match(n) for n in names):
        return "trainer", root
    if any(_TITAN_STEP.match(n) and _is_dcp(root / n) for n in names):
        return "torchtitan", root
    if "checkpoint" in names:  # torchtitan's dump folder
        found = _find_layout(root / "checkpoint")
        if found is not None and found[0] == "torchtitan":
            return found
    if "checkpoints" in names:
        return _find_layout(root / "checkpoints")
    return None


def is_run_dir(path: PathLike) -> bool:
    """True if ``path`` is a run (or a ``checkpoints/`` folder of one), not a checkpoint."""
    p = Path(path)
    if not p.is_dir() or _is_dcp(p) or any(p.glob("*.safetensors")):
        return False
    if any(n.startswith("mp_rank_") for n in os.listdir(p)):
        return False
    return _find_layout(p) is not None


def _role_key(role: str | None) -> str:
    if role is None:
        return "policy"
    r = role.lower().lstrip("_")
    if r in ("actor", "policy", "trainer"):
        return "policy"
    if r in ("critic", "value"):
        return "critic"
    raise FastckptError(f"unknown role {role!r} (use actor, policy or critic)")


def scan_run(path: PathLike, *, role: str | None = None) -> Run:
    """Find the steps of a run directory for ``role`` (default: the policy / actor).

    Args:
        path: the run directory (or its ``checkpoints/`` folder; for OpenRLHF also ``_actor/``).
        role: ``"actor"``/``"policy"`` (the same thing) or ``"critic"``.

    Returns:
        A :class:`Run` with every step found, complete or not, oldest first.
    """
    root = Path(path)
    found = _find_layout(root)
    if found is None:
        raise FormatError(
            f"{root}: not a training run fastckpt recognises (no step_N/, global_step_N/, "
            "iter_NNNNNNN/, checkpoint-N/, step-N/ or _actor/ folders)"
        )
    layout, base = found
    key = _role_key(role)
    dirs = _ROLE_DIRS[layout]
    if key not in dirs:
        raise FastckptError(f"{root}: a {layout} run has no {key} role (roles: {', '.join(dirs)})")
    sub = dirs[key]
    scanner = {
        "nemo-rl": _scan_nemo,
        "prime-rl": _scan_prime,
        "verl": _scan_verl,
        "rlinf": _scan_verl,
        "openrlhf": _scan_openrlhf,
        "megatron": _scan_megatron,
        "trainer": _scan_trainer,
        "torchtitan": _scan_torchtitan,
    }[layout]
    run = scanner(base, sub)
    run.layout, run.role = layout, sub or "model"
    run.steps.sort(key=lambda s: (s.step, s.complete))
    # one entry per step number: a complete one wins over a leftover temporary one
    uniq: dict[int, Step] = {}
    for s in run.steps:
        uniq[s.step] = s
    run.steps = list(uniq.values())
    if run.best_step is None:  # else the framework's own choice stands for --step best
        run.default_metric = _default_metric(run)
    return run


def _finish(step: Step) -> Step:
    if step.weights is not None and step.weights.exists():
        step.format = weights_format(step.weights)
        step.size = _size(step.weights)
    return step


def _missing(number: int, path: Path, where: str) -> Step:
    return Step(number, path, None, "-", False, f"no weights found in {where}")


def _apply_tracker(run: Run, what: str) -> None:
    if run.tracker is None:
        return
    for s in run.steps:
        if s.complete and s.step > run.tracker:
            s.complete = False
            s.reason = f"newer than {what} ({run.tracker}): save in progress"


def _scan_nemo(root: Path, sub: str) -> Run:
    steps = []
    for d in _children(root):
        m = _NEMO_STEP.match(d.name)
        if not m:
            continue
        n = int(m.group(2))
        role_dir = d / sub
        weights = _nemo_weights(role_dir) if role_dir.is_dir() else None
        if weights is None:
            s = _missing(n, d, f"{d.name}/{sub}/weights")
        else:
            ok, why = _state(weights)
            s = Step(n, d, weights, "-", ok, why)
        if m.group(1):
            s.complete = False
            s.reason = f"temporary save {d.name}/ (not yet renamed to step_{n}/)"
        s.metrics = read_metrics(d)
        steps.append(_finish(s))
    return Run(root, "", "", steps)


def _scan_prime(root: Path, sub: str) -> Run:
    steps = []
    for d in _children(root):
        m = _NEMO_STEP.match(d.name)
        if not m or m.group(1):
            continue
        n = int(m.group(2))
        trainer = d / sub
        if trainer.is_dir():
            ok, why = _state(trainer)
            s = Step(n, d, trainer, "-", ok, why)
        else:  # 2025-07 … 2025-08: checkpoints/step_N/trainer[_R].pt
            files = sorted(d.glob("trainer*.pt"))
            if not files:
                s = _missing(n, d, f"{d.name}/{sub}/")
            else:
                s = Step(n, d, files[0] if len(files) == 1 else d, "-", True)
        s.metrics = read_metrics(d)
        steps.append(_finish(s))
    return Run(root, "", "", steps)


def _scan_verl(root: Path, sub: str) -> Run:
    steps = []
    for d in _children(root):
        m = _GLOBAL_STEP.match(d.name)
        if not m:
            continue
        n = int(m.group(1))
        role_dir = d / sub
        weights, why = _verl_weights(role_dir) if role_dir.is_dir() else (None, None)
        if weights is None:
            s = _missing(n, d, f"{d.name}/{sub}/")
        elif why is not None:
            s = Step(n, d, weights, "-", False, why)
        else:
            ok, why = _state(weights)
            s = Step(n, d, weights, "-", ok, why)
        s.metrics = read_metrics(d)
        if not s.metrics:
            s.metrics = read_metrics(role_dir)
        steps.append(_finish(s))
    run = Run(root, "", "", steps, tracker=_read_int(root / TRACKER))
    _apply_tracker(run, TRACKER)
    return run


def _scan_openrlhf(root: Path, sub: str) -> Run:
    role_dir = root / sub
    if not role_dir.is_dir():
        raise FastckptError(f"{root}: no {sub}/ folder")
    others = [root / r for r in ("_actor", "_critic") if r != sub and (root / r).is_dir()]
    steps = []
    for d in _children(role_dir):
        m = _DS_TAG.match(d.name)
        if not m:
            continue
        n = int(m.group(2))
        if m.group(1) and (role_dir / f"global_step{n}").is_dir():
            continue  # the best_ copy of a step that still exists under its own name
        names = os.listdir(d)
        if not any(x.endswith("model_states.pt") for x in names):
            s = Step(n, d, d, "-", False, f"no *model_states.pt in {d.name}/")
        else:
            s = Step(n, d, d, "-", True)
        s.extra_paths = [o / d.name for o in others if (o / d.name).is_dir()]
        s.metrics = read_metrics(d)
        steps.append(_finish(s))
    run = Run(root, "", "", steps, tracker=_read_int(role_dir / "latest"))
    _apply_tracker(run, f"{sub}/latest")
    return run


def _scan_megatron(root: Path, sub: str) -> Run:
    del sub
    tracker = _read_int(root / TRACKER)
    steps = []
    for d in _children(root):
        m = _ITER.match(d.name)
        if not m and d.name != "release":
            continue
        n = int(m.group(1)) if m else 0
        if _is_dcp(d):
            ok, why = _dcp_state(d)
        elif any(x.startswith("mp_rank_") for x in os.listdir(d)):
            ok, why = True, None
        else:
            ok, why = False, f"no .metadata or mp_rank_* in {d.name}/"
        s = Step(n, d, d, "-", ok, why)
        if ok and tracker is None:
            s.complete, s.reason = False, f"no {TRACKER} (save in progress or interrupted)"
        s.metrics = read_metrics(d)
        steps.append(_finish(s))
    run = Run(root, "", "", steps, tracker=tracker)
    _apply_tracker(run, TRACKER)
    return run


def _scan_trainer(root: Path, sub: str) -> Run:
    """transformers Trainer ``output_dir``: ``checkpoint-N/`` folders, each complete with its
    ``trainer_state.json`` (written after the weights); metrics from its ``log_history``; best
    from the latest state's ``best_global_step`` (or ``best_model_checkpoint``)."""
    del sub
    steps = []
    best: int | None = None
    found = [(int(m.group(1)), d) for d in _children(root) if (m := _TRAINER_CKPT.match(d.name))]
    for n, d in sorted(found):  # by step: the latest state's best is the one that stands
        state = _load_json(d / TRAINER_STATE)
        if not any((d / w).exists() for w in _TRAINER_WEIGHTS):
            s = _missing(n, d, f"{d.name}/ ({' or '.join(_TRAINER_WEIGHTS[:3])})")
        elif not isinstance(state, dict):
            s = Step(n, d, d, "-", False, f"no {TRAINER_STATE} in {d.name}/ (save in progress)")
        else:
            s = Step(n, d, d, "-", True)
        if isinstance(state, dict):
            for entry in state.get("log_history") or []:
                if isinstance(entry, dict) and entry.get("step") == n:
                    s.metrics.update(_numeric(entry))
            best = _trainer_best(state, best)
        steps.append(_finish(s))
    return Run(root, "", "", steps, best_step=best)


def _scan_torchtitan(root: Path, sub: str) -> Run:
    """torchtitan ``checkpoint/step-N/``: each a DCP, complete with its ``.metadata``."""
    del sub
    steps = []
    for d in _children(root):
        m = _TITAN_STEP.match(d.name)
        if not m:
            continue
        ok, why = _dcp_state(d)
        steps.append(_finish(Step(int(m.group(1)), d, d, "-", ok, why)))
    return Run(root, "", "", steps)


def _trainer_best(state: dict[str, Any], before: int | None) -> int | None:
    step = state.get("best_global_step")
    if isinstance(step, int) and not isinstance(step, bool):
        return step
    path = state.get("best_model_checkpoint")
    m = _TRAINER_CKPT.match(Path(path).name) if isinstance(path, str) else None
    return int(m.group(1)) if m else before


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


def looks_like_step(name: str) -> bool:
    """A folder name that a run's layout would list as a step (``step_9``, ``global_step_9``,
    ``global_step9``, ``iter_0000009``, ``checkpoint-9``, ``step-9``)."""
    pats = (_NEMO_STEP, _GLOBAL_STEP, _DS_TAG, _ITER, _TRAINER_CKPT, _TITAN_STEP)
    return any(p.match(name) for p in pats)


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


# ---------------------------------------------------------------- convert hook


@dataclass
class Resolved:
    """A source resolved from a run: the weights to read, and how they were chosen."""

    weights: Path
    step: Step | None = None
    run: Run | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def resolve_source(
    src: PathLike,
    *,
    step: str | int | None = None,
    role: str | None = None,
    metric: str | None = None,
    higher_is_better: bool = True,
) -> Resolved:
    """Resolve ``src`` to a weights path when it is a run directory; else return it unchanged.

    Args:
        src: a checkpoint (returned as is) or a run directory.
        step: ``"latest"`` (default), ``"best"`` or a step number.
        role: ``"actor"``/``"policy"`` (default) or ``"critic"``.
        metric: the metric for ``step="best"`` (default: the run's only validation metric).
        higher_is_better: rank ``metric`` descending (``False``: ascending, e.g. a loss).
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
        how = f"best by {name} = {chosen.metrics[name]:g}"
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
    higher_is_better: bool = True,
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
        "higher_is_better": higher_is_better,
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
    higher_is_better: bool = True,
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
