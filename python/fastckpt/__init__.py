"""fastckpt: sharded training checkpoints to Hugging Face safetensors, at copy speed.

Example:
    >>> import fastckpt
    >>> report = fastckpt.convert("step_100/policy/weights", "hf-step100")  # doctest: +SKIP
    >>> fastckpt.verify("step_100/policy/weights", "hf-step100").ok          # doctest: +SKIP
    True

``import fastckpt`` loads only the Rust extension; the rest of the API is imported on first use
(PEP 562), so the import stays fast and never pulls in torch or numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastckpt._core import FastckptError, FormatError, MappingError, ShapeError
from fastckpt._core import __version__ as __version__

if TYPE_CHECKING:
    from fastckpt.api import (
        CheckpointInfo,
        ConvertReport,
        VerifyReport,
        convert,
        convert_steps,
        inspect,
        parse_size,
        verify,
    )
    from fastckpt.catalog import TensorInfo
    from fastckpt.checkpoint import Checkpoint, open
    from fastckpt.output.hub import push_to_hub
    from fastckpt.runs import Run, Step, scan_run
    from fastckpt.runs.manager import CheckpointManager

#: public name -> module that defines it (imported lazily)
_LAZY = {
    "CheckpointInfo": "fastckpt.api",
    "ConvertReport": "fastckpt.api",
    "VerifyReport": "fastckpt.api",
    "convert": "fastckpt.api",
    "convert_steps": "fastckpt.api",
    "inspect": "fastckpt.api",
    "parse_size": "fastckpt.api",
    "verify": "fastckpt.api",
    "TensorInfo": "fastckpt.catalog",
    "Checkpoint": "fastckpt.checkpoint",
    "open": "fastckpt.checkpoint",
    "push_to_hub": "fastckpt.output.hub",
    "CheckpointManager": "fastckpt.runs.manager",
    "Run": "fastckpt.runs",
    "Step": "fastckpt.runs",
    "scan_run": "fastckpt.runs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Checkpoint",
    "CheckpointInfo",
    "CheckpointManager",
    "ConvertReport",
    "FastckptError",
    "FormatError",
    "MappingError",
    "Run",
    "ShapeError",
    "Step",
    "TensorInfo",
    "VerifyReport",
    "__version__",
    "convert",
    "convert_steps",
    "inspect",
    "open",
    "parse_size",
    "push_to_hub",
    "scan_run",
    "verify",
]
