"""Stub of the Rust extension ``fastckpt._core`` (checked by ``mypy.stubtest``).

The Rust core knows byte ranges, dtypes, shapes and safetensors; it never parses pickle.
Every function releases the GIL while it works.

Shared argument shapes (plain tuples, so that the Python side can build them as NamedTuples):

``Chunk`` = ``(path, data_offset, data_len, storage_offset, strides, offsets, sizes)``
    One stored box of a tensor. ``path`` is the source file; ``data_offset``/``data_len`` is the
    byte range of the storage inside that file (e.g. the ``data/0`` entry of a DCP item);
    ``storage_offset`` and ``strides`` are in elements, as torch records them; ``offsets`` and
    ``sizes`` place the box in the global tensor (same length as the global shape).

``Source`` = ``(name, dtype, shape, chunks)``
    One global tensor: ``dtype`` is a safetensors dtype name (``"BF16"``, ``"F32"``, ...),
    ``shape`` the global shape, ``chunks`` a list of ``Chunk``. The chunks must tile the tensor
    exactly (checked: element counts and bounds).
"""

from collections.abc import Callable, Sequence

__version__: str

Chunk = tuple[str, int, int, int, Sequence[int], Sequence[int], Sequence[int]]
Source = tuple[str, str, Sequence[int], Sequence[Chunk]]

class FastckptError(Exception):
    """Base class of every error fastckpt raises on purpose."""

class FormatError(FastckptError):
    """A source file is not what its format says (corrupt, truncated, unsupported variant)."""

class MappingError(FastckptError):
    """A tensor name cannot be mapped, or a requested tensor does not exist."""

class ShapeError(FastckptError):
    """Shapes, chunk coverage or byte sizes disagree."""

def scan_pickle(data: bytes, max_depth: int) -> None:
    """Refuse (``FormatError``, naming the byte) a pickle whose loading could exhaust memory or
    the C stack: argument lengths past the data, memo indices beyond it, nesting deeper than
    ``max_depth``, ``BUILD`` onto a global, out-of-band buffers, extension codes."""

def dtype_size(dtype: str) -> int:
    """Item size in bytes of a safetensors dtype name; ``FormatError`` if unknown."""

def first_gap(
    shape: Sequence[int], boxes: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> tuple[list[int], list[int]] | None:
    """The first region of ``shape`` that no ``(offsets, sizes)`` box covers (the boxes must not
    overlap), as ``(offsets, sizes)``; None when they tile it, or the tiling is too fine to say."""

def plan_shards(sizes: Sequence[int], max_shard_size: int) -> list[list[int]]:
    """Split tensors (byte sizes, in key order) into shards, as huggingface_hub does.

    Greedy in the given order; a tensor larger than ``max_shard_size`` gets its own shard, placed
    before the shard being filled; a shard may reach exactly the limit. Returns, per shard, the
    indices of its tensors in input order. Zero tensors give zero shards.
    """

def write_shards(
    directory: str,
    shards: Sequence[tuple[str, Sequence[tuple[Source, str]]]],
    *,
    num_threads: int | None = None,
    fsync: bool = True,
    progress: Callable[[int, int], object] | None = None,
) -> int:
    """Write safetensors files into an existing ``directory``.

    ``shards`` is a list of ``(file_name, [(source, out_dtype), ...])``. Within a file the tensors
    are ordered by dtype rank descending, then name (byte order), with ``__metadata__`` =
    ``{"format":"pt"}`` and the header space-padded to a multiple of 8, so every file is
    byte-identical to ``safetensors.torch.save_file``. When ``out_dtype`` differs from the
    source dtype the values are cast (round to nearest even; only between F64/F32/F16/BF16).

    Contiguous ranges are spliced from the sources through a pipe (``FASTCKPT_COPY`` =
    ``copy_file_range`` or ``pwrite`` forces a fallback path); other data is gathered from the
    memory-mapped sources in bounded buffers. Work runs on ``num_threads``
    threads (default ``FASTCKPT_NUM_THREADS`` or the CPU count). With ``fsync`` every file is
    flushed with early writeback and fsynced. ``progress(done_bytes, total_bytes)`` is called
    from the calling thread about every 100 ms and at the end; an exception it raises, or
    Ctrl-C, cancels the write. Returns the number of tensor bytes written.
    """

def gather(source: Source, out_dtype: str, out: object) -> None:
    """Copy one whole tensor, in C order, cast to ``out_dtype``, into the writable buffer ``out``.

    ``out`` must be a writable C-contiguous buffer of exactly ``numel * dtype_size(out_dtype)``
    bytes (e.g. ``numpy.empty(n, numpy.uint8)``).
    """

def digest(source: Source) -> bytes:
    """16-byte XXH3-128 digest of the tensor's bytes in C order (its own dtype), streamed."""
