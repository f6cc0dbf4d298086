"""Convert on a Ray cluster: the driver plans, Ray tasks on the worker nodes write whole shards.

:func:`fastckpt.convert` with ``ray_address`` (``fastckpt convert --ray ADDRESS``) plans from
metadata exactly as a local conversion does, then hands the one call that moves tensor bytes,
``_core.write_shards``, to :func:`ray_writer`: one Ray task per output shard, each running the
Rust engine on whichever node Ray places it, into the temporary sibling of the destination on the
shared filesystem. The driver then writes the index and side files and moves the folder into place,
as locally, so the output appears complete or not at all.

Before any write, :func:`ray_writer` runs a probe on every alive node that has CPUs (the nodes
shard tasks can run on): each must see every source file with the driver's size, see a writable
destination parent, and run the driver's fastckpt version. A node that does not is named.

Ray is an optional dependency (``pip install 'fastckpt[ray]'``) and is imported only here, and
this module only when a Ray address is given.

Example:
    fastckpt convert /shared/run/step_900/policy/weights /shared/hf-step900 --ray auto
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastckpt import _core
from fastckpt._core import FastckptError

Shard = tuple[str, Sequence[tuple[_core.Source, str]]]
Writer = Callable[..., int]

MAX_RETRIES = 3  # Ray re-runs a shard task this many times (node loss, worker crash, I/O error)
TASK_THREADS = 4  # copy threads per shard task when num_threads is not given
PROBE_TIMEOUT_S = 300.0
POLL_S = 0.1


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise FastckptError(
            "converting on a Ray cluster needs Ray: pip install 'fastckpt[ray]'"
        ) from None
    return ray


def connect(address: str) -> Any:
    """Connect to the Ray cluster at ``address`` (``"auto"``: ``RAY_ADDRESS`` or the running one).

    A driver that is already connected keeps its connection (``address`` is then not used). The
    connection stays open for later conversions, as after ``ray.init``; ``ray.shutdown()`` ends it.
    """
    ray = _import_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise FastckptError(
                f"cannot connect to the Ray cluster at {address!r}: {_first_line(exc)}"
            ) from None
    return ray


# ---------------------------------------------------------------- code that runs on the nodes


def _here() -> str:
    """This node, as errors name it: ``IP (node id prefix)``."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    ip = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    return f"{ip} (node {node_id[:12]})"


def _probe(files: Sequence[tuple[str, int]], parent: str) -> tuple[str, str, list[str]]:
    """On one node: ``(node, fastckpt version, problems)``."""
    problems = []
    for path, size in files:
        try:
            got = os.stat(path).st_size
        except OSError as exc:
            problems.append(f"cannot see {path} ({exc.strerror or exc})")
            continue
        if got != size:
            problems.append(f"sees {path} with {got} bytes, the driver {size}")
    if not os.path.isdir(parent):
        problems.append(f"cannot see the destination's folder {parent}")
    elif not os.access(parent, os.W_OK | os.X_OK):
        problems.append(f"cannot write into the destination's folder {parent}")
    return _here(), _core.__version__, problems


def _write_shard(directory: str, shard: Shard, num_threads: int, fsync: bool) -> tuple[int, str]:
    """On one node: write one whole shard; ``(tensor bytes written, node)``."""
    node = _here()
    try:
        n = _core.write_shards(directory, [shard], num_threads=num_threads, fsync=fsync)
    except Exception as exc:
        raise FastckptError(f"shard {shard[0]} failed on {node}: {exc}") from None
    return n, node


# ---------------------------------------------------------------- driver


def _worker_nodes(ray: Any) -> list[dict[str, Any]]:
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if not nodes:
        raise FastckptError("the Ray cluster has no alive node with CPUs to write shards on")
    return nodes


def check_nodes(ray: Any, files: Sequence[str | os.PathLike[str]], parent: Path) -> int:
    """Refuse, naming the node, unless every node with CPUs sees the sources and ``parent`` and runs
    this fastckpt version. Returns the number of nodes checked."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    seen: dict[str, int] = {}
    for f in files:
        with contextlib.suppress(OSError):  # e.g. LoRA spill files, written later under tmp
            seen.setdefault(os.fspath(f), os.stat(f).st_size)
    probe = ray.remote(_probe)
    refs = [
        probe.options(
            num_cpus=0,
            max_retries=0,
            name="fastckpt-probe",
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
        ).remote(sorted(seen.items()), str(parent))
        for node in _worker_nodes(ray)
    ]
    try:
        results = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise FastckptError(
            f"the Ray nodes did not answer the file check within {PROBE_TIMEOUT_S:.0f} s"
        ) from None
    except ray.exceptions.RayError as exc:
        raise FastckptError(f"the file check failed on a Ray node: {_first_line(exc)}") from None
    errors = []
    for node, version, problems in results:
        if version != _core.__version__:
            problems = [
                f"runs fastckpt {version}, the driver {_core.__version__} (install the same "
                "version on every node)",
                *problems,
            ]
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            errors.append(f"node {node} " + "; ".join(problems[:3]) + more)
    if errors:
        raise FastckptError(
            "not every Ray node can take part (every node with CPUs needs the sources and the "
            "destination on a shared filesystem): " + "; ".join(errors)
        )
    return len(results)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _shard_bytes(shard: Shard) -> int:
    return sum(math.prod(src[2]) * _core.dtype_size(out) for src, out in shard[1])


def _task_node(ray: Any, task_name: str) -> str | None:
    """Where a failed task last ran, from the state API (``ray[default]``); ``None`` if unknown."""
    try:
        from ray.util.state import list_tasks

        tasks = list_tasks(
            filters=[("name", "=", task_name)], detail=True, raise_on_missing_output=False
        )
    except Exception:
        return None
    runs = sorted(tasks, key=lambda t: t.attempt_number)
    return runs[-1].node_id if runs and runs[-1].node_id else None


def _failure(ray: Any, name: str, task_name: str, exc: BaseException) -> FastckptError:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, FastckptError):  # raised by _write_shard: names the shard and node
        return FastckptError(f"{cause} (after {MAX_RETRIES} retries)")
    node = _task_node(ray, task_name)
    where = f" on node {node[:12]}" if node else ""
    return FastckptError(
        f"shard {name} failed{where} after {MAX_RETRIES} retries: {_first_line(exc)}"
    )


def ray_writer(address: str, *, sources: Sequence[str | os.PathLike[str]], parent: Path) -> Writer:
    """Check the cluster, then return a drop-in replacement for ``_core.write_shards``.

    Connects first (see :func:`connect`). The returned function runs one Ray task per shard,
    spread over the nodes: ``num_cpus=1`` each, so a node writes at most as many shards at once as
    it has CPUs, each with ``num_threads`` copy threads (default 4). A task is retried up to
    ``MAX_RETRIES`` times. Progress is reported per finished shard. On a failure or an interrupt
    the other tasks are cancelled.
    """
    ray = connect(address)
    check_nodes(ray, sources, parent)
    task = ray.remote(_write_shard)

    def write(
        directory: str,
        shards: Sequence[Shard],
        *,
        num_threads: int | None = None,
        fsync: bool = True,
        progress: Callable[[int, int], object] | None = None,
    ) -> int:
        sizes = {s[0]: _shard_bytes(s) for s in shards}
        total, done, written = sum(sizes.values()), 0, 0
        pending: dict[Any, tuple[str, str]] = {}
        for shard in shards:
            task_name = f"fastckpt-write:{Path(directory).name}/{shard[0]}"
            ref = task.options(
                num_cpus=1,
                max_retries=MAX_RETRIES,
                retry_exceptions=True,
                name=task_name,
                scheduling_strategy="SPREAD",  # each node's share of the filesystem bandwidth
            ).remote(directory, shard, num_threads or TASK_THREADS, fsync)
            pending[ref] = (shard[0], task_name)
        try:
            if progress is not None:
                progress(0, total)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
                for ref in ready:
                    name, task_name = pending.pop(ref)
                    try:
                        n, _node = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        raise _failure(ray, name, task_name, exc) from None
                    written += n
                    done += sizes[name]
                if progress is not None:
                    progress(done, total)
        finally:
            if pending:  # a failure, a progress callback that raised, or Ctrl-C
                refs = list(pending)
                for ref in refs:
                    with contextlib.suppress(Exception):
                        ray.cancel(ref, force=True)
                with contextlib.suppress(Exception):  # let them stop before tmp is removed
                    ray.wait(refs, num_returns=len(refs), timeout=30)
        return written

    return write
