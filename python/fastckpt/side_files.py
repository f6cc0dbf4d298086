"""Side files beside a checkpoint: which config, tokenizer and template files belong with it.

Found here (the source side, read by formats that need ``config.json``); copied into the output by
:mod:`fastckpt.output.folder`. Rules: ``shared/formats/hf-output.md`` §3-§6.
"""

from __future__ import annotations

import fnmatch
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastckpt._core import FormatError
from fastckpt.safeio import contained, read_regular

#: side files are small (the largest, tokenizer.json, is tens of MB)
MAX_SIDE_FILE_BYTES = 2_000_000_000

#: file names (or glob patterns) copied verbatim from a config/tokenizer folder
SIDE_FILE_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "*.model",
    "*.tiktoken",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)
#: custom modeling code is copied only from the folder that holds config.json
CODE_PATTERN = "*.py"
TEMPLATE_DIR = "additional_chat_templates"

#: safetensors float dtype -> the name config.json uses
TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass
class SideFiles:
    """Side files found for a checkpoint: output name -> source path."""

    files: dict[str, Path] = field(default_factory=dict)
    config_dir: Path | None = None
    skipped: list[str] = field(default_factory=list)  # refused candidates, with the reason

    @property
    def config(self) -> dict[str, Any] | None:
        path = self.files.get("config.json")
        if path is None:
            return None
        try:
            value = json.loads(read_regular(path, limit=MAX_SIDE_FILE_BYTES, nofollow=True))
        except (OSError, ValueError, FormatError):
            return None
        return value if isinstance(value, dict) else None


def find_side_files(dirs: list[Path]) -> SideFiles:
    """Collect side files from ``dirs`` (best first); the first folder with a name wins."""
    found = SideFiles()
    for d in dirs:
        if not d.is_dir():
            continue
        names = sorted(os.listdir(d))
        has_config = "config.json" in names and "config.json" not in found.files
        if has_config:
            found.config_dir = d
        for name in names:
            if name in found.files:
                continue
            if any(fnmatch.fnmatchcase(name, pat) for pat in SIDE_FILE_PATTERNS) or (
                has_config and fnmatch.fnmatchcase(name, CODE_PATTERN)
            ):
                path = _side_file(d / name, d, found)
                if path is not None:
                    found.files[name] = path
        templates = d / TEMPLATE_DIR
        if templates.is_dir():
            for tpl in sorted(templates.glob("*.jinja")):
                key = f"{TEMPLATE_DIR}/{tpl.name}"
                path = None if key in found.files else _side_file(tpl, d, found)
                if path is not None:
                    found.files[key] = path
    return found


def _side_file(path: Path, root: Path, found: SideFiles) -> Path | None:
    """The real path of a side file that may be copied (a regular file inside ``root``, or a
    Hugging Face cache snapshot's link into its own blobs); None, with a skip noted, otherwise."""
    if not os.path.lexists(path):
        return None
    real = contained(path, root)
    if real is None:
        found.skipped.append(f"{path}: a link out of {root}; not copied")
        return None
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return None
    if not stat.S_ISREG(mode):
        if not stat.S_ISDIR(mode):
            found.skipped.append(f"{path}: not a regular file; not copied")
        return None
    return real


def tie_word_embeddings(config: dict[str, Any] | None) -> bool:
    """Whether the language model's embeddings are tied (``text_config`` governs VLMs)."""
    if not config:
        return False
    text = config.get("text_config")
    if isinstance(text, dict) and "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    return bool(config.get("tie_word_embeddings", False))
