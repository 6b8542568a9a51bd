"""Ray at the edge: start or join a cluster, and fan a pure function out over shards.

The math modules (attacks, attributions, visualisation, FID) know nothing about Ray; this module runs
them as Ray tasks. Large shared objects (a model, a background set) go into the object store once;
results come back in shard order (`fan_out`) or as they finish (`fan_out_iter`, for results merged on
the fly); a task whose worker dies is retried alone; a bounded window of tasks is in flight; a
progress bar counts images, also those a task reports before it ends (`report_progress`). Each task
asks for `num_gpus` (fractions allowed) and `num_cpus` and runs on its own device (`task_device`: the
GPU Ray gave it, else the CPU); the driver never touches CUDA. A task that Ray gave a GPU on a node where
torch sees no CUDA device fails, in one line that names the node (a ClusterError): it would otherwise
hold the GPU at CPU speed. Tests that simulate GPU nodes on a CPU machine (`ray start --num-gpus 1`) say
so with ROBINT_SIMULATED_GPUS=1 in the driver's environment: such tasks then run on the CPU. A real run
never sets it.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from .cluster import cluster_nodes
from .errors import ClusterError, InputError, check
from .ray_address import mark_joined, running_cluster

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


# Set to 1 (in the driver's environment) only by tests whose GPU nodes are simulated on CPUs.
SIMULATED_GPUS = "ROBINT_SIMULATED_GPUS"


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
            log.info("joining the Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=True)
            mark_joined()
            return
    # A single local node: every Ray socket on 127.0.0.1 (robint_ray/__init__.py sets Ray's switch for
    # that before ray is first imported).
    # The dashboard (on 127.0.0.1 only) serves Ray's state API, which Ray Train's placement-group
    # cleaner needs to release the resources of a stopped run.
    # address="local": a new instance, even where `ray start` left a stale cluster address in /tmp/ray.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        configure_logging=True,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )


_NODES_USED: set[str] = set()
_DEVICES_USED: set[str] = set()


def nodes_used() -> list[str]:
    """The Ray node ids on which fan_out tasks of this process have run (for reports)."""
    return sorted(_NODES_USED)


def devices_used() -> list[str]:
    """The torch devices ("cpu", "cuda") fan_out tasks of this process have run on (for reports)."""
    return sorted(_DEVICES_USED)


# --- resources per task ----------------------------------------------------------------------------

# The resources a fan_out task asks for where its caller names none: set for a block by
# `task_resources` (the study sets them per stage, so that stages whose math modules know nothing of
# GPUs still run their tasks on them).
_DEFAULTS = {"num_cpus": 1.0, "num_gpus": 0.0}


@contextmanager
def task_resources(*, gpus_per_task: float | None = None, cpus_per_task: float | None = None) -> Iterator[None]:
    """Within the block, fan_out tasks whose caller gives no num_gpus / num_cpus ask for these."""
    saved = dict(_DEFAULTS)
    if gpus_per_task is not None:
        check(gpus_per_task >= 0, f"gpus_per_task must be >= 0, got {gpus_per_task}")
        _DEFAULTS["num_gpus"] = float(gpus_per_task)
    if cpus_per_task is not None:
        check(cpus_per_task > 0, f"cpus_per_task must be > 0, got {cpus_per_task}")
        _DEFAULTS["num_cpus"] = float(cpus_per_task)
    try:
        yield
    finally:
        _DEFAULTS.update(saved)


def cluster_has_gpus(*, unknown: bool = False) -> bool:
    """Whether the running (or joined) Ray cluster has GPUs: an alive node with GPUs in Ray's resource
    table, or a node type with GPUs that its autoscaler may still start (`cluster.cluster_nodes`);
    with unknown=True also where a node type's resources are not stated (the local provider's). The
    driver's own CUDA is never asked: it may sit on a CPU-only head."""
    init_ray()
    nodes = cluster_nodes()
    return any(node.gpus > 0 for node in nodes) or (unknown and any(not node.known for node in nodes))


def default_gpus_per_task(gpus_per_task: float | None) -> float:
    """gpus_per_task as given, or where None: 1 on a cluster with GPUs, else 0."""
    if gpus_per_task is not None:
        check(gpus_per_task >= 0, f"gpus_per_task must be >= 0, got {gpus_per_task}")
        return float(gpus_per_task)
    return 1.0 if cluster_has_gpus() else 0.0


# --- inside a task -----------------------------------------------------------------------------------

_TASK: dict[str, Any] = {"device": None, "progress": None, "index": None}


def task_device(default: str | torch.device = "cpu") -> torch.device:
    """The device of the running fan_out task: cuda where Ray gave it a GPU, else cpu (a GPU torch
    cannot see fails the task, see the module docstring). Outside a task: `default`."""
    import torch

    device = _TASK["device"]
    return torch.device(default) if device is None else device


def simulated_gpus() -> bool:
    """Whether the driver's environment says that the cluster's GPUs are simulated (tests only)."""
    return os.environ.get(SIMULATED_GPUS) == "1"


def _device_of_this_task(simulated: bool) -> torch.device:
    """cuda where Ray gave this task a GPU, cpu where it gave none. A GPU torch cannot see is a
    ClusterError naming the node, unless the driver said the GPUs are simulated."""
    import ray
    import torch

    gpus = ray.get_gpu_ids()
    if not gpus:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if simulated:
            return torch.device("cpu")
        node = ray.get_runtime_context().get_node_id()
        raise ClusterError(
            f"node {ray.util.get_node_ip_address()} (id {node[:8]}): Ray gave a task GPU {gpus[0]}, but torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device there: no NVIDIA driver, or one "
            f"too old for CUDA {torch.version.cuda} (robint doctor checks every node)"
        )
    return torch.device("cuda")  # Ray set CUDA_VISIBLE_DEVICES to the task's GPU: it is cuda:0 here


def report_progress(count: int) -> None:
    """Inside a fan_out task: `count` more images (or units) done, shown by the driver's progress bar
    before the task ends. Outside a task: nothing."""
    actor = _TASK["progress"]
    if actor is not None and count:
        try:
            actor.add.remote(_TASK["index"], int(count))
        except Exception:  # noqa: BLE001 (progress is best effort: a lost counter must not fail the task)
            _TASK["progress"] = None


class _ProgressCounter:
    """A Ray actor (no CPU) the tasks of one fan_out report their done units to."""

    def __init__(self):
        self.done: dict[int, int] = {}

    def add(self, index: int, count: int) -> None:
        self.done[index] = self.done.get(index, 0) + count

    def take(self) -> dict[int, int]:
        """Units reported per task since the last call."""
        out, self.done = self.done, {}
        return out


def _progress_counter():
    """A _ProgressCounter actor on the driver's own node (no CPU: it fits a head with none for tasks),
    so that losing a worker node loses tasks, which are retried, and never the progress bar."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0)(_ProgressCounter).options(scheduling_strategy=here).remote()


def _taken(counter) -> dict[int, int] | None:
    """The units the tasks reported since the last call, or None where the counter is lost (progress
    inside tasks is best effort: a fan-out never fails for it)."""
    import ray

    try:
        return ray.get(counter.take.remote(), timeout=30)
    except (ray.exceptions.RayError, TimeoutError) as err:
        log.warning("progress counter lost (%s): the bar moves per finished task from here", type(err).__name__)
        return None


def _move(value: Any, device) -> Any:
    """Modules and tensors (also inside tuples, lists, dicts) on `device`; other values as they are."""
    import torch

    if isinstance(value, (torch.nn.Module, torch.Tensor)):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


# The shared values of the current fan_out call, deserialised once per worker process (ObjectRef hex ->
# value). A worker runs many shards of one call; unpickling a 100 MB model for each of them would cost
# more than a small shard's work. Entries of earlier calls are dropped when a new call's first task
# arrives, so a worker holds one call's values at most. Tasks must not change them (the model is moved
# to the task's device once, here).
_SHARED: dict[str, Any] = {}


def _shared_values(refs: Sequence[Any], device) -> list[Any]:
    import ray
    import torch

    keys = [ref.hex() for ref in refs]
    missing = [(key, ref) for key, ref in zip(keys, refs) if key not in _SHARED]
    if missing:
        for stale in set(_SHARED) - set(keys):
            del _SHARED[stale]
        for (key, _), value in zip(missing, ray.get([ref for _, ref in missing])):
            _SHARED[key] = value.to(device) if isinstance(value, torch.nn.Module) else value
    return [_SHARED[key] for key in keys]


def _run_shard(
    fn: Callable,
    shard: Any,
    index: int,
    threads: int,
    names: tuple[str, ...],
    refs: list,
    progress: Any,
    simulated: bool,
) -> tuple[Any, str, str]:
    import ray
    import torch

    from .allocator import tune_allocator

    torch.set_num_threads(threads)  # one task = its CPUs' worth of threads, no oversubscription
    tune_allocator()
    device = _device_of_this_task(simulated)
    _TASK.update(device=device, progress=progress, index=index)
    try:
        result = fn(_move(shard, device), **dict(zip(names, _shared_values(refs, device))))
    finally:
        _TASK.update(device=None, progress=None, index=None)
    return _move(result, "cpu"), ray.get_runtime_context().get_node_id(), str(device)


def default_window() -> int:
    """Tasks in flight at once by default: twice what the cluster's CPUs could run (so a finished
    task's successor is already queued), at least 2."""
    import ray

    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


def fan_out_iter(
    fn: Callable[..., Any],
    shards: Sequence[Any],
    *,
    shared: dict[str, Any] | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    max_retries: int = 3,
    sizes: Sequence[int] | None = None,
    desc: str = "",
    unit: str = "img",
    progress: bool = True,
    max_in_flight: int | None = None,
) -> Iterator[tuple[int, Any]]:
    """(i, fn(shards[i], **shared)) for every shard, each call a Ray task, yielded as tasks finish
    (not in shard order). The driver holds only the results it has not yet yielded.

    shared: keyword arguments common to every call (a model, say); each is put into the object store
    once; a torch module among them is moved to the task's device (`task_device()`: cuda where Ray gave
    the task a GPU, else cpu), as are the tensors of the shard; result tensors come
    back on the CPU. num_cpus / num_gpus: resources per task (fractions allowed; torch in the task uses
    int(num_cpus) threads); None: those of the enclosing `task_resources` block, else 1 CPU, no GPU.
    max_retries: how often a task lost with its worker (process killed, node gone) is run again, alone;
    an exception raised by fn itself is not retried and propagates. sizes: what each shard counts for in
    the progress bar (images); by default 1 per shard; tasks may report progress before they end
    (`report_progress`). max_in_flight: at most this many tasks submitted at once (default
    `default_window()`); the driver waits on that window only, so its work per result does not grow
    with the number of shards.
    """
    import ray

    init_ray()
    num_cpus, num_gpus = _resources_per_task(num_cpus, num_gpus)
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    window = default_window() if max_in_flight is None else max_in_flight
    names = tuple((shared or {}).keys())
    # Passed inside a list, the refs reach the task unresolved: _shared_values fetches each once per worker.
    refs = [ray.put(value) for value in (shared or {}).values()]
    remote = _remote_shard(fn, num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries)
    threads = max(1, int(num_cpus))
    simulated = simulated_gpus()
    bar = _Progress(list(sizes) if sizes is not None else [1] * len(shards), desc=desc, unit=unit, shown=progress)
    pending: dict[Any, int] = {}  # in flight: ref -> shard index; never more than `window`
    devices: dict[str, int] = {}
    nodes: set[str] = set()
    next_shard = 0
    try:
        while next_shard < len(shards) or pending:
            while next_shard < len(shards) and len(pending) < window:
                call = remote.remote(fn, shards[next_shard], next_shard, threads, names, refs, bar.counter, simulated)
                pending[call] = next_shard
                bar.started(next_shard)
                next_shard += 1
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0 if bar.counter is not None else None)
            bar.poll()
            for ref in done:
                i = pending.pop(ref)
                result, node, device = _result(ref, pending)
                del ref
                nodes.add(node)
                devices[device] = devices.get(device, 0) + 1
                bar.finished(i)
                yield i, result
                del result
    finally:
        bar.close()
        _NODES_USED.update(nodes)
        _DEVICES_USED.update(devices)
        _log_placement(desc or fn.__name__, nodes, devices, num_cpus=num_cpus, num_gpus=num_gpus)


def _result(ref, pending: dict) -> tuple[Any, str, str]:
    """ray.get(ref); a ClusterError or InputError the task raised comes back as itself (one line, not
    Ray's traceback), and the other tasks in flight are cancelled."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if not isinstance(err.cause, (ClusterError, InputError)):
            raise
        for other in pending:
            ray.cancel(other)
        raise err.cause from None


def _resources_per_task(num_cpus: float | None, num_gpus: float | None) -> tuple[float, float]:
    """(CPUs, GPUs) per task: those given, else the enclosing task_resources block's. Asking for GPUs
    on a cluster with none is an InputError (Ray would wait for a GPU forever)."""
    num_cpus = _DEFAULTS["num_cpus"] if num_cpus is None else num_cpus
    num_gpus = _DEFAULTS["num_gpus"] if num_gpus is None else num_gpus
    if num_gpus > 0 and not cluster_has_gpus(unknown=True):
        raise InputError(
            f"each task asks for {num_gpus:g} GPU, but the Ray cluster has no GPU and no node type "
            "with one: use --gpus-per-task 0 (or --device cpu)"
        )
    return num_cpus, num_gpus


def _remote_shard(fn: Callable[..., Any], *, num_cpus: float, num_gpus: float, max_retries: int):
    """_run_shard as a Ray task with these resources. SPREAD: shards go to every node of a cluster, not
    first to fill the driver's node. The task's name is fn's, so that Ray's dashboard and state API tell
    the stages apart. A task lost with its worker is retried; an exception fn raises is not."""
    import ray

    return ray.remote(_run_shard).options(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_retries=max_retries,
        retry_exceptions=False,
        scheduling_strategy="SPREAD",
        name=getattr(fn, "__name__", "fan_out"),
    )


class _Progress:
    """The driver's progress bar of one fan-out: `sizes[i]` units for shard i, moved while tasks run by
    what they report (through a _ProgressCounter actor, `counter`, None when not shown or lost) and,
    for the rest, when each task ends."""

    def __init__(self, sizes: list[int], *, desc: str, unit: str, shown: bool):
        from tqdm import tqdm

        self.sizes = sizes
        self.counter = _progress_counter() if shown and sizes else None
        self.bar = tqdm(total=sum(sizes), desc=desc, unit=unit, disable=not shown)
        self.reported: dict[int, int] = {}  # units the running tasks reported so far

    def started(self, i: int) -> None:
        self.reported[i] = 0

    def poll(self) -> None:
        """Move the bar by what the running tasks reported since the last call."""
        if self.counter is None:
            return
        taken = _taken(self.counter)
        if taken is None:
            self.counter = None
            return
        for i, count in taken.items():
            if i in self.reported:  # not finished yet (a late report of a finished task is dropped)
                step = min(count, self.sizes[i] - self.reported[i])
                self.reported[i] += step
                self.bar.update(step)

    def finished(self, i: int) -> None:
        self.bar.update(self.sizes[i] - self.reported.pop(i, 0))

    def close(self) -> None:
        import ray

        self.bar.close()
        if self.counter is not None:
            ray.kill(self.counter)


def _log_placement(what: str, nodes: set[str], devices: dict[str, int], *, num_cpus: float, num_gpus: float) -> None:
    """One log line: how many tasks ran on which nodes and devices, with their resources."""
    if nodes:
        log.info(
            "%s: %d task(s) on %d node(s) %s, devices %s, %s CPU and %s GPU per task",
            what,
            sum(devices.values()),
            len(nodes),
            ", ".join(n[:8] for n in sorted(nodes)),
            ", ".join(f"{d} x{k}" for d, k in sorted(devices.items())),
            num_cpus,
            num_gpus,
        )


def fan_out(fn: Callable[..., Any], shards: Sequence[Any], **options: Any) -> list[Any]:
    """[fn(shard, **shared) for shard in shards], each call a Ray task (see `fan_out_iter` for the
    options), results in shard order."""
    results: list[Any] = [None] * len(shards)
    for i, result in fan_out_iter(fn, shards, **options):
        results[i] = result
    return results
