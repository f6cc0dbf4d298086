"""Upload a converted folder to the Hugging Face Hub (optional: ``pip install 'fastckpt[hub]'``).

``huggingface_hub`` is imported only when an upload starts, so ``import fastckpt`` and
``fastckpt --help`` stay fast. The installed version is feature-detected
(``formats/hf-output.md`` §9):

- ``create_repo(exist_ok=True)``; ``visibility=`` where it exists (2.4+), else ``private=``;
- ``create_branch(exist_ok=True)`` when a revision other than ``main`` is asked for;
- ``upload_folder``: with ``hf_xet`` (2.x) it streams in several resumable commits, and re-running
  the same command resumes; without it, one commit. ``upload_large_folder`` is never called (it is
  deprecated in 1.x and removed in 2.0).

Only the converted folder is uploaded; temporary and cache entries are ignored.

Example:
    >>> push_to_hub("hf-step100", "me/grpo-step100", private=True)  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastckpt._core import FastckptError

PathLike = str | os.PathLike[str]

IGNORE = [
    ".cache/**",
    ".git/**",
    ".*.fastckpt-tmp-*",
    ".*.fastckpt-old-*",
    ".*.fastckpt-lock-*",
    "*.lock",
]


class HubError(FastckptError):
    """An upload failed; the local folder is untouched and the message says how to retry."""


@dataclass
class PushReport:
    """Where an upload went."""

    repo_id: str
    repo_url: str
    commit_url: str | None
    commit_oid: str | None
    revision: str | None
    files: list[str]


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise FastckptError(
            "uploading needs huggingface_hub: pip install 'fastckpt[hub]'"
        ) from None
    return huggingface_hub


def _token(hub: Any, token: str | None) -> str:
    if token:
        return token
    get_token = getattr(hub, "get_token", None)
    found = get_token() if get_token is not None else os.environ.get("HF_TOKEN")
    if not found:
        raise FastckptError(
            "not logged in to the Hugging Face Hub: set HF_TOKEN or run `hf auth login`"
        )
    return str(found)


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def retry_command(folder: PathLike, repo_id: str, *, revision: str | None, private: bool) -> str:
    """The ``fastckpt push`` command that retries an upload."""
    cmd = ["fastckpt", "push", str(folder), repo_id]
    if revision:
        cmd += ["--revision", revision]
    if private:
        cmd.append("--private")
    return " ".join(shlex.quote(c) for c in cmd)


def push_to_hub(
    folder: PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    repo_type: str = "model",
) -> PushReport:
    """Create ``repo_id`` if needed and upload ``folder`` to it.

    Args:
        folder: the converted Hugging Face folder.
        repo_id: ``"user/name"`` or ``"org/name"``.
        private: create the repository private (an existing repository keeps its visibility).
        revision: branch to commit to (created from the default branch if missing).
        commit_message: the commit title (default: ``"Upload <folder> with fastckpt"``).
        token: the Hub token (default: ``HF_TOKEN``, then the login cache).
        repo_type: ``"model"`` (default), ``"dataset"`` or ``"space"``.

    Returns:
        A :class:`PushReport`.

    Raises:
        HubError: the upload failed; the folder is left as it was.
    """
    src = Path(folder)
    if not src.is_dir():
        raise FileNotFoundError(2, "no such folder to upload", str(src))
    files = sorted(
        str(p.relative_to(src)) for p in src.rglob("*") if p.is_file() and not _ignored(p, src)
    )
    if not any(f.endswith(".safetensors") for f in files):
        raise FastckptError(f"{src}: no .safetensors files; is this a converted folder?")
    hub = _hub()
    tok = _token(hub, token)
    api = hub.HfApi(token=tok)
    message = commit_message or f"Upload {src.name} with fastckpt"
    retry = retry_command(src, repo_id, revision=revision, private=private)
    try:
        kwargs: dict[str, Any] = {"repo_type": repo_type, "exist_ok": True}
        if private:
            if _accepts(api.create_repo, "visibility"):
                kwargs["visibility"] = "private"
            else:
                kwargs["private"] = True
        url = api.create_repo(repo_id, **kwargs)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(src),
            repo_type=repo_type,
            revision=revision,
            commit_message=message,
            ignore_patterns=list(IGNORE),
        )
    except FastckptError:
        raise
    except Exception as exc:
        raise HubError(
            f"upload to {repo_id} failed ({type(exc).__name__}: {_first_line(exc)}); "
            f"the converted folder {src} is intact; retry with: {retry}"
        ) from exc
    return PushReport(
        repo_id=repo_id,
        repo_url=str(url),
        commit_url=getattr(info, "commit_url", None),
        commit_oid=getattr(info, "oid", None),
        revision=revision,
        files=files,
    )


def _ignored(p: Path, root: Path) -> bool:
    parts = p.relative_to(root).parts
    return parts[0] in (".cache", ".git") or ".fastckpt-" in p.name or p.suffix == ".lock"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else "no message"
