"""Shared fixtures: real torch checkpoints, written once per test session.

``tests/data/make_fixtures.py`` runs in a subprocess (one gloo process group per world size) and
writes every DCP checkpoint plus its references into a session temporary folder. Set
``FASTCKPT_FIXTURES=/some/dir`` to keep and reuse them across sessions while developing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
GENERATOR = HERE / "data" / "make_fixtures.py"

# (case, variant) pairs: every DCP folder the generator writes
MODEL_CASES = [
    "llama_tied_fp32_ws1",
    "nemo_llama_untied_fp32_ws2",
    "llama_tied_bf16_ws2",
    "rlinf_llama_untied_bf16_ws2",
    "llama_odd_fp32_ws3",
    "prime_qwen2_tied_fp32_ws3",
    "qwen2_untied_bf16_ws3",
]
DTENSOR_CASES = ["dtensor_ws3", "dtensor_ws4"]
ALL_DCP = [
    *[(c, "dcp") for c in MODEL_CASES],
    ("llama_tied_bf16_ws2", "dcp_threads2"),
    ("llama_tied_bf16_ws2", "dcp_per_item"),
    ("llama_tied_bf16_ws2", "dcp_nocoll"),
    ("dtensor_ws3", "dcp"),
    ("dtensor_ws4", "dcp"),
    ("dtensor_ws4", "dcp_nocoll"),
]
WITH_GLOBAL_METADATA = [cv for cv in ALL_DCP if cv[1] != "dcp_nocoll"]

# import name -> distribution of the ``test`` extra (pyproject.toml)
TEST_EXTRA = {
    "torch": "torch",
    "transformers": "transformers",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface_hub",
    "peft": "peft",
    "deepspeed": "deepspeed",
    "zstandard": "zstandard",
    "ml_dtypes": "ml_dtypes",
    "hypothesis": "hypothesis",
    "pytest_benchmark": "pytest-benchmark",
}


def environment_problems() -> list[str]:
    """What keeps this interpreter from running the suite: fastckpt not built and installed, or a
    package of the test extra missing (one line each; found without importing them)."""
    import importlib
    import importlib.util

    problems = []
    try:
        importlib.import_module("fastckpt._core")
    except ImportError as exc:
        problems.append(f"fastckpt is not installed with its compiled core ({exc})")
    for module, dist in TEST_EXTRA.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # blocked (sys.modules[name] = None) or broken
            found = False
        if not found:
            problems.append(f"{dist} is not installed")
    return problems


def pytest_sessionstart(session: pytest.Session) -> None:
    """Fail once, clearly, when the environment is incomplete (instead of one error per test)."""
    problems = environment_problems()
    if problems:
        lines = "\n  ".join(problems)
        pytest.exit(
            f"the test environment is incomplete ({sys.executable}):\n  {lines}\n"
            "install what the tests need with: pip install '.[test]'",
            returncode=4,
        )


def run_generator(script: Path, out: Path, *, timeout: int = 900) -> None:
    """Run a fixture generator (``script OUT``) under this Python, one thread per process; it
    writes ``OUT/done.json`` last. A failure raises with the tail of its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", str(script), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0 or not (out / "done.json").exists():
        # every test on these fixtures would fail the same way: stop the session, once
        pytest.exit(
            f"fixture generator {script.name} failed (rc={proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}",
            returncode=3,
        )


def generated(
    factory: pytest.TempPathFactory, name: str, script: Path, *, keep_env: str, timeout: int = 900
) -> Path:
    """The folder ``script`` fills: a fresh temporary one, or ``$keep_env`` (kept between
    sessions; generated only when it has no ``done.json`` yet)."""
    keep = os.environ.get(keep_env)
    root = Path(keep) if keep else factory.mktemp(name)
    if not (root / "done.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        run_generator(script, root, timeout=timeout)
    return root


@pytest.fixture(scope="session")
def fixtures_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding every generated case (``<root>/<case>/...``)."""
    return generated(tmp_path_factory, "fixtures", GENERATOR, keep_env="FASTCKPT_FIXTURES")


@dataclass
class Case:
    """One generated checkpoint family: several DCP variants sharing one reference."""

    root: Path

    @cached_property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.root / "meta.json").read_text())

    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def tied(self) -> bool:
        return bool(self.meta.get("tied", False))

    @property
    def is_model(self) -> bool:
        return self.meta["kind"] == "model"

    def dcp(self, variant: str = "dcp") -> Path:
        return self.root / self.meta["dcp"][variant]

    @property
    def hf(self) -> Path | None:
        return self.root / self.meta["hf"] if self.meta["hf"] else None

    @property
    def model_keys(self) -> list[str]:
        """Full state-dict names in the model's ``state_dict()`` order (tied lm_head included)."""
        return list(self.meta["model_keys"])

    @property
    def out_keys(self) -> list[str]:
        """Names fastckpt must write, in state-dict order (tied ``lm_head.weight`` left out)."""
        return [k for k in self.model_keys if not (self.tied and k == "lm_head.weight")]

    def reference(self) -> dict[str, Any]:
        """The unsharded state dict as torch tensors (fresh copy each call)."""
        from safetensors.torch import load_file

        return load_file(str(self.root / "reference.safetensors"))

    def expected(self) -> dict[str, Any]:
        ref = self.reference()
        return {k: ref[k] for k in self.out_keys}

    def logits(self) -> Any:
        import torch

        return torch.load(self.root / "logits.pt", weights_only=True)


@pytest.fixture(scope="session")
def cases(fixtures_root: Path) -> dict[str, Case]:
    return {name: Case(fixtures_root / name) for name in MODEL_CASES + DTENSOR_CASES}


# ---------------------------------------------------------------------------------------------
# Helpers (plain functions, imported by the test modules)
# ---------------------------------------------------------------------------------------------


def raw_bytes(t: Any) -> bytes:
    """The C-order bytes of a torch tensor, whatever its dtype (bf16 and bool included)."""
    import torch

    t = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return bytes(t.view(torch.uint8).numpy().tobytes())


def assert_bit_equal(got: Any, want: Any, name: str = "") -> None:
    """Same dtype, same shape, same bytes."""
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {got.shape} != {want.shape}"
    assert raw_bytes(got) == raw_bytes(want), f"{name}: bytes differ"


def ulps(a: Any, b: Any) -> int:
    """The largest distance in units in the last place between two float tensors."""
    import torch

    def ordered(t: Any) -> Any:  # float bits as integers ordered like the values
        bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype]
        i = t.contiguous().view(bits).to(torch.int64)
        top = 1 << (torch.finfo(t.dtype).bits - 1)
        return torch.where(i < 0, -(i + top), i)

    assert a.dtype == b.dtype and a.shape == b.shape
    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def flatten_tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    """The tensors of a nested state dict (``torch.load`` of a full checkpoint) by dotted key."""
    import torch

    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten_tensors(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, torch.Tensor):
        return {prefix[:-1]: obj}
    return {}


def load_output(folder: Path) -> dict[str, Any]:
    """Every tensor of every ``*.safetensors`` file in ``folder`` (duplicates are an error)."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        part = load_file(str(f))
        dup = set(part) & set(out)
        assert not dup, f"{sorted(dup)} written twice"
        out.update(part)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(root: Path) -> dict[str, tuple[int, str]]:
    """Name -> (mode, sha256) for every entry under ``root`` (directories included)."""
    out: dict[str, tuple[int, str]] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        st = p.lstat()
        out[rel] = (st.st_mode, sha256(p) if p.is_file() else "")
    return out


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(header length N, parsed header) of a safetensors file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8 : 8 + n])


@pytest.fixture
def convert_to(tmp_path: Path) -> Callable[..., Path]:
    """``convert_to(src, **kwargs)`` converts into a fresh folder under ``tmp_path``."""
    import fastckpt

    counter = iter(range(10_000))

    def run(src: Path, **kwargs: Any) -> Path:
        dst = tmp_path / f"out{next(counter)}"
        report = fastckpt.convert(src, dst, **kwargs)
        assert Path(report.dst) == dst
        return dst

    return run


@pytest.fixture(scope="session")
def converted(
    cases: dict[str, Case], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, str], Path]:
    """Default conversion of ``(case, variant)``, done once per session and shared read-only."""
    import fastckpt

    base = tmp_path_factory.mktemp("converted")
    done: dict[tuple[str, str], Path] = {}

    def get(case: str, variant: str = "dcp") -> Path:
        key = (case, variant)
        if key not in done:
            dst = base / f"{case}-{variant}"
            fastckpt.convert(cases[case].dcp(variant), dst)
            done[key] = dst
        return done[key]

    return get


@pytest.fixture
def torch_single_thread() -> Iterator[None]:
    """Run torch math on one thread, as the generator did, so results are reproducible."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pytest_configure(config: pytest.Config) -> None:
    # hypothesis inspects annotations when it reports a failure; on this stack that touches
    # mypy_extensions.TypedDict, whose DeprecationWarning would turn the report into an error
    config.addinivalue_line(
        "filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
    )


# ---------------------------------------------------------------------------------------------
# PEFT LoRA + optimizer fixtures (tests/data/make_lora_fixtures.py), shared by test_lora.py and
# test_optimizer.py; FASTCKPT_LORA_FIXTURES=/some/dir keeps them between sessions
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def lora_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    script = HERE / "data" / "make_lora_fixtures.py"
    return generated(
        tmp_path_factory, "lora", script, keep_env="FASTCKPT_LORA_FIXTURES", timeout=600
    )
