"""Ray at the edge: start or join a cluster, and fan a pure function out over shards.

The math modules (attacks, attributions, visualisation, FID) know nothing about Ray. `fan_out` (in
shard order) and `fan_out_iter` (as shards finish, for results merged on the fly) run fn(shard,
**shared) over shards, in this process or as Ray tasks: `Tasks` says which, and what each task asks
for; it is the one place where that is decided. On Ray, large shared objects (a model, a background
set) go into the object store once; a task whose worker dies is retried alone; a bounded window of
tasks is in flight; each task asks for the CPUs and GPUs (fractions allowed) its caller gave and runs
on its own device (the GPU Ray gave it, else the CPU); the driver never touches CUDA. Either way a
progress bar counts images, also those a shard reports before it ends (`report_progress`). A task that
Ray gave a GPU on a node where torch sees no CUDA device fails, in one line that names the node (a
ClusterError): it would otherwise hold the GPU at CPU speed. Tests that simulate GPU nodes on a CPU
machine (`ray start --num-gpus 1`) say so with ROBINT_SIMULATED_GPUS=1 in the driver's environment:
such tasks then run on the CPU. A real run never sets it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields, is_dataclass, replace
from functools import partial
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


# --- where a fan-out runs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Tasks:
    """Where `fan_out` runs its shards, and what each Ray task asks for.

    workers = 0: in this process, one shard after another, each on the values as given (fn runs on the
    device of the model it is handed). workers >= 1: as Ray tasks, at most `workers` in flight, each
    asking Ray for `cpus` CPUs (torch in the task uses int(cpus) threads) and `gpus` GPUs (fractions
    allowed: 0.25 lets four tasks share one), and running on its own device (the GPU Ray gave it, else
    the CPU). The caller states the resources (a command from its --cpus-per-task / --gpus-per-task, the
    study from its settings per stage): Ray tasks without them are an error, never a silent default."""

    workers: int = 0
    cpus: float | None = None
    gpus: float | None = None

    def __post_init__(self):
        check(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        if self.workers:
            check(
                self.cpus is not None and self.gpus is not None,
                f"{self.workers} Ray task(s) at a time need their resources: give cpus and gpus per task",
            )
            check(self.cpus > 0, f"cpus per task must be > 0, got {self.cpus}")
            check(self.gpus >= 0, f"gpus per task must be >= 0, got {self.gpus}")

    @property
    def on_ray(self) -> bool:
        return self.workers >= 1


IN_PROCESS = Tasks()


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

# How report_progress reaches the driver's bar from the shard now running: None outside a fan-out.
_REPORT: dict[str, Callable[[int], None] | None] = {"to": None}


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
    """Inside a fan_out shard (in this process or a Ray task): `count` more images (or units) done,
    shown by the driver's progress bar before the shard ends. Outside a fan-out: nothing."""
    report = _REPORT["to"]
    if report is not None and count:
        report(int(count))


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


def _to_counter(counter, index: int) -> Callable[[int], None]:
    """report_progress inside Ray task `index`: to the driver's counter actor, best effort."""

    def report(count: int) -> None:
        try:
            counter.add.remote(index, count)
        except Exception:  # noqa: BLE001 (progress is best effort: a lost counter must not fail the task)
            _REPORT["to"] = None

    return report


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


def _for_transport(value: Any) -> Any:
    """A shared value as it travels to Ray tasks: a torch module or tensor on a GPU as a CPU copy (the
    caller's stays where it is: `models.on_cpu`), also a module held by a dataclass (generation's
    FIDFeatures); other values as they are."""
    import torch

    from .models import on_cpu

    if isinstance(value, torch.nn.Module):
        return on_cpu(value)
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if is_dataclass(value) and not isinstance(value, type):
        held = {f.name: getattr(value, f.name) for f in fields(value) if f.init}
        moved = {k: on_cpu(v) for k, v in held.items() if isinstance(v, torch.nn.Module)}
        return replace(value, **moved) if moved else value
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
    _REPORT["to"] = None if progress is None else _to_counter(progress, index)
    try:
        result = fn(_move(shard, device), **dict(zip(names, _shared_values(refs, device))))
    finally:
        _REPORT["to"] = None
    return _move(result, "cpu"), ray.get_runtime_context().get_node_id(), str(device)


def default_window() -> int:
    """Twice what the cluster's CPUs could run (so a finished task's successor is already queued), at
    least 2: Ray tasks in flight where a command is given no --workers."""
    import ray

    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


# --- the fan-out -------------------------------------------------------------------------------------


def fan_out_iter(
    fn: Callable[..., Any],
    shards: Sequence[Any],
    *,
    tasks: Tasks,
    shared: dict[str, Any] | None = None,
    sizes: Sequence[int] | None = None,
    desc: str = "",
    unit: str = "img",
    progress: bool = True,
    max_retries: int = 3,
) -> Iterator[tuple[int, Any]]:
    """(i, fn(shards[i], **shared)) for every shard, yielded as each finishes: in shard order in this
    process, in the order the tasks end on Ray. Where it runs is `tasks` (see `Tasks`), and nothing
    else: the caller's function and its numbers are the same either way. The driver holds only the
    results it has not yet yielded.

    shared: keyword arguments common to every call (a model, say). On Ray each is put into the object
    store once (a module on a GPU as a CPU copy) and fetched once per worker; a torch module among
    them is moved to the task's device (cuda where Ray gave the task a GPU, else cpu), as are the
    tensors of the shard; result tensors come back on the CPU. In this process the values are passed
    as they are. sizes: what each shard counts for in the progress bar (images; by default 1 per
    shard); a shard may report progress before it ends (`report_progress`). max_retries (Ray): how
    often a task lost with its worker (process killed, node gone) is run again, alone; an exception
    raised by fn itself is not retried and propagates. The driver waits on the window of tasks in
    flight only, so its work per result does not grow with the number of shards.
    """
    sizes = list(sizes) if sizes is not None else [1] * len(shards)
    make_bar = partial(_Progress, sizes, desc=desc, unit=unit, shown=progress)
    if tasks.on_ray:
        return _on_ray(fn, shards, tasks, shared or {}, make_bar, max_retries=max_retries)
    return _in_process(fn, shards, shared or {}, make_bar)


def fan_out(fn: Callable[..., Any], shards: Sequence[Any], *, tasks: Tasks, **options: Any) -> list[Any]:
    """[fn(shard, **shared) for shard in shards], in this process or as Ray tasks (`tasks`; see
    `fan_out_iter` for the options), results in shard order."""
    results: list[Any] = [None] * len(shards)
    for i, result in fan_out_iter(fn, shards, tasks=tasks, **options):
        results[i] = result
    return results


def _in_process(
    fn: Callable[..., Any], shards: Sequence[Any], shared: dict[str, Any], make_bar: Callable[..., _Progress]
) -> Iterator[tuple[int, Any]]:
    """fan_out_iter's shards one after another in this process; report_progress moves the bar."""
    bar = make_bar(in_tasks=False)
    try:
        for i, shard in enumerate(shards):
            bar.started(i)
            saved, _REPORT["to"] = _REPORT["to"], lambda count, i=i: bar.add(i, count)
            try:
                result = fn(shard, **shared)
            finally:
                _REPORT["to"] = saved
            bar.finished(i)
            yield i, result
            del result
    finally:
        bar.close()


def _on_ray(
    fn: Callable[..., Any],
    shards: Sequence[Any],
    tasks: Tasks,
    shared: dict[str, Any],
    make_bar: Callable[..., _Progress],
    *,
    max_retries: int,
) -> Iterator[tuple[int, Any]]:
    """fan_out_iter's shards as Ray tasks, at most tasks.workers in flight."""
    import ray

    init_ray()
    _check_gpus(tasks)
    names = tuple(shared)
    # Passed inside a list, the refs reach the task unresolved: _shared_values fetches each once per worker.
    refs = [ray.put(_for_transport(value)) for value in shared.values()]
    remote = _remote_shard(fn, tasks, max_retries=max_retries)
    threads = max(1, int(tasks.cpus))
    simulated = simulated_gpus()
    bar = make_bar(in_tasks=True)
    pending: dict[Any, int] = {}  # in flight: ref -> shard index; never more than tasks.workers
    devices: dict[str, int] = {}
    nodes: set[str] = set()
    next_shard = 0
    try:
        while next_shard < len(shards) or pending:
            while next_shard < len(shards) and len(pending) < tasks.workers:
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
        _log_placement(bar.desc or getattr(fn, "__name__", "fan_out"), nodes, devices, tasks)


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


def _check_gpus(tasks: Tasks) -> None:
    """Asking for GPUs on a cluster with none is an InputError (Ray would wait for a GPU forever)."""
    if tasks.gpus > 0 and not cluster_has_gpus(unknown=True):
        raise InputError(
            f"each task asks for {tasks.gpus:g} GPU, but the Ray cluster has no GPU and no node type "
            "with one: use --gpus-per-task 0 (or --device cpu)"
        )


def _remote_shard(fn: Callable[..., Any], tasks: Tasks, *, max_retries: int):
    """_run_shard as a Ray task with the resources of `tasks`. SPREAD: shards go to every node of a
    cluster, not first to fill the driver's node. The task's name is fn's, so that Ray's dashboard and
    state API tell the stages apart. A task lost with its worker is retried; an exception fn raises is
    not."""
    import ray

    return ray.remote(_run_shard).options(
        num_cpus=tasks.cpus,
        num_gpus=tasks.gpus,
        max_retries=max_retries,
        retry_exceptions=False,
        scheduling_strategy="SPREAD",
        name=getattr(fn, "__name__", "fan_out"),
    )


class _Progress:
    """The driver's progress bar of one fan-out: `sizes[i]` units for shard i, moved while a shard runs
    by what it reports (in this process directly; from Ray tasks through a _ProgressCounter actor,
    `counter`, None when not shown or lost) and, for the rest, when the shard ends."""

    def __init__(self, sizes: list[int], *, desc: str, unit: str, shown: bool, in_tasks: bool):
        from tqdm import tqdm

        self.sizes, self.desc = sizes, desc
        self.counter = _progress_counter() if in_tasks and shown and sizes else None
        self.bar = tqdm(total=sum(sizes), desc=desc, unit=unit, disable=not shown)
        self.reported: dict[int, int] = {}  # units the running shards reported so far

    def started(self, i: int) -> None:
        self.reported[i] = 0

    def add(self, i: int, count: int) -> None:
        """Shard i reported `count` more units (a late report of a finished shard is dropped)."""
        if i in self.reported:
            step = min(count, self.sizes[i] - self.reported[i])
            self.reported[i] += step
            self.bar.update(step)

    def poll(self) -> None:
        """Move the bar by what the running tasks reported since the last call."""
        if self.counter is None:
            return
        taken = _taken(self.counter)
        if taken is None:
            self.counter = None
            return
        for i, count in taken.items():
            self.add(i, count)

    def finished(self, i: int) -> None:
        self.bar.update(self.sizes[i] - self.reported.pop(i, 0))

    def close(self) -> None:
        self.bar.close()
        if self.counter is not None:
            import ray

            ray.kill(self.counter)


def _log_placement(what: str, nodes: set[str], devices: dict[str, int], tasks: Tasks) -> None:
    """One log line: how many tasks ran on which nodes and devices, with their resources."""
    if nodes:
        log.info(
            "%s: %d task(s) on %d node(s) %s, devices %s, %s CPU and %s GPU per task",
            what,
            sum(devices.values()),
            len(nodes),
            ", ".join(n[:8] for n in sorted(nodes)),
            ", ".join(f"{d} x{k}" for d, k in sorted(devices.items())),
            tasks.cpus,
            tasks.gpus,
        )
