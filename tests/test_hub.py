"""Hub upload: the real ``huggingface_hub`` client against a small local Hub on 127.0.0.1.

The server implements what ``create_repo`` + ``create_branch`` + ``upload_folder`` call without
hf_xet: ``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{b}``,
``POST /api/models/{repo}/preupload/{rev}``, the LFS batch endpoint, ``PUT`` of LFS objects, and
``POST /api/models/{repo}/commit/{rev}`` (NDJSON). The xet protocol is too much to fake, so the
uploads run in a subprocess with ``HF_HUB_DISABLE_XET=1`` (read by huggingface_hub at import).
The server runs in a daemon thread, binds an ephemeral port and is shut down by the fixture.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fastckpt
import pytest
import torch
from safetensors.torch import save_file

TOKEN = "hf_fake_test_token"


@dataclass
class FakeHub:
    url: str = ""
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)
    branches: list[tuple[str, str]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    fail_commit: bool = False
    auth: list[str | None] = field(default_factory=list)


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, code: int, doc: Any) -> None:
            data = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:
            body = self._body()
            hub.requests.append(f"PUT {self.path}")
            oid = self.path.rsplit("/", 1)[-1]
            assert hashlib.sha256(body).hexdigest() == oid
            hub.lfs[oid] = body
            self._send(200, {})

        def do_POST(self) -> None:
            body = self._body()
            path = self.path.split("?")[0]
            hub.requests.append(f"POST {path}")
            hub.auth.append(self.headers.get("authorization"))
            if path == "/api/repos/create":
                doc = json.loads(body)
                repo = f"{doc['organization']}/{doc['name']}"
                if repo in hub.repos:
                    # the Hub answers 409 with the URL, which create_repo(exist_ok=True) reads
                    return self._send(
                        409,
                        {
                            "error": "You already created this model repo",
                            "url": f"{hub.url}/{repo}",
                        },
                    )
                hub.repos[repo] = {"visibility": doc.get("visibility"), "files": {}}
                return self._send(200, {"url": f"{hub.url}/{repo}"})
            if path.endswith(".git/info/lfs/objects/batch"):
                doc = json.loads(body)
                objects = [
                    {
                        "oid": o["oid"],
                        "size": o["size"],
                        "authenticated": True,
                        "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}},
                    }
                    for o in doc["objects"]
                ]
                return self._send(200, {"transfer": "basic", "objects": objects})
            parts = path.split("/")  # /api/models/{ns}/{name}/{op}/{rev}
            if len(parts) >= 7 and parts[1:3] == ["api", "models"]:
                repo, op, rev = f"{parts[3]}/{parts[4]}", parts[5], "/".join(parts[6:])
                if repo not in hub.repos:
                    return self._send(404, {"error": "Repository not found"})
                if op == "branch":
                    hub.branches.append((repo, rev))
                    return self._send(200, {})
                if op == "preupload":
                    files = [
                        {
                            "path": f["path"],
                            "uploadMode": "lfs"
                            if f["path"].endswith(".safetensors")
                            else "regular",
                            "shouldIgnore": False,
                        }
                        for f in json.loads(body)["files"]
                    ]
                    return self._send(200, {"files": files})
                if op == "commit":
                    if hub.fail_commit:
                        return self._send(500, {"error": "internal error (test)"})
                    lines = [json.loads(x) for x in body.splitlines() if x.strip()]
                    files: dict[str, bytes] = {}
                    for item in lines[1:]:
                        v = item["value"]
                        if item["key"] == "file":
                            files[v["path"]] = base64.b64decode(v["content"])
                        elif item["key"] == "lfsFile":
                            files[v["path"]] = hub.lfs[v["oid"]]
                    hub.commits.append(
                        {"repo": repo, "revision": rev, "header": lines[0]["value"], "files": files}
                    )
                    hub.repos[repo]["files"].update(files)
                    oid = hashlib.sha1(json.dumps(sorted(files)).encode()).hexdigest()
                    return self._send(
                        200,
                        {
                            "commitUrl": f"{hub.url}/{repo}/commit/{oid}",
                            "commitOid": oid,
                            "pullRequestUrl": None,
                        },
                    )
            return self._send(404, {"error": f"not implemented: {path}"})

    return Handler


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.timeout = 5
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    out = tmp_path / "hf"
    out.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(8, 4, generator=g)}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return out


def fastckpt_cli(hub: FakeHub, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",
        HF_TOKEN=TOKEN,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_ETAG_TIMEOUT="5",
        HF_HUB_DOWNLOAD_TIMEOUT="5",
        FASTCKPT_DISABLE_PROGRESS="1",
        NO_PROXY="127.0.0.1",
    )
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        env.pop(k, None)
    return subprocess.run(
        [sys.executable, "-c", "from fastckpt.cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_push_folder(fake_hub: FakeHub, folder: Path, tmp_path: Path) -> None:
    res = fastckpt_cli(fake_hub, tmp_path, "push", str(folder), "me/tiny", "--private")
    assert res.returncode == 0, res.stderr
    assert "uploaded 2 files" in res.stderr
    assert fake_hub.repos["me/tiny"]["visibility"] == "private"
    (commit,) = fake_hub.commits
    assert commit["revision"] == "main"
    assert commit["header"]["summary"] == "Upload hf with fastckpt"
    assert commit["files"] == {
        "model.safetensors": (folder / "model.safetensors").read_bytes(),
        "config.json": (folder / "config.json").read_bytes(),
    }
    # the safetensors went through LFS; the token from HF_TOKEN was sent
    assert any(r.startswith("PUT /lfs-upload/") for r in fake_hub.requests)
    assert f"Bearer {TOKEN}" in fake_hub.auth
    # pushing again: the repo exists (409 -> exist_ok), a new commit on a branch
    res = fastckpt_cli(
        fake_hub,
        tmp_path,
        "push",
        str(folder),
        "me/tiny",
        "--revision",
        "v2",
        "--commit-message",
        "second",
    )
    assert res.returncode == 0, res.stderr
    assert fake_hub.branches == [("me/tiny", "v2")]
    assert fake_hub.commits[-1]["revision"] == "v2"
    assert fake_hub.commits[-1]["header"]["summary"] == "second"


def test_convert_push_to_hub(fake_hub: FakeHub, tmp_path: Path) -> None:
    run = tmp_path / "run"
    mgr = fastckpt.CheckpointManager(checkpoint_dir=run, metric_name="val:r")
    import torch.distributed.checkpoint as dcp

    sds = {}
    for step, r in ((1, 0.9), (2, 0.1)):
        path = mgr.init_tmp_checkpoint(step, {"val:r": r})
        sds[step] = {"model.norm.weight": torch.full((4,), float(step))}
        dcp.save({"model": sds[step]}, checkpoint_id=str(path / "policy" / "weights"))
        mgr.finalize_checkpoint(path)
    out = tmp_path / "out"
    res = fastckpt_cli(
        fake_hub,
        tmp_path,
        "convert",
        str(run),
        str(out),
        "--step",
        "best",
        "--push-to-hub",
        "org/best",
    )
    assert res.returncode == 0, res.stderr
    (commit,) = fake_hub.commits
    assert sorted(commit["files"]) == sorted(p.name for p in out.iterdir())
    assert commit["files"]["model.safetensors"] == (out / "model.safetensors").read_bytes()
    save_file(sds[1], str(tmp_path / "ref.safetensors"))
    assert fastckpt.verify(tmp_path / "ref.safetensors", out).ok


def test_upload_failure_keeps_output_and_says_how_to_retry(
    fake_hub: FakeHub, folder: Path, tmp_path: Path
) -> None:
    fake_hub.fail_commit = True
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    res = fastckpt_cli(fake_hub, tmp_path, "push", str(folder), "me/x", "--revision", "dev")
    assert res.returncode == 1
    assert "upload to me/x failed" in res.stderr and "is intact" in res.stderr
    assert f"fastckpt push {folder} me/x --revision dev" in res.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_not_logged_in(fake_hub: FakeHub, folder: Path, tmp_path: Path) -> None:
    env_token = os.environ.pop("HF_TOKEN", None)
    try:
        res = subprocess.run(
            [
                sys.executable,
                "-c",
                "from fastckpt.cli import main; main()",
                "push",
                str(folder),
                "me/x",
            ],
            env={**os.environ, "HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "h")},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        if env_token is not None:
            os.environ["HF_TOKEN"] = env_token
    assert res.returncode == 1 and "HF_TOKEN" in res.stderr
    assert fake_hub.requests == []


def test_import_stays_light() -> None:
    code = (
        "import sys, fastckpt, fastckpt.cli; "
        "assert 'huggingface_hub' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
