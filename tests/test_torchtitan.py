"""torchtitan checkpoints converted to Hugging Face names, checked against torchtitan's own
``to_hf`` adapter.

``tests/data/torchtitan/CASE/`` was written by torchtitan 0.3's own code
(``tests/data/make_torchtitan_fixtures.py``: its ``Llama3Model``, ``OptimizersContainer`` and
``CheckpointManager.save()`` on 2 CPU gloo ranks with FSDP2), next to ``ref/``: torchtitan's
``Llama3StateDictAdapter.to_hf`` of the full model state dict, the matching ``config.json`` and
torchtitan's logits. ``fused`` is 0.3's default (a fused ``wqkv`` saved whole as ``wq``/``wk``/
``wv``), ``unfused`` has row-sharded ``wq``/``wk`` whose shard boundaries fall inside a head.
``qwen3_moe`` and ``deepseek_v3`` hold torchtitan's real names for those families on small
tensors (saved with ``dcp.save`` in torchtitan's layout) and their own adapters' ``to_hf``.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import fastckpt
import pytest
from conftest import assert_bit_equal, load_output
from fastckpt import MappingError
from fastckpt.catalog import Chunk
from fastckpt.formats.registry import detect, open_catalogue
from fastckpt.formats.torchtitan import permute_rows, rope_rows, select_first

DATA = Path(__file__).parent / "data" / "torchtitan"
CASES = ["fused", "unfused"]


def _step(case: str) -> Path:
    return DATA / case / "run" / "checkpoint" / "step-1"


def _load(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return dict(load_file(path))


def _hf_permute(w: Any, n_heads: int, dim1: int, dim2: int) -> Any:
    """torchtitan's ``Llama3StateDictAdapter._permute`` (itself an exact copy of Hugging Face's
    conversion script), for the unit tests of the box views below."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


@pytest.mark.parametrize("case", CASES)
def test_llama3_equals_torchtitan_to_hf(case: str, tmp_path: Path) -> None:
    """Every tensor, bit for bit, as torchtitan's own to_hf (q/k rows permuted per head)."""
    src, ref = _step(case), DATA / case / "ref"
    assert detect(src) == "torchtitan"
    out = tmp_path / "out"
    report = fastckpt.convert(src, out, config_from=ref, fsync=False)
    want = _load(ref / "hf_model.safetensors")
    got = load_output(out)
    assert sorted(got) == sorted(want) and report.n_tensors == len(want)
    for name, t in want.items():
        assert_bit_equal(got[name], t, name)
    assert not any("torchtitan's" in w for w in report.warnings), report.warnings
    assert (out / "config.json").read_bytes() == (ref / "config.json").read_bytes()


@pytest.mark.parametrize(
    ("case", "unmapped"), [("qwen3_moe", "moe.expert_bias_E"), ("deepseek_v3", None)]
)
def test_moe_families_equal_torchtitan_to_hf(
    case: str, unmapped: str | None, tmp_path: Path
) -> None:
    """Experts stored stacked ([E, F, D]) come out one tensor per expert; deepseek's MTP layer
    is numbered after the main layers. What the adapter drops (qwen3's load-balancing
    ``expert_bias_E``, which Hugging Face's Qwen3-MoE has no place for) is kept, with a warning."""
    src, ref = _step(case), DATA / case / "ref"
    want = _load(ref / "hf_model.safetensors")
    out = tmp_path / "out"
    fastckpt.convert(src, out, config_from=ref, fsync=False)
    got = load_output(out)
    kept = sorted(set(got) - set(want))
    assert sorted(set(got) & set(want)) == sorted(want)
    for name, t in want.items():
        assert_bit_equal(got[name], t, name)
    assert all(unmapped and n.endswith(unmapped) for n in kept), kept
    cat = open_catalogue(src, hf_config=json.loads((ref / "config.json").read_text()))
    warnings = cat.warnings
    assert bool(warnings) == bool(kept) and all(kept[0] in w for w in warnings)
    if case == "deepseek_v3":
        assert any(".experts.0.gate_proj" in n for n in want)
        layers = {int(n.split(".")[2]) for n in want if n.startswith("model.layers.")}
        assert f"model.layers.{max(layers)}.eh_proj.weight" in want


def test_unfused_q_k_come_from_several_chunks() -> None:
    """The case the box views must get right: a DCP chunk boundary inside a head."""
    cat = open_catalogue(
        _step("unfused"),
        hf_config=json.loads((DATA / "unfused" / "ref" / "config.json").read_text()),
    )
    (q,) = cat.locate(["model.layers.0.self_attn.q_proj.weight"])
    (k,) = cat.locate(["model.layers.0.self_attn.k_proj.weight"])
    assert len({c.path for c in q.chunks}) == 2 and len({c.path for c in k.chunks}) == 2


def test_transformers_loads_the_output_with_torchtitans_logits(tmp_path: Path) -> None:
    import torch
    from transformers import LlamaForCausalLM

    ref = DATA / "fused" / "ref"
    out = tmp_path / "out"
    fastckpt.convert(_step("fused"), out, config_from=ref, fsync=False)
    model = LlamaForCausalLM.from_pretrained(out).eval()
    want = _load(ref / "logits.safetensors")
    with torch.no_grad():
        logits = model(want["ids"]).logits
    torch.testing.assert_close(logits, want["logits"], rtol=1e-4, atol=1e-5)


def test_run_latest_with_config_beside(tmp_path: Path) -> None:
    """The dump folder is a run; a config.json beside the checkpoint is found without
    --config-from (and by inspect)."""
    run = tmp_path / "run"
    shutil.copytree(DATA / "unfused" / "run", run)
    shutil.copy(DATA / "unfused" / "ref" / "config.json", run / "checkpoint" / "config.json")
    out = tmp_path / "out"
    report = fastckpt.convert(run, out, fsync=False)
    assert any("step 1" in n for n in report.notes)
    want = _load(DATA / "unfused" / "ref" / "hf_model.safetensors")
    got = load_output(out)
    assert sorted(got) == sorted(want) and report.n_tensors == len(want)
    for name, t in want.items():
        assert_bit_equal(got[name], t, name)
    info = fastckpt.inspect(run / "checkpoint" / "step-1")
    assert "model.layers.1.self_attn.q_proj.weight" in {t.name for t in info.tensors}
    assert any("torchtitan names mapped" in n for n in info.notes)


def test_with_optimizer_reads_torchtitans_flattened_optimizer(tmp_path: Path) -> None:
    """The optimizer state keeps torchtitan's parameter names (``state.<fqn>.<name>``)."""
    out = tmp_path / "out"
    fastckpt.convert(
        _step("unfused"), out, config_from=DATA / "unfused" / "ref", with_optimizer=True,
        fsync=False,
    )  # fmt: skip
    optim = _load(out / "optimizer.safetensors")
    assert optim["state.layers.0.attention.qkv_linear.wq.weight.exp_avg"].shape == (24, 24)


def test_without_config_names_stay_torchtitans_with_a_warning(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = fastckpt.convert(_step("fused"), out, fsync=False)
    got = load_output(out)
    assert "tok_embeddings.weight" in got and "layers.0.attention.qkv_linear.wq.weight" in got
    assert any("torchtitan's" in w for w in report.warnings)


def test_config_of_another_family_keeps_names(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    config = json.loads((DATA / "fused" / "ref" / "config.json").read_text())
    (cfg / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    cat = open_catalogue(_step("fused"), hf_config=json.loads((cfg / "config.json").read_text()))
    assert "tok_embeddings.weight" in cat.tensors
    assert any("model_type 'gpt2'" in n for n in cat.notes)


def test_head_counts_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    config = json.loads((DATA / "fused" / "ref" / "config.json").read_text())
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 2}))
    with pytest.raises(MappingError, match=r"wk\.weight.*rotary permutation"):
        fastckpt.convert(_step("fused"), tmp_path / "out", config_from=cfg, fsync=False)
    assert not (tmp_path / "out").exists()


def test_unknown_names_are_kept_with_a_warning(tmp_path: Path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    state = {
        "tok_embeddings.weight": torch.randn(5, 4),
        "layers.0.attention.sinks": torch.randn(2),
        "norm.weight": torch.randn(4),
        "optimizer": {"state": {"norm.weight": {"exp_avg": torch.zeros(4)}}},
    }
    src = tmp_path / "ckpt"
    dcp.save(state, checkpoint_id=src, no_dist=True)
    config = {"model_type": "llama", "num_attention_heads": 2, "hidden_size": 4}
    cat = open_catalogue(src, hf_config=config)
    assert sorted(cat.model_names()) == [
        "layers.0.attention.sinks",
        "model.embed_tokens.weight",
        "model.norm.weight",
    ]
    warnings = cat.warnings
    assert any("layers.0.attention.sinks" in w and "no Hugging Face name" in w for w in warnings)


# --------------------------------------------------------------------------------------------
# the box views, on chunk layouts real checkpoints may have (rows and columns split anywhere)


def _gather(chunks: tuple[Chunk, ...], shape: tuple[int, ...]) -> Any:
    import numpy as np
    import torch
    from fastckpt import _core

    out = np.empty(int(np.prod(shape)) * 4, np.uint8)
    _core.gather(("t", "F32", list(shape), list(chunks)), "F32", out)
    return torch.from_numpy(out.view(np.float32).reshape(shape).copy())


def _stored(tmp_path: Path, w: Any, rows: list[int], cols: list[int]) -> tuple[Chunk, ...]:
    """``w`` stored as boxes split at ``rows`` x ``cols``, each box its own C-order storage
    (one file), as DCP chunks are."""
    path = tmp_path / "data.bin"
    chunks = []
    offset = 0
    with open(path, "wb") as f:
        for r0, r1 in itertools.pairwise(rows):
            for c0, c1 in itertools.pairwise(cols):
                box = w[r0:r1, c0:c1].contiguous()
                data = box.numpy().tobytes()
                f.write(data)
                chunks.append(
                    Chunk(
                        str(path), offset, len(data), 0, (c1 - c0, 1), (r0, c0), (r1 - r0, c1 - c0)
                    )
                )
                offset += len(data)
    return tuple(chunks)


@pytest.mark.parametrize(
    ("heads", "head_dim", "rows", "cols"),
    [
        (3, 8, [0, 24], [0, 5]),
        (3, 8, [0, 12, 24], [0, 5]),
        (3, 8, [0, 5, 13, 24], [0, 2, 5]),
        (1, 8, [0, 3, 4, 8], [0, 5]),
        (4, 2, [0, 1, 2, 3, 8], [0, 5]),
    ],
)
def test_rope_permutation_as_boxes(
    tmp_path: Path, heads: int, head_dim: int, rows: list[int], cols: list[int]
) -> None:
    import torch

    n = heads * head_dim
    w = torch.randn(n, cols[-1])
    got = _gather(
        permute_rows(_stored(tmp_path, w, rows, cols), rope_rows(n, heads)), (n, cols[-1])
    )
    assert torch.equal(got, _hf_permute(w, heads, n, cols[-1]))


@pytest.mark.parametrize("rows", [[0, 4], [0, 1, 3, 4], [0, 2, 4]])
def test_expert_split_as_boxes(tmp_path: Path, rows: list[int]) -> None:
    import torch

    w = torch.randn(4, 6, 5)  # [E, F, D], stored split along E and F
    chunks = []
    path = tmp_path / "experts.bin"
    offset = 0
    with open(path, "wb") as f:
        for e0, e1 in itertools.pairwise(rows):
            for f0, f1 in ((0, 2), (2, 6)):
                data = w[e0:e1, f0:f1].contiguous().numpy().tobytes()
                f.write(data)
                chunks.append(Chunk(str(path), offset, len(data), 0, ((f1 - f0) * 5, 5, 1),
                                    (e0, f0, 0), (e1 - e0, f1 - f0, 5)))  # fmt: skip
                offset += len(data)
    for e in range(4):
        assert torch.equal(_gather(select_first(tuple(chunks), e), (6, 5)), w[e])
