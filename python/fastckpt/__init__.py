"""fastckpt: sharded training checkpoints to Hugging Face safetensors, at copy speed.

Example:
    >>> import fastckpt
    >>> report = fastckpt.convert("step_100/policy/weights", "hf-step100")  # doctest: +SKIP
    >>> fastckpt.verify("step_100/policy/weights", "hf-step100").ok          # doctest: +SKIP
    True

``import fastckpt`` never imports torch (nor numpy, until a tensor is read).
"""

from fastckpt._core import FastckptError, FormatError, MappingError, ShapeError
from fastckpt._core import __version__ as __version__
from fastckpt.api import (
    CheckpointInfo,
    ConvertReport,
    VerifyReport,
    convert,
    inspect,
    parse_size,
    verify,
)
from fastckpt.catalog import TensorInfo
from fastckpt.checkpoint import Checkpoint, open
from fastckpt.hub import push_to_hub
from fastckpt.manager import CheckpointManager
from fastckpt.runs import Run, Step, scan_run

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
    "inspect",
    "open",
    "parse_size",
    "push_to_hub",
    "scan_run",
    "verify",
]
