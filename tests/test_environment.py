"""The suite's own guard: an incomplete environment stops the session with one clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_incomplete_environment_is_one_message(tmp_path: Path) -> None:
    """A missing package of the test extra stops pytest before any test runs, naming it once."""
    (tmp_path / "test_nothing.py").write_text("def test_nothing() -> None:\n    pass\n")
    suite = HERE / "conftest.py"
    (tmp_path / "conftest.py").write_text(
        "import importlib.util, sys\n"
        "sys.modules['peft'] = None  # as if the test extra were only half installed\n"
        f"spec = importlib.util.spec_from_file_location('suite_conftest', {str(suite)!r})\n"
        "suite = sys.modules['suite_conftest'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(suite)\n"
        "pytest_sessionstart = suite.pytest_sessionstart\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out
    assert "the test environment is incomplete" in out
    assert (
        out.count("peft is not installed") == 2
    )  # the message, echoed once by pytest's exit banner
    assert "pip install '.[test]'" in out
    assert "1 passed" not in out
