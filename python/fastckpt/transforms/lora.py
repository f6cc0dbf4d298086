"""PEFT LoRA checkpoints: merge the adapters, export them, or strip them.

Training-time PEFT names (``shared/formats/torch-pickles.md`` §7)::

    base_model.model.<fqn>.base_layer.weight     the frozen base weight W [out, in]
    base_model.model.<fqn>.lora_A.default.weight A [r, in]
    base_model.model.<fqn>.lora_B.default.weight B [out, r]

Three modes (``convert(lora=...)`` / ``--lora``):

* ``merge``: ``W + s * (B @ A)`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA),
  computed in fp32 with numpy, one tensor at a time (the pieces are read with ``_core.gather``),
  then cast back to W's dtype (round to nearest even) by the Rust writer. Each merged tensor is
  spilled as raw fp32 into the temporary output folder and becomes an ordinary one-chunk source,
  so sharding, ordering and casting stay in the one writer pass; memory stays bounded by a few
  copies of the largest merged tensor.
* ``adapter``: ``adapter_model.safetensors`` with PEFT's saved names (no adapter name) and an
  ``adapter_config.json`` with the real ``r`` and ``lora_alpha``.
* ``strip``: the base weights only, ``.base_layer.`` folded back into the plain names.

``lora_alpha`` cannot be read from the weights: it comes from ``lora_alpha=``, a veRL
``lora_train_meta.json`` or a PEFT ``adapter_config.json`` found beside the checkpoint, and is
never defaulted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastckpt import _core
from fastckpt._core import FastckptError, MappingError, ShapeError
from fastckpt.catalog import Chunk, TensorEntry

if TYPE_CHECKING:  # numpy is imported where a merge runs: `fastckpt convert` starts faster
    import numpy as np

#: what ``lora=`` accepts
MODES = ("merge", "adapter", "strip")
#: the prefix PEFT puts in front of the wrapped model's names
PEFT_PREFIX = "base_model.model."
#: ``<module>.lora_A[.<adapter>].weight``
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
#: PEFT tensors fastckpt does not know how to merge or export
_UNSUPPORTED = re.compile(
    r"\.(?:lora_embedding_[AB]|lora_magnitude_vector|modules_to_save|original_module)(?:\.|$)"
    r"|\.lora_[AB](?:\.[^.]+)?\.bias$"
)
#: training metadata files, best first
META_FILES = ("lora_train_meta.json", "adapter_config.json")


def has_lora(names: Sequence[str]) -> bool:
    """True when any tensor name is a LoRA tensor (``lora_A``/``lora_B``/``lora_embedding``...)."""
    return any(".lora_" in n or ".base_layer." in n for n in names)


def plain_name(name: str) -> str:
    """``base_model.model.X.base_layer.weight`` -> ``X.weight``."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


@dataclass(frozen=True)
class LoraParams:
    """LoRA hyperparameters and where each came from."""

    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    task_type: str | None
    config: dict[str, Any]  # the PEFT adapter_config.json found, if any (else {})
    sources: dict[str, str]

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


@dataclass(frozen=True)
class _Module:
    module: str  # name before .lora_A
    a: TensorEntry
    b: TensorEntry


@dataclass
class Merge:
    """One merged weight: computed at write time into ``path`` (raw fp32, C order)."""

    name: str
    base: TensorEntry
    a: TensorEntry
    b: TensorEntry
    scale: float
    fan_in_fan_out: bool
    path: Path

    def entry(self) -> TensorEntry:
        shape = self.base.meta.shape
        meta = replace(self.base.meta, name=self.name, dtype="F32", n_chunks=1)
        if not math.prod(shape):
            return TensorEntry(replace(meta, n_chunks=0), ())
        strides = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        chunk = Chunk(
            path=str(self.path),
            data_offset=0,
            data_len=math.prod(shape) * 4,
            storage_offset=0,
            strides=tuple(strides),
            offsets=(0,) * len(shape),
            sizes=shape,
        )
        return TensorEntry(meta, (chunk,))

    def compute(self) -> None:
        """Read W, A, B as fp32, write ``W + scale * (B @ A)`` (fp32) to ``path``."""
        import numpy as np

        w = _gather_f32(self.base)
        delta = _gather_f32(self.b) @ _gather_f32(self.a)
        if self.fan_in_fan_out:
            delta = delta.T
        delta *= np.float32(self.scale)  # PEFT: (B @ A) * scaling, then W += delta
        w += delta
        self.path.parent.mkdir(parents=True, exist_ok=True)
        np.ascontiguousarray(w).tofile(self.path)


def _gather_f32(entry: TensorEntry) -> np.ndarray[Any, np.dtype[np.float32]]:
    import numpy as np

    out = np.empty(entry.meta.numel, dtype=np.float32)
    _core.gather(entry.source(), "F32", out)
    return out.reshape(entry.meta.shape)


@dataclass
class LoraPlan:
    """What to write for one LoRA mode."""

    entries: list[TensorEntry]
    merges: list[Merge] = field(default_factory=list)
    out_dtype: dict[str, str] = field(default_factory=dict)  # merged name -> W's dtype
    adapter_config: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FastckptError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise FastckptError(f"{path}: expected a JSON object")
    return data


def find_meta(dirs: Sequence[Path]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """The first ``lora_train_meta.json`` and ``adapter_config.json`` found in ``dirs``."""
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    for d in dirs:
        for name in META_FILES:
            p = d / name
            if name not in found and p.is_file():
                found[name] = (p, _read_json(p))
    return found


def resolve_params(
    modules: list[_Module],
    dirs: Sequence[Path],
    *,
    alpha: float | None,
    rslora: bool | None,
) -> LoraParams:
    """Hyperparameters from the arguments, ``lora_train_meta.json`` or ``adapter_config.json``."""
    ranks = {m.a.meta.shape[0] for m in modules if m.a.meta.shape}
    if len(ranks) != 1:
        raise ShapeError(
            f"LoRA ranks differ between modules ({sorted(ranks)}); per-module ranks "
            "(rank_pattern) are not supported"
        )
    (r,) = ranks
    found = find_meta(dirs)
    sources: dict[str, str] = {"r": "lora_A shapes"}
    config = found.get("adapter_config.json", (None, {}))[1]
    for name in META_FILES:
        if name in found:
            path, meta = found[name]
            declared = meta.get("r")
            if isinstance(declared, int) and declared != r:
                raise ShapeError(f"{path}: says r={declared}, but the lora_A tensors have rank {r}")
            for key in ("rank_pattern", "alpha_pattern"):
                if meta.get(key):
                    raise FastckptError(f"{path}: per-module {key} is not supported")
    value: float | None = alpha
    if value is not None:
        sources["lora_alpha"] = "the lora_alpha argument"
    else:
        for name in META_FILES:
            if name in found and isinstance(found[name][1].get("lora_alpha"), int | float):
                value = float(found[name][1]["lora_alpha"])
                sources["lora_alpha"] = str(found[name][0])
                break
    if value is None:
        looked = ", ".join(str(d) for d in dirs)
        raise FastckptError(
            "lora_alpha is unknown: it is not stored in the weights and no lora_train_meta.json "
            f"or adapter_config.json was found (looked in: {looked}); pass --lora-alpha "
            "(lora_alpha=) with the value used in training"
        )
    if not value > 0:
        raise FastckptError(f"lora_alpha must be positive, got {value} ({sources['lora_alpha']})")
    use_rs: bool | None = rslora
    if use_rs is not None:
        sources["use_rslora"] = "the lora_rslora argument"
    else:
        for name in META_FILES:
            if name in found and isinstance(found[name][1].get("use_rslora"), bool):
                use_rs = bool(found[name][1]["use_rslora"])
                sources["use_rslora"] = str(found[name][0])
                break
    task = None
    for name in META_FILES:
        if name in found and isinstance(found[name][1].get("task_type"), str):
            task = str(found[name][1]["task_type"])
            break
    return LoraParams(
        r=int(r),
        alpha=float(value),
        rslora=bool(use_rs),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        task_type=task,
        config=dict(config),
        sources=sources,
    )


def _modules(entries: list[TensorEntry]) -> tuple[dict[str, _Module], list[TensorEntry]]:
    """Split entries into LoRA modules and the rest; refuse what cannot be handled."""
    halves: dict[str, dict[str, TensorEntry]] = {}
    adapters: set[str] = set()
    rest = []
    for e in entries:
        if _UNSUPPORTED.search(e.name):
            raise FastckptError(
                f"tensor {e.name!r}: LoRA on embeddings, DoRA, LoRA biases and modules_to_save "
                "are not supported"
            )
        m = _LORA.match(e.name)
        if m is None:
            rest.append(e)
            continue
        adapters.add(m.group("adapter") or "")
        halves.setdefault(m.group("module"), {})[m.group("ab")] = e
    if len(adapters) > 1:
        shown = ", ".join(sorted(a or "(none)" for a in adapters))
        raise FastckptError(f"several LoRA adapters in one checkpoint ({shown}); not supported")
    modules = {}
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise MappingError(f"LoRA module {module!r} has no {missing} tensor")
        a, b = ab["A"], ab["B"]
        if len(a.meta.shape) != 2 or len(b.meta.shape) != 2 or a.meta.shape[0] != b.meta.shape[1]:
            raise ShapeError(
                f"LoRA module {module!r}: lora_A {list(a.meta.shape)} and lora_B "
                f"{list(b.meta.shape)} do not form B @ A"
            )
        modules[module] = _Module(module, a, b)
    return modules, rest


def _rename(e: TensorEntry, name: str) -> TensorEntry:
    return TensorEntry(replace(e.meta, name=name), e.chunks)


def _check_unique(entries: list[TensorEntry]) -> None:
    seen: dict[str, str] = {}
    for e in entries:
        if e.name in seen:
            raise MappingError(
                f"tensors {seen[e.name]!r} and {e.meta.key!r} both map to {e.name!r}"
            )
        seen[e.name] = e.meta.key


def plan(
    entries: list[TensorEntry],
    mode: str,
    *,
    dirs: Sequence[Path],
    spill_dir: Path,
    alpha: float | None,
    rslora: bool | None,
    config: dict[str, Any] | None,
) -> LoraPlan:
    """Plan ``mode`` (``merge``/``adapter``/``strip``) over located model entries."""
    if mode not in MODES:
        raise FastckptError(f"invalid lora mode {mode!r} (use merge, adapter or strip)")
    modules, rest = _modules(entries)
    if mode == "strip":
        stripped = [_rename(e, plain_name(e.name)) for e in rest]
        _check_unique(stripped)
        return LoraPlan(stripped)
    if not modules:
        raise MappingError(f"--lora {mode}: the checkpoint has no lora_A/lora_B tensors")
    params = resolve_params(list(modules.values()), dirs, alpha=alpha, rslora=rslora)
    warnings = []
    if mode == "adapter":
        adapter = []
        for m in modules.values():
            adapter.append(_rename(m.a, f"{m.module}.lora_A.weight"))
            adapter.append(_rename(m.b, f"{m.module}.lora_B.weight"))
        _check_unique(adapter)
        return LoraPlan(adapter, adapter_config=_adapter_config(params, modules, config))
    by_name = {e.name: e for e in rest}
    merges = []
    used = set()
    for i, m in enumerate(modules.values()):
        base = by_name.get(f"{m.module}.base_layer.weight") or by_name.get(f"{m.module}.weight")
        if base is None:
            raise MappingError(
                f"LoRA module {m.module!r} has no base weight ({m.module}.base_layer.weight): "
                "an adapter-only checkpoint cannot be merged; use --lora adapter"
            )
        want = (m.b.meta.shape[0], m.a.meta.shape[1])
        got = base.meta.shape[::-1] if params.fan_in_fan_out else base.meta.shape
        if tuple(got) != want:
            raise ShapeError(
                f"LoRA module {m.module!r}: B @ A is {list(want)} but the base weight is "
                f"{list(base.meta.shape)}"
            )
        used.add(base.name)
        merges.append(
            Merge(
                name=plain_name(base.name),
                base=base,
                a=m.a,
                b=m.b,
                scale=params.scale,
                fan_in_fan_out=params.fan_in_fan_out,
                path=spill_dir / f"{i:06d}.f32",
            )
        )
    if "use_rslora" not in params.sources:
        warnings.append(
            f"merged LoRA with scale lora_alpha/r = {params.alpha:g}/{params.r}; no "
            "use_rslora setting was found: pass --lora-rslora if training used rsLoRA"
        )
    merged = {mg.base.name: mg for mg in merges}
    out: list[TensorEntry] = []
    for e in rest:
        if e.name in merged:
            out.append(merged[e.name].entry())
        else:
            out.append(_rename(e, plain_name(e.name)))
    _check_unique(out)
    dtypes = {mg.name: mg.base.meta.dtype for mg in merges}
    return LoraPlan(out, merges=merges, out_dtype=dtypes, warnings=warnings)


def _adapter_config(
    params: LoraParams, modules: dict[str, _Module], config: dict[str, Any] | None
) -> dict[str, Any]:
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    task = params.task_type
    if task is None:
        archs = (config or {}).get("architectures") or []
        if any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs):
            task = "CAUSAL_LM"
    out: dict[str, Any] = {
        "base_model_name_or_path": (config or {}).get("_name_or_path") or None,
        "bias": "none",
        "fan_in_fan_out": params.fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": params.alpha if not params.alpha.is_integer() else int(params.alpha),
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": params.r,
        "target_modules": targets,
        "task_type": task,
        "use_dora": False,
        "use_rslora": params.rslora,
    }
    keep = {k: v for k, v in params.config.items() if k not in out or k in ("lora_dropout",)}
    keep.pop("peft_version", None)
    return dict(sorted({**out, **keep}.items()))


def adapter_config_bytes(config: dict[str, Any]) -> bytes:
    """``adapter_config.json`` as PEFT writes it (2-space indent, sorted keys)."""
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
