"""prime-rl: ``[checkpoints/]step_N/trainer/`` (DCP), or ``step_N/trainer[_R].pt`` (2025 layout).

Its step folders are named like NeMo RL's; a ``trainer/`` folder or ``trainer*.pt`` files in the
first one tell them apart.
"""

from __future__ import annotations

from pathlib import Path

from fastckpt.runs.layouts import Layout
from fastckpt.runs.layouts.nemo import _NEMO_STEP
from fastckpt.runs.metrics import read_metrics
from fastckpt.runs.model import Run, Step
from fastckpt.runs.steps import _children, _finish, _missing, _state


def _detect(root: Path, names: set[str]) -> Path | None:
    """``step_N/`` folders, the first holding ``trainer/`` or ``trainer*.pt`` (else NeMo RL's)."""
    first = next((n for n in sorted(names) if _NEMO_STEP.match(n)), None)
    if first is None:
        return None
    if (root / first / "trainer").is_dir() or any((root / first).glob("trainer*.pt")):
        return root
    return None


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


LAYOUT = Layout("prime-rl", _detect, _scan_prime, {"policy": "trainer"}, (_NEMO_STEP,))
