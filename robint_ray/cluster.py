"""Is the cluster ready for a job: its room for the job, one judgement for `robint train`, `tune`,
`study` and `doctor`, the one wait for that room, and whether every node can use the output location.

A job is `workers` copies of one request (CPUs, GPUs, memory): Ray Train's worker group, the worker
group of one Tune trial, or one Ray task of a study stage. Ray places a worker group all at once, and
a request that no node can hold waits for ever. So, before anything starts, `judge` counts how many
workers the cluster can hold at once, packing whole workers into nodes:
- the alive nodes (`ray.nodes()`, their total resources: work that holds them now ends), and
- with an autoscaler (in a process that joined a cluster whose autoscaler config is known:
  ~/ray_bootstrap_config.yaml, which `ray up` writes on the head, or a cluster.yaml given to `robint
  doctor --cluster-config`), what each node type may still add: max_workers nodes of it less those
  alive, within the config's overall max_workers.
A job that fits the alive nodes starts; one that only fits once the autoscaler adds nodes waits for
them (`wait_for_room`, for at most `--wait-timeout` seconds, default $ROBINT_WAIT_TIMEOUT, else 30
minutes), asking the autoscaler for them (Ray's `request_resources`); one that never fits is an
InputError of one line, at once. A private local Ray (no cluster joined) is what it is: nothing joins it.

Which node type an alive node is comes from the autoscaler's status where it runs (the counts `ray
status` shows), else from its resources (a node whose CPUs and GPUs equal a type's stated ones).
`problems` reads the same status for `robint doctor`: launch failures, and node types whose
min_workers are not alive.

`storage_preflight` checks, before any work, that every alive node can write at the output location
and read what every other node wrote there (a local folder the nodes do not share fails it).

Everything here reads the Ray cluster this process is connected to (`distributed.init_ray` first);
whether that is a cluster it joined, where an autoscaler may add nodes, is `ray_address.joined_cluster`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .errors import ClusterError, InputError, one_line
from .ray_address import joined_cluster
from .storage import Location

log = logging.getLogger(__name__)

# Where `ray up` puts the cluster config on the head node, for `ray start --autoscaling-config`
# (Ray's own default, ray.autoscaler._private.constants: the head's ~/ray_bootstrap_config.yaml).
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
GIB = 1024**3
# How long train, tune and study wait for the room a job needs (seconds): --wait-timeout, else this
# environment variable, else DEFAULT_WAIT_S (an AWS GPU node takes minutes to launch and set up).
WAIT_ENV = "ROBINT_WAIT_TIMEOUT"
DEFAULT_WAIT_S = 1800.0
# Where a cluster's launch problems are told, on its head.
WHERE_TO_LOOK = "see `ray status -v` and /tmp/ray/session_latest/logs/monitor.* on the head"


@dataclass(frozen=True)
class Node:
    """One alive node of the cluster, or one node type the autoscaler may start (alive=False).

    cpus / gpus: Ray's CPU and GPU resources; memory: Ray's `memory` resource in bytes (0: unknown).
    known=False: a node type whose resources the config does not state (Ray detects them at start).
    min_workers / max_workers: a node type's bounds in the autoscaler config. head: the head node (type).
    """

    name: str
    cpus: float
    gpus: float
    memory: float = 0
    alive: bool = True
    known: bool = True
    min_workers: int = 0
    max_workers: int = 0
    head: bool = False

    def describe(self) -> str:
        where = f"node {self.name}" if self.alive else f"node type {self.name!r} (not started)"
        return f"{where}: {_amounts(self.cpus, self.gpus, self.memory)}"


@dataclass(frozen=True)
class WorkerRequest:
    """What one training worker (or one Ray task) asks Ray for: CPUs, GPUs and (0: none) memory in bytes."""

    cpus: float
    gpus: float = 0
    memory: float = 0

    def per_node(self, node: Node) -> int:
        """How many of these one node holds at once (0 where its resources are unknown)."""
        if not node.known:
            return 0
        counts = [
            math.floor(have / need + 1e-9)
            for need, have in ((self.cpus, node.cpus), (self.gpus, node.gpus), (self.memory, node.memory))
            if need > 0
        ]
        return min(counts) if counts else 1_000_000  # asks for nothing: any node holds it

    def fits(self, node: Node) -> bool:
        return self.per_node(node) >= 1

    def bundle(self) -> dict[str, float]:
        """The request as a Ray resource bundle."""
        amounts = {"CPU": self.cpus, "GPU": self.gpus, "memory": self.memory}
        return {k: v for k, v in amounts.items() if v > 0}

    def describe(self) -> str:
        return _amounts(self.cpus, self.gpus, self.memory)


@dataclass(frozen=True)
class Job:
    """`workers` copies of `request`, placed all at once. what: how messages name one worker."""

    workers: int
    request: WorkerRequest
    what: str = "training worker"

    def describe(self) -> str:
        return f"{self.workers} {self.what}(s) of {self.request.describe()}"


def _amounts(cpus: float, gpus: float, memory: float) -> str:
    text = f"{cpus:g} CPU + {gpus:g} GPU"
    return text + (f" + {memory / GIB:.1f} GiB" if memory else "")


@dataclass(frozen=True)
class Cluster:
    """What the cluster has now and may add: alive nodes, node types (with an autoscaler), the
    config's overall max_workers (None: no limit), and the autoscaler's status (None: not known)."""

    alive: list[Node]
    types: list[Node] = field(default_factory=list)
    max_workers: int | None = None
    status: Mapping[str, Any] | None = None

    def alive_of_type(self) -> dict[str, int]:
        """Alive worker nodes per node type: the autoscaler's own count where its status is known (less
        the head, which it counts under the head's type), else the alive nodes (not the head) whose CPUs
        and GPUs equal a type's stated ones."""
        report = (self.status or {}).get("autoscaler_report") or {}
        if report.get("active_nodes") is not None:
            counts = {name: int(n) for name, n in report["active_nodes"].items()}
            for kind in self.types:
                if kind.head and counts.get(kind.name):
                    counts[kind.name] -= 1
            return counts
        counts = {}
        for node in self.alive:
            if node.head:
                continue
            kind = next((t for t in self.types if t.known and (t.cpus, t.gpus) == (node.cpus, node.gpus)), None)
            if kind is not None:
                counts[kind.name] = counts.get(kind.name, 0) + 1
        return counts

    def may_add(self) -> dict[str, int]:
        """Worker nodes per node type that the autoscaler may still start, before the overall
        max_workers, which `room` applies. (The head's type starts workers only where its max_workers
        says so: the local provider's one type.)"""
        alive = self.alive_of_type()
        return {t.name: max(0, t.max_workers - alive.get(t.name, 0)) for t in self.types if t.max_workers > 0}


@dataclass(frozen=True)
class Verdict:
    """How a job meets a cluster. fits: True (the alive nodes hold it now), "later" (once the
    autoscaler adds nodes), None (unknown: a node type states no resources), False (never)."""

    fits: bool | str | None
    text: str
    holds_now: int = 0
    holds_at_most: int = 0


def room(request: WorkerRequest, cluster: Cluster) -> tuple[int, int]:
    """(workers the alive nodes hold at once, workers they and the nodes the autoscaler may add hold):
    whole workers packed per node; the added nodes taken from the types holding most workers first,
    within the overall max_workers less the worker nodes alive of known types."""
    now = sum(request.per_node(node) for node in cluster.alive)
    left = None
    if cluster.max_workers is not None:  # (the autoscaler's status may name nodes of no type of the config)
        alive = cluster.alive_of_type()
        left = max(0, cluster.max_workers - sum(alive.get(t.name, 0) for t in cluster.types))
    later = now
    by_type = {t.name: t for t in cluster.types}
    for name, count in sorted(cluster.may_add().items(), key=lambda item: -request.per_node(by_type[item[0]])):
        count = count if left is None else min(count, left)
        later += count * request.per_node(by_type[name])
        left = None if left is None else left - count
    return now, later


def largest(nodes: Iterable[Node]) -> Node | None:
    """The node with the most GPUs, then CPUs, then memory (known resources only)."""
    known = [n for n in nodes if n.known]
    return max(known, key=lambda n: (n.gpus, n.cpus, n.memory), default=None)


def judge(job: Job, cluster: Cluster) -> Verdict:
    """How `job` meets `cluster` (see Verdict), with one line that says why."""
    nodes = cluster.alive + [t for t in cluster.types if t.max_workers > 0]
    now, later = room(job.request, cluster)
    unknown = [t.name for t in cluster.types if not t.known and t.max_workers > 0]
    if not any(job.request.fits(n) for n in nodes) and not unknown:
        big = largest(nodes)
        biggest = big.describe() if big else "the cluster has no nodes"
        return Verdict(
            False,
            f"one {job.what} needs {job.request.describe()}, which fits no node of the cluster: "
            f"the largest is {biggest}",
        )
    counts = f"the alive nodes hold {now}" + (f", {later} with the nodes the autoscaler may add" if later > now else "")
    if now >= job.workers:
        return Verdict(True, counts, now, later)
    if later >= job.workers:
        by_type = {t.name: t for t in cluster.types}
        adds = ", ".join(
            f"{n} x {name!r}" for name, n in cluster.may_add().items() if n and job.request.fits(by_type[name])
        )
        return Verdict("later", f"{counts} (the autoscaler may add {adds})", now, later)
    if unknown:
        return Verdict(
            None,
            f"{counts}; node type(s) {', '.join(unknown)} state no resources (detected when one starts)",
            now,
            later,
        )
    return Verdict(False, f"{job.describe()} need room for {job.workers}, {counts}: use fewer workers", now, later)


# --- reading the cluster ---------------------------------------------------------------------------


def alive_nodes() -> list[Node]:
    """The alive nodes of the Ray cluster this process is connected to (ray.init first)."""
    import ray

    nodes = []
    for info in ray.nodes():
        if not info.get("Alive"):
            continue
        res = info.get("Resources", {})
        name = f"{info['NodeID'][:8]} ({info.get('NodeManagerAddress', '?')})"
        head = "node:__internal_head__" in res
        nodes.append(Node(name, res.get("CPU", 0), res.get("GPU", 0), res.get("memory", 0), head=head))
    return nodes


def node_types(config: Mapping[str, Any]) -> list[Node]:
    """The node types of a cluster config (a cluster.yaml as a dict), with their min_workers and
    max_workers as Ray's autoscaler reads them (a type's own; else 0 for the head's type, the config's
    max_workers for the others). Resources from each type's `resources`; a type without them (the local
    provider's, or an AWS type left to Ray's instance catalogue) is known=False."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    nodes = []
    for name, spec in types.items():
        bounds = dict(
            min_workers=int(spec.get("min_workers", 0) or 0),
            max_workers=int(spec.get("max_workers", 0 if name == head else config.get("max_workers", 0)) or 0),
            head=name == head,
            alive=False,
        )
        res = spec.get("resources")
        if not res or "CPU" not in res:
            nodes.append(Node(name, 0, 0, 0, known=False, **bounds))
            continue
        nodes.append(Node(name, res.get("CPU", 0), res.get("GPU", 0), res.get("memory", 0), **bounds))
    return nodes


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"cluster config not found: {path}")
    return yaml.safe_load(path.read_text()) or {}


def autoscaler_config(cluster_config: str | Path | None = None) -> tuple[Path | None, dict[str, Any] | None]:
    """(path, config) of the autoscaler's config: `cluster_config` if given, else, in a process that
    joined a cluster, ~/ray_bootstrap_config.yaml where it exists (on the head of a `ray up` cluster);
    (None, None) where there is none (a private local Ray has no autoscaler)."""
    if cluster_config is not None:
        return Path(cluster_config), load_cluster_config(cluster_config)
    path = BOOTSTRAP_CONFIG.expanduser()
    if joined_cluster() and path.is_file():
        return path, load_cluster_config(path)
    return None, None


def autoscaler_status() -> dict[str, Any] | None:
    """The status the autoscaler (v1, as `ray up` runs it) last published, as `ray status` reads it:
    {"autoscaler_report": {active_nodes, pending_launches, failed_nodes, node_availability_summary,
    ...}, "error": its last fatal error}; None where no autoscaler runs. From the GCS's internal
    key-value store: Ray has no public API for it (`ray status` reads the same keys the same way)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return None
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    error = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_ERROR)
    if raw is None and error is None:
        return None
    status = json.loads(raw) if raw else {}
    if error:
        status["error"] = error.decode(errors="replace")
    return status


def read_cluster(cluster_config: str | Path | None = None) -> Cluster:
    """The cluster this process is connected to: alive nodes, and where an autoscaler config is known
    (`autoscaler_config`), its node types, max_workers and the autoscaler's status."""
    _, config = autoscaler_config(cluster_config)
    if config is None:
        return Cluster(alive_nodes())
    overall = config.get("max_workers")
    return Cluster(alive_nodes(), node_types(config), None if overall is None else int(overall), autoscaler_status())


def cluster_nodes(cluster_config: str | Path | None = None) -> list[Node]:
    """Alive nodes, then the node types the autoscaler may start (see `read_cluster`)."""
    cluster = read_cluster(cluster_config)
    return cluster.alive + cluster.types


def problems(cluster: Cluster) -> list[str]:
    """What keeps an autoscaled cluster from being ready, one line each: its autoscaler's fatal error,
    node launches that failed (and why, where it says), node types with fewer alive nodes than their
    min_workers."""
    status = cluster.status or {}
    report = status.get("autoscaler_report") or {}
    found = []
    if status.get("error"):
        # Ray's monitor writes "The autoscaler failed with the following error:\n<the error>"
        found.append(f"the autoscaler failed: {_first_line(status['error'].split('following error:', 1)[-1])}")
    availability = (report.get("node_availability_summary") or {}).get("node_availabilities") or {}
    for name, record in sorted(availability.items()):
        if not record.get("is_available", True):
            info = record.get("unavailable_node_information") or {}
            why = ": ".join(x for x in (info.get("category"), _first_line(info.get("description") or "")) if x)
            found.append(f"the autoscaler could not launch node type {name!r} ({why or 'no reason given'})")
    for _, name in report.get("failed_nodes") or []:
        found.append(f"a node of type {name!r} was launched but failed to set up or start Ray")
    alive = cluster.alive_of_type()
    pending = report.get("pending_launches") or {}
    for kind in cluster.types:
        if alive.get(kind.name, 0) < kind.min_workers:
            starting = pending.get(kind.name, 0) + sum(
                1 for p in report.get("pending_nodes") or [] if p[1] == kind.name
            )
            found.append(
                f"node type {kind.name!r} wants min_workers {kind.min_workers}, {alive.get(kind.name, 0)} alive"
                + (f" ({starting} starting)" if starting else "")
            )
    return found


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


# --- waiting for room ------------------------------------------------------------------------------


def wait_timeout(given: float | None = None) -> float:
    """Seconds to wait for room: `given`, else $ROBINT_WAIT_TIMEOUT, else DEFAULT_WAIT_S."""
    if given is None:
        text = os.environ.get(WAIT_ENV)
        try:
            given = DEFAULT_WAIT_S if not text else float(text)
        except ValueError as err:
            raise InputError(f"${WAIT_ENV} must be a number of seconds, got {text!r}") from err
    if not given >= 0:
        raise InputError(f"the wait timeout must be >= 0 seconds, got {given}")
    return float(given)


def wait_for_room(job: Job, *, timeout_s: float | None = None, poll_s: float = 5.0) -> None:
    """Return once the alive nodes can hold the whole job (Ray then places it). A job the cluster can
    never hold is an InputError of one line, at once; one that only an autoscaler's new nodes can hold
    is waited for (the autoscaler asked for them through `ray.autoscaler.sdk.request_resources`, and the
    request withdrawn at the end), logging what it waits for, and given up after timeout_s (None:
    `wait_timeout()`) with a ClusterError of one line. In a process connected to Ray
    (`distributed.init_ray` first)."""
    timeout_s = wait_timeout(timeout_s)
    cluster = read_cluster()
    verdict = judge(job, cluster)
    if verdict.fits is True:
        return
    if verdict.fits is False:  # (without an autoscaler, nothing is added: the verdict is True or False)
        raise InputError(verdict.text)
    log.info(
        "waiting up to %g s (--wait-timeout, $%s) for room for %s: %s",
        timeout_s,
        WAIT_ENV,
        job.describe(),
        verdict.text,
    )
    _ask_autoscaler([job.request.bundle()] * job.workers)
    deadline = time.monotonic() + timeout_s
    told = time.monotonic()
    try:
        while True:
            if time.monotonic() >= deadline:
                found = problems(cluster)
                raise ClusterError(
                    f"gave up after {timeout_s:g} s waiting for room for {job.describe()}: {verdict.text}"
                    + (f"; {found[0]}" if found else "")
                    + f"; {WHERE_TO_LOOK}. What was done is kept: rerun the same command to go on"
                )
            time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
            cluster = read_cluster()
            verdict = judge(job, cluster)
            if verdict.fits is True:
                log.info("room for %s: %s", job.describe(), verdict.text)
                return
            if verdict.fits is False:
                raise InputError(verdict.text)
            if time.monotonic() - told >= 60:
                told = time.monotonic()
                log.info("still waiting for room for %s: %s", job.describe(), verdict.text)
    finally:
        _ask_autoscaler([])


def _ask_autoscaler(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler for these bundles ([]: withdraw the request); nothing without one."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


# --- can every node of the cluster write and read at the output location? -----------------------

PREFLIGHT = ".robint-preflight"
_FIX = (
    "give a location that every node can write and read: s3://bucket/prefix (with credentials on every "
    "node) or a folder on shared storage (NFS, EFS) mounted at the same path on every node"
)


def _node_write(folder: Location, node: str) -> str | None:
    """Write this node's marker into folder; returns None, or why it could not."""
    try:
        (folder / node).write_text(node)
    except (OSError, InputError) as err:  # pyarrow raises OSError subclasses (PermissionError, ...)
        return one_line(err)
    return None


def _node_read(folder: Location, nodes: list[str]) -> tuple[list[str], str | None]:
    """The markers of `nodes` this node cannot read in folder (and why, where listing failed)."""
    try:
        return [n for n in nodes if not (folder / n).is_file() or (folder / n).read_text() != n], None
    except (OSError, InputError) as err:
        return list(nodes), one_line(err)


def _node_clean(folder: Location, node: str, created: Location | None) -> None:
    """Remove this node's marker, and on a local disk the folders the check created, when empty:
    the location itself and its parents up to `created` (the outermost one that did not exist)."""
    (folder / node).delete()
    if not folder.is_local:
        return
    paths = [folder.local_path, folder.parent.local_path]
    if created is not None:
        path = folder.parent.parent.local_path  # the location
        while path != created.local_path.parent:
            paths.append(path)
            path = path.parent
    for path in paths:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _first_missing(location: Location) -> Location | None:
    """The outermost folder of location that does not exist yet on this node (None: it exists)."""
    if not location.is_local:
        return None
    path, missing = location.local_path, None
    while not path.exists():
        path, missing = path.parent, path
    return Location(missing) if missing is not None else None


def storage_preflight(location: str | os.PathLike | Location, *, timeout_s: float = 60) -> None:
    """Check, before any work, that every alive node of the Ray cluster can write at `location` and
    read what every other node wrote there: one small task (0 CPUs) per node writes a marker, then
    each reads all of them, then each removes its own. Raises InputError with one line naming the
    node and the fix (a local folder the nodes do not share, a bucket without credentials on some node).
    On a single node the check runs in this process (milliseconds). In a process connected to Ray
    (`distributed.init_ray` first)."""
    import ray

    location = Location(location)
    folder = location / PREFLIGHT / uuid.uuid4().hex
    nodes = {n["NodeID"]: f"{n['NodeManagerAddress']} (id {n['NodeID'][:8]})" for n in ray.nodes() if n["Alive"]}
    if len(nodes) <= 1:
        _preflight_here(location, folder)
        return
    on_each = partial(_on_each_node, nodes, location=location, timeout_s=timeout_s)
    created = on_each(_first_missing, lambda node: (location,))
    try:
        written = on_each(_node_write, lambda node: (folder, node))
        for node, error in written.items():
            if error is not None:
                raise InputError(f"{location}: node {nodes[node]} cannot write there ({error}); {_FIX}")
        seen = on_each(_node_read, lambda node: (folder, list(nodes)))
        for reader, (missing, why) in seen.items():
            if missing:
                writer = nodes[missing[0]]
                problem = (
                    "a local folder that the nodes do not share"
                    if location.is_local
                    else why or "is its storage endpoint or bucket another one?"
                )
                raise InputError(
                    f"{location}: node {nodes[reader]} cannot read what node {writer} wrote there ({problem}); {_FIX}"
                )
    finally:
        on_each(_node_clean, lambda node: (folder, node, created[node]))
        _remove_remote(location / PREFLIGHT)


def _preflight_here(location: Location, folder: Location) -> None:
    """storage_preflight on a single node: write, read back and remove a marker from this process."""
    created = _first_missing(location)
    error = _node_write(folder, "driver")
    missing, why = _node_read(folder, ["driver"]) if error is None else ([], None)
    if error is None:
        _node_clean(folder, "driver", created)
        _remove_remote(location / PREFLIGHT)
    if error or missing:
        raise InputError(f"{location}: cannot write and read there ({error or why or 'the file written is not there'})")


def _on_each_node(
    nodes: dict[str, str],
    fn: Callable[..., Any],
    args_of: Callable[[str], tuple],
    *,
    location: Location,
    timeout_s: float,
) -> dict[str, Any]:
    """{node: fn(*args_of(node))}, run as a 0-CPU task pinned to each node; a node that does not answer
    within timeout_s is an InputError naming it (its task is cancelled)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    calls = [
        ray.remote(fn)
        .options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        .remote(*args_of(node))
        for node in nodes
    ]
    try:
        return dict(zip(nodes, ray.get(calls, timeout=timeout_s)))
    except ray.exceptions.GetTimeoutError as err:
        ready, _ = ray.wait(calls, num_returns=len(calls), timeout=0)
        late = [nodes[n] for n, c in zip(nodes, calls) if c not in ready]
        for call in calls:
            ray.cancel(call, force=True)
        raise InputError(
            f"{location}: node(s) {', '.join(late)} did not answer the storage check within "
            f"{timeout_s:g} s (busy or unreachable)"
        ) from err


def _remove_remote(folder: Location) -> None:
    """Delete the check's folder on an object store (deleting its last file leaves a folder marker)."""
    if not folder.is_local:
        try:
            folder.delete()
        except OSError:  # this process cannot reach the store either: the check's error says so
            pass
