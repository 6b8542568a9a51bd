"""Ray at the edge: start or join a cluster, and fan a pure function out over shards.

The math modules (attacks, attributions, visualisation, FID) know nothing about Ray; this module runs
them as Ray tasks. Large shared objects (a model, a background set) go into the object store once;
results come back in shard order; a task whose worker dies is retried; a progress bar counts images.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)


_JOINED = False  # set by init_ray when it joined a running cluster


def recorded_cluster() -> str | None:
    """The address ("ip:port") that `ray start` on this machine recorded for its cluster, in Ray's
    default temp folder ($RAY_TMPDIR, else $TMPDIR, else /tmp, then ray/ray_current_cluster; `ray stop`
    removes it), or None. The file is Ray's documented way of finding "the cluster on this machine"
    (ray.init's address="auto"); read here directly, since the helper that reads it is private."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        text = open(os.path.join(base, "ray", "ray_current_cluster")).read().strip()
    except OSError:
        return None
    return text or None


def _answers(address: str, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections at "host:port" (a live GCS, not a stale file)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def running_cluster() -> str | None:
    """The cluster this process joins: $RAY_ADDRESS (as set by `ray job submit`), else the cluster
    that `ray start` recorded on this machine if its GCS answers; None where there is none."""
    address = os.environ.get("RAY_ADDRESS")
    if address:
        return address
    recorded = recorded_cluster()
    return recorded if recorded and _answers(recorded) else None


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join a running cluster, or start a private local one. Idempotent.

    address: a cluster address to join; None: the running cluster (`running_cluster()`: $RAY_ADDRESS,
    else the one `ray start` started on this machine); "local", or None with no cluster running: a new
    local Ray instance sized by num_cpus / num_gpus (default: the machine), whose sockets, dashboard
    included, bind to 127.0.0.1 only. num_cpus / num_gpus are ignored when joining (the cluster's
    nodes decide)."""
    import ray

    if ray.is_initialized():
        return
    if address != "local":
        address = address or running_cluster()
        if address:
            global _JOINED
            log.info("joining the Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=True)
            _JOINED = True
            return
    # A single local node: every Ray socket on 127.0.0.1 (robint_ray/__init__.py sets Ray's switch for
    # that before ray is first imported).
    # The dashboard (on 127.0.0.1 only) serves Ray's state API, which Ray Train's placement-group
    # cleaner needs to release the resources of a stopped run.
    # address="local": a new instance, even where `ray start` left a stale cluster address in /tmp/ray.
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True,
             dashboard_host="127.0.0.1",
             configure_logging=True, logging_level=logging.WARNING, log_to_driver=True)


def joined_cluster() -> bool:
    """Whether this process joined a running cluster (where an autoscaler may add what is short),
    rather than starting its private instance."""
    return _JOINED


_NODES_USED: set[str] = set()


def nodes_used() -> list[str]:
    """The Ray node ids on which fan_out tasks of this process have run (for reports)."""
    return sorted(_NODES_USED)


# The shared values of the current fan_out call, deserialised once per worker process (ObjectRef hex ->
# value). A worker runs many shards of one call; unpickling a 100 MB model for each of them would cost
# more than a small shard's work. Entries of earlier calls are dropped when a new call's first task
# arrives, so a worker holds one call's values at most. Tasks must not change them (a model's .to(device)
# is fine: every task of the call does the same).
_SHARED: dict[str, Any] = {}


def _shared_values(refs: Sequence[Any]) -> list[Any]:
    import ray

    keys = [ref.hex() for ref in refs]
    missing = [(key, ref) for key, ref in zip(keys, refs) if key not in _SHARED]
    if missing:
        for stale in set(_SHARED) - set(keys):
            del _SHARED[stale]
        for (key, _), value in zip(missing, ray.get([ref for _, ref in missing])):
            _SHARED[key] = value
    return [_SHARED[key] for key in keys]


def _run_shard(fn: Callable, shard: Any, threads: int, names: tuple[str, ...], refs: list) -> tuple[Any, str]:
    import ray
    import torch

    from .allocator import tune_allocator

    torch.set_num_threads(threads)  # one task = its CPUs' worth of threads, no oversubscription
    tune_allocator()
    return fn(shard, **dict(zip(names, _shared_values(refs)))), ray.get_runtime_context().get_node_id()


def fan_out(fn: Callable[..., Any], shards: Sequence[Any], *, shared: dict[str, Any] | None = None,
            num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 3, sizes: Sequence[int] | None = None,
            desc: str = "", unit: str = "img", progress: bool = True,
            max_in_flight: int | None = None) -> list[Any]:
    """[fn(shard, **shared) for shard in shards], each call a Ray task, results in shard order.

    shared: keyword arguments common to every call (a model, say); each is put into the object store
    once. num_cpus / num_gpus: resources per task (torch in the task uses int(num_cpus) threads).
    max_retries: how often a task lost with its worker (process killed, node gone) is run again; an
    exception raised by fn itself is not retried and propagates. sizes: what each shard counts for in
    the progress bar (images); by default 1 per shard. max_in_flight: at most this many tasks
    submitted at once (a fixed number of workers on a larger cluster); by default all at once.
    """
    import ray
    from tqdm import tqdm

    init_ray()
    names = tuple((shared or {}).keys())
    # Passed inside a list, the refs reach the task unresolved: _shared_values fetches each once per worker.
    refs = [ray.put(value) for value in (shared or {}).values()]
    # SPREAD: shards go to every node of a cluster, not first to fill the driver's node.
    remote = ray.remote(_run_shard).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
                                            retry_exceptions=False, scheduling_strategy="SPREAD")
    threads = max(1, int(num_cpus))
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    limit = len(shards) if max_in_flight is None else max_in_flight
    pending: dict[Any, int] = {}
    next_shard = 0

    def submit_until_full(waiting: list) -> None:
        nonlocal next_shard
        while next_shard < len(shards) and len(waiting) < limit:
            ref = remote.remote(fn, shards[next_shard], threads, names, refs)
            pending[ref] = next_shard
            waiting.append(ref)
            next_shard += 1

    sizes = list(sizes) if sizes is not None else [1] * len(shards)
    results: list[Any] = [None] * len(shards)
    bar = tqdm(total=sum(sizes), desc=desc, unit=unit, disable=not progress)
    try:
        waiting: list = []
        submit_until_full(waiting)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                results[i], node = ray.get(ref)
                _NODES_USED.add(node)
                bar.update(sizes[i])
            submit_until_full(waiting)
    finally:
        bar.close()
    return results


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] covering range(n) in consecutive pieces of at most shard_size."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]
