"""Rebuild the committed megatron-core fixtures in a pinned environment and diff them.

Opt-in (not part of the test suite; ``FASTCKPT_REGEN_FIXTURES=1 bash .ci/run`` runs it last)::

    python tests/data/megatron/regenerate.py            # regenerate, diff, run test_megatron on it
    python tests/data/megatron/regenerate.py --write    # ... and replace fixtures.tar.xz

1. A venv with exactly ``requirements.txt`` (never the system's site-packages), under
   ``--venv`` (default ``~/.cache/fastckpt/mcore-<hash of requirements.txt>``). It is reused only
   when its stamp holds that hash and ``pip check`` passes; otherwise it is rebuilt.
2. ``make_megatron_fixtures.py`` runs there under ``torch.distributed.run`` (4 gloo ranks, CPU).
3. The new tree is compared with the archive: the same files, and the Hugging Face reference
   folders (``CASE/hf/*``: the tensors every test compares against) byte for byte. The
   checkpoints themselves differ between runs only in what Megatron and DCP stamp into them (a
   random ``save_id``, the save path), so they are checked by running ``tests/test_megatron.py``
   against the new tree with this interpreter (which needs fastckpt and the test extra).

Needs about 6 GB of disk for the venv (torch pulls its CUDA libraries) and ~10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
ARCHIVE = HERE / "fixtures.tar.xz"
REQUIREMENTS = HERE / "requirements.txt"
GENERATOR = HERE.parent / "make_megatron_fixtures.py"


def pinned_venv(where: Path | None) -> Path:
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:16]
    venv = where or Path.home() / ".cache" / "fastckpt" / f"mcore-{digest}"
    py, stamp = venv / "bin" / "python", venv / "fastckpt-requirements.sha256"
    if py.exists() and stamp.exists() and stamp.read_text() == digest:
        check = subprocess.run([py, "-m", "pip", "check"], capture_output=True, check=False)
        if check.returncode == 0:
            return py
    print(f"building {venv} from {REQUIREMENTS.name}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", REQUIREMENTS], check=True)
    subprocess.run([py, "-m", "pip", "check"], check=True)
    stamp.write_text(digest)
    return py


def generate(py: Path, out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--standalone",
           GENERATOR, out]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, cwd=out.parent)
    if not (out / "done.json").exists():
        raise SystemExit("the generator finished without writing done.json")


def diff(old: Path, new: Path) -> list[str]:
    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    problems = [f"only in the archive: {f}" for f in sorted(files(old) - files(new))]
    problems += [f"only in the new tree: {f}" for f in sorted(files(new) - files(old))]
    for rel in sorted(files(old) & files(new)):
        if "/hf/" in rel and (old / rel).read_bytes() != (new / rel).read_bytes():
            problems.append(f"reference differs: {rel}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, help="where the pinned venv lives")
    parser.add_argument("--write", action="store_true", help="replace fixtures.tar.xz")
    args = parser.parse_args()
    py = pinned_venv(args.venv)
    with tempfile.TemporaryDirectory() as tmp:
        new, old = Path(tmp) / "new", Path(tmp) / "old"
        new.mkdir()
        generate(py, new)
        with tarfile.open(ARCHIVE, "r:xz") as tar:
            tar.extractall(old, filter="data")
        problems = diff(old, new)
        for p in problems:
            print(p)
        env = dict(os.environ, FASTCKPT_MEGATRON_FIXTURES=str(new))
        tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 str(ROOT / "tests" / "test_megatron.py")]  # fmt: skip
        rc = subprocess.run(tests, env=env, cwd=ROOT, check=False).returncode
        if args.write:
            tar_cmd = ["tar", "--sort=name", "--mtime=@0", "--owner=0", "--group=0",
                       "--numeric-owner", "-C", new, "-cJf", ARCHIVE, "."]  # fmt: skip
            subprocess.run(tar_cmd, env=dict(os.environ, XZ_OPT="-9e"), check=True)
            print(f"wrote {ARCHIVE} ({ARCHIVE.stat().st_size:,} bytes)")
        elif problems:
            return 1
        return rc


if __name__ == "__main__":
    raise SystemExit(main())
