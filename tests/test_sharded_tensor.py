"""FSDP1 ``ShardedTensor`` rank files (``SHARDED_STATE_DICT`` without a device mesh; issue 10).

Real files come from ``tests/data/make_sharded_tensor_fixtures.py`` (torch's own FSDP1 on two
CPU gloo ranks), run once per session; set ``FASTCKPT_ST_FIXTURES=/some/dir`` to keep them.
Hostile ShardedTensor pickles are written here from opcodes, with the globals torch names.
"""

from __future__ import annotations

import shutil
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastckpt
import pytest
import torch
from conftest import generated
from fastckpt import FormatError, ShapeError
from safetensors.torch import load_file

GENERATOR = Path(__file__).parent / "data" / "make_sharded_tensor_fixtures.py"
SHARD = "torch.distributed._shard"


@pytest.fixture(scope="session")
def st_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated(tmp_path_factory, "sharded_tensor", GENERATOR, keep_env="FASTCKPT_ST_FIXTURES")


@pytest.fixture(autouse=True)
def canary(tmp_path: Path) -> Iterator[Path]:
    """A file that a pickle executing code would create (the payloads below name it)."""
    path = tmp_path / "CANARY"
    yield path
    assert not path.exists(), "a pickle executed code"


def _bits(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def test_fsdp1_llama_bitexact(st_root: Path, tmp_path: Path) -> None:
    case = st_root / "llama"
    out = tmp_path / "out"
    fastckpt.convert(case, out)
    got: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(str(f)))
    ref = load_file(str(case / "ref" / "model.safetensors"))
    assert set(got) == set(ref)
    assert got["model.embed_tokens.weight"].shape == (67, 32)  # uneven: 34 + 33 rows
    for name, tensor in ref.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert _bits(got[name]) == _bits(tensor), name
    assert (out / "config.json").is_file()


def test_missing_rank_file_names_it(st_root: Path, tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(st_root / "llama", d)
    (d / "model_world_size_2_rank_1.pt").unlink()
    with pytest.raises(FormatError, match=r"model_world_size_2_rank_1\.pt: missing rank file"):
        fastckpt.convert(d, tmp_path / "out")


def test_one_rank_file_alone_names_tensor_and_region(st_root: Path, tmp_path: Path) -> None:
    """A rank file on its own would be a cut model: refused, naming the missing region."""
    src = st_root / "llama" / "model_world_size_2_rank_0.pt"
    with pytest.raises(ShapeError) as err:
        fastckpt.convert(src, tmp_path / "out")
    message = str(err.value)
    for needle in ("'model.embed_tokens.weight'", "offsets [34, 0] (sizes [33, 32])", "rank 1's"):
        assert needle in message, message
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# ShardedTensor pickles from opcodes (protocol 2), in torch.save archives


class G:
    """A global ``module.name``."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


class Call:
    """``fn(*args)`` (REDUCE)."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args


class Obj:
    """``cls.__new__(cls)`` then ``BUILD state`` (NEWOBJ + BUILD, as dataclasses pickle)."""

    def __init__(self, cls: G, state: Any) -> None:
        self.cls, self.state = cls, state


class Storage:
    """A persistent storage id ``('storage', FloatStorage, key, 'cpu', numel)``."""

    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


def _op(value: Any) -> bytes:
    if value is None:
        return b"N"
    if value is True or value is False:
        return b"\x88" if value else b"\x89"
    if isinstance(value, int):
        return b"J" + struct.pack("<i", value)
    if isinstance(value, str):
        raw = value.encode()
        return b"X" + struct.pack("<I", len(raw)) + raw
    if isinstance(value, tuple):
        return b"(" + b"".join(map(_op, value)) + b"t"
    if isinstance(value, list):
        return b"](" + b"".join(map(_op, value)) + b"e"
    if isinstance(value, dict):
        return b"}(" + b"".join(_op(k) + _op(v) for k, v in value.items()) + b"u"
    if isinstance(value, G):
        return b"c" + f"{value.module}\n{value.name}\n".encode()
    if isinstance(value, Call):
        return _op(value.fn) + _op(tuple(value.args)) + b"R"
    if isinstance(value, Obj):
        return _op(value.cls) + b")\x81" + _op(value.state) + b"b"
    if isinstance(value, Storage):
        pid = ("storage", G("torch", "FloatStorage"), value.key, "cpu", value.numel)
        return _op(pid) + b"Q"
    raise TypeError(value)


def _meta(offsets: list[int], sizes: list[int], rank: int) -> Obj:
    device = Obj(
        G("torch.distributed.remote_device", "_remote_device"),
        {"_worker_name": None, "_rank": rank, "_device": Call(G("torch", "device"), "cpu")},
    )
    return Obj(
        G(f"{SHARD}.metadata", "ShardMetadata"),
        (None, {"shard_offsets": offsets, "shard_sizes": sizes, "placement": device}),
    )


def _tensor(key: str, shape: tuple[int, ...]) -> Call:
    stride = (shape[1], 1) if len(shape) == 2 else (1,)
    numel = shape[0] * (shape[1] if len(shape) == 2 else 1)
    return Call(
        G("torch._utils", "_rebuild_tensor_v2"),
        Storage(key, numel),
        0,
        shape,
        stride,
        False,
        Call(G("collections", "OrderedDict")),
    )


def _sharded(
    size: list[int],
    shards: list[Obj],
    local: list[tuple[Any, Obj]],
    args_size: list[int] | None = None,
) -> Call:
    st = G(f"{SHARD}.sharded_tensor.api", "ShardedTensor")
    f32 = G("torch", "float32")
    props = Obj(
        G(f"{SHARD}.sharded_tensor.metadata", "TensorProperties"),
        (
            f32,
            "torch.strided",
            False,
            Call(G(f"{SHARD}.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"), 0),
            False,
            None,
        ),
    )
    metadata = Obj(
        G(f"{SHARD}.sharded_tensor.metadata", "ShardedTensorMetadata"),
        {
            "shards_metadata": shards,
            "size": Call(G("torch", "Size"), tuple(size)),
            "tensor_properties": props,
        },
    )
    local_shards = [
        Obj(G(f"{SHARD}.sharded_tensor.shard", "Shard"), (None, {"tensor": t, "metadata": m}))
        for t, m in local
    ]
    pg_state = Obj(
        Call(G("builtins", "getattr"), st, "ProcessGroupState"),
        {"local_rank": 0, "global_rank": 0, "local_world_size": 2, "global_world_size": 2},
    )
    args = (
        st,
        f32,
        tuple(args_size or size),
        (size[1], 1),
        0,
        "torch.strided",
        Call(G("torch", "device"), "cpu"),
        False,
    )
    state = (local_shards, metadata, pg_state, None, False)
    return Call(
        G("torch._tensor", "_rebuild_from_type_v2"),
        G("torch._utils", "_rebuild_wrapper_subclass"),
        st,
        args,
        state,
    )


def _write(path: Path, state: dict[str, Any], storages: dict[str, list[float]]) -> None:
    pkl = b"\x80\x02" + _op(state) + b"."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        for key, values in storages.items():
            zf.writestr(f"archive/data/{key}", struct.pack(f"<{len(values)}f", *values))


def _rows(lo: int, hi: int) -> list[float]:
    return [float(i) for i in range(lo * 3, hi * 3)]


def _pair(
    tmp_path: Path,
    shards: list[Obj],
    size: list[int] | None = None,
    locals_: tuple[Any, Any] | None = None,
    args_size: list[int] | None = None,
) -> Path:
    """Two rank files of a [5, 3] ShardedTensor ``w`` (rows 0-2 on rank 0, 3-4 on rank 1)."""
    d = tmp_path / "ckpt"
    d.mkdir()
    default = (
        (_tensor("0", (3, 3)), _meta([0, 0], [3, 3], 0)),
        (_tensor("0", (2, 3)), _meta([3, 0], [2, 3], 1)),
    )
    for rank, local in enumerate(locals_ or default):
        state = {"w": _sharded(size or [5, 3], shards, [local], args_size)}
        rows = _rows(0, 3) if rank == 0 else _rows(3, 5)
        _write(d / f"model_world_size_2_rank_{rank}.pt", state, {"0": rows})
    return d


GOOD = [_meta([0, 0], [3, 3], 0), _meta([3, 0], [2, 3], 1)]


def test_hand_written_pair_reads(tmp_path: Path) -> None:
    """The opcode builder writes what torch writes: the pair converts to arange(15)."""
    out = tmp_path / "out"
    fastckpt.convert(_pair(tmp_path, GOOD), out)
    got = load_file(str(out / "model.safetensors"))["w"]
    assert got.tolist() == torch.arange(15, dtype=torch.float32).reshape(5, 3).tolist()


def test_real_small_pair_reads(st_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    fastckpt.convert(st_root / "small", out)
    got = load_file(str(out / "model.safetensors"))
    assert got["w"].tolist() == torch.arange(15, dtype=torch.float32).reshape(5, 3).tolist()
    assert got["b"].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("shards", "size", "args_size", "error", "needle"),
    [
        pytest.param(
            [_meta([0, 0], [3, 3], 0), _meta([3, 0], [3, 3], 1)],
            None,
            None,
            ShapeError,
            "lies outside its global size [5, 3]",
            id="outside",
        ),
        pytest.param(
            [_meta([0, 0], [3, 3], 0), _meta([2, 0], [3, 3], 1)],
            None,
            None,
            ShapeError,
            "overlap",
            id="overlap",
        ),
        pytest.param(
            GOOD,
            [6, 3],
            [6, 3],
            ShapeError,
            "hold 15 elements but its global size [6, 3]",
            id="size-too-big",
        ),
        pytest.param(
            GOOD, None, [6, 3], FormatError, "disagrees with its metadata", id="args-size-disagrees"
        ),
        pytest.param(
            [*GOOD, _meta([5, 0], [1, 3], 2)],
            [6, 3],
            [6, 3],
            ShapeError,
            "missing its shard at offsets [5, 0] (sizes [1, 3]), rank 2's",
            id="missing",
        ),
    ],
)
def test_hostile_global_metadata(
    tmp_path: Path, shards: list[Obj], size: Any, args_size: Any, error: type, needle: str
) -> None:
    with pytest.raises(error) as err:
        fastckpt.convert(_pair(tmp_path, shards, size, args_size=args_size), tmp_path / "out")
    assert needle in str(err.value), str(err.value)
    if error is ShapeError:  # found when the catalogue is built: the tensor is named
        assert "ShardedTensor 'w'" in str(err.value)
    else:  # found while unpickling: the file is named
        assert "model_world_size_2_rank_0.pt: ShardedTensor pickle" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_local_shard_not_in_metadata(tmp_path: Path) -> None:
    locals_ = (
        (_tensor("0", (3, 3)), _meta([0, 0], [3, 3], 0)),
        (_tensor("0", (2, 3)), _meta([2, 0], [2, 3], 1)),
    )
    with pytest.raises(FormatError, match="does not list"):
        fastckpt.convert(_pair(tmp_path, GOOD, locals_=locals_), tmp_path / "out")


def test_local_tensor_shape_disagrees(tmp_path: Path) -> None:
    locals_ = (
        (_tensor("0", (3, 3)), _meta([0, 0], [3, 3], 0)),
        (_tensor("0", (1, 3)), _meta([3, 0], [2, 3], 1)),
    )
    with pytest.raises(ShapeError, match="metadata says float32 \\[2, 3\\]"):
        fastckpt.convert(_pair(tmp_path, GOOD, locals_=locals_), tmp_path / "out")


def test_payload_in_a_shard_executes_nothing(tmp_path: Path, canary: Path) -> None:
    payload = Call(G("os", "system"), f"touch {canary}")
    locals_ = (
        (payload, _meta([0, 0], [3, 3], 0)),
        (_tensor("0", (2, 3)), _meta([3, 0], [2, 3], 1)),
    )
    with pytest.raises(FormatError, match="nothing was executed"):
        fastckpt.convert(_pair(tmp_path, GOOD, locals_=locals_), tmp_path / "out")


def test_stub_where_a_shard_tensor_should_be(tmp_path: Path) -> None:
    stub = Call(G("somewhere.harmless", "Thing"), 1)
    locals_ = ((stub, _meta([0, 0], [3, 3], 0)), (_tensor("0", (2, 3)), _meta([3, 0], [2, 3], 1)))
    with pytest.raises(FormatError, match="local shard's tensor is"):
        fastckpt.convert(_pair(tmp_path, GOOD, locals_=locals_), tmp_path / "out")


def test_unrecognised_sharded_tensor_variant_refused_with_workaround(tmp_path: Path) -> None:
    """A ShardedTensor class under a module fastckpt does not know (torch 1.10 named it
    ``torch.distributed._sharded_tensor.api``) keeps the refusal naming it and the workaround."""
    d = tmp_path / "ckpt"
    d.mkdir()
    st = G("torch.distributed._sharded_tensor.api", "ShardedTensor")
    value = Call(
        G("torch._tensor", "_rebuild_from_type_v2"),
        G("torch._utils", "_rebuild_wrapper_subclass"),
        st,
        (st, G("torch", "float32"), (5, 3)),
        ([], None, None, None, False),
    )
    _write(
        d / "model_world_size_1_rank_0.pt",
        {"w": value, "b": _tensor("0", (3,))},
        {"0": [1.0, 1.0, 1.0]},
    )
    with pytest.raises(FormatError, match="is a ShardedTensor") as err:
        fastckpt.convert(d, tmp_path / "out")
    assert "device_mesh" in str(err.value)
