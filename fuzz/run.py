"""Run one fuzz target under atheris (coverage-guided, libFuzzer options pass through).

Examples:
    python fuzz/run.py pickle -max_total_time=120 fuzz/seeds/pickle
    python fuzz/run.py zip -runs=2000 fuzz/seeds/zip

Targets: see ``fuzz/harnesses.py``. Exit status 0 means no crash (every input gave a result or
a FastckptError); a crash leaves ``crash-*`` beside the working directory, as libFuzzer does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["fastckpt"]):
    import fastckpt.formats.registry
    import fastckpt.transforms.optimizer  # noqa: F401

from harnesses import TARGETS, run_one


def main() -> None:
    name = sys.argv.pop(1)
    if name not in TARGETS:
        raise SystemExit(f"unknown target {name!r} (one of {', '.join(TARGETS)})")
    atheris.Setup(sys.argv, lambda data: run_one(name, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
