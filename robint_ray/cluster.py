"""The cluster's nodes, and whether one training worker's request fits any of them.

Ray Train asks for its whole worker group at once; a worker that fits no node (6 CPUs on a 4-vCPU
machine) never starts, and Ray Train waits and retries forever. `check_fits` says so at once, in one
line, before the trainer starts.

A node is either alive (from `ray.nodes()`) or a node type an autoscaling cluster may still start
(from the autoscaler's config: `~/ray_bootstrap_config.yaml`, which `ray up` writes on the head, or
a cluster.yaml given by hand). Resources are Ray's: CPU and GPU counts, memory in bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import InputError

log = logging.getLogger(__name__)

# Where `ray up` puts the cluster config on the head node, for `ray start --autoscaling-config`
# (Ray's own default, ray.autoscaler._private.constants: the head's ~/ray_bootstrap_config.yaml).
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
GIB = 1024**3


@dataclass(frozen=True)
class Node:
    """One node of the cluster, or one node type the autoscaler may start (alive=False).

    cpus / gpus: Ray's CPU and GPU resources; memory: Ray's `memory` resource in bytes (0: unknown).
    known=False: a node type whose resources the config does not state (Ray detects them at start).
    """

    name: str
    cpus: float
    gpus: float
    memory: float = 0
    alive: bool = True
    known: bool = True

    def describe(self) -> str:
        where = f"node {self.name}" if self.alive else f"node type {self.name!r} (not started)"
        return f"{where}: {_amounts(self.cpus, self.gpus, self.memory)}"


@dataclass(frozen=True)
class WorkerRequest:
    """What one training worker asks Ray for: CPUs, GPUs and (0: no request) memory in bytes."""

    cpus: float
    gpus: float = 0
    memory: float = 0

    def fits(self, node: Node) -> bool:
        return (
            node.known
            and self.cpus <= node.cpus
            and self.gpus <= node.gpus
            and (self.memory == 0 or self.memory <= node.memory)
        )

    def describe(self) -> str:
        return _amounts(self.cpus, self.gpus, self.memory)


def _amounts(cpus: float, gpus: float, memory: float) -> str:
    text = f"{cpus:g} CPU + {gpus:g} GPU"
    return text + (f" + {memory / GIB:.1f} GiB" if memory else "")


def alive_nodes() -> list[Node]:
    """The alive nodes of the Ray cluster this process is connected to (ray.init first)."""
    import ray

    nodes = []
    for info in ray.nodes():
        if not info.get("Alive"):
            continue
        res = info.get("Resources", {})
        name = f"{info['NodeID'][:8]} ({info.get('NodeManagerAddress', '?')})"
        nodes.append(Node(name, res.get("CPU", 0), res.get("GPU", 0), res.get("memory", 0)))
    return nodes


def node_types(config: Mapping[str, Any]) -> list[Node]:
    """The node types of a cluster config (a cluster.yaml as a dict) that may run workers: every
    type with max_workers > 0, and the head type. Resources from each type's `resources`; a type
    without them (the local provider's, or an AWS type left to Ray's instance catalogue) is
    known=False."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    nodes = []
    for name, spec in types.items():
        if name != head and int(spec.get("max_workers", config.get("max_workers", 0)) or 0) <= 0:
            continue
        res = spec.get("resources")
        if not res or "CPU" not in res:
            nodes.append(Node(name, 0, 0, 0, alive=False, known=False))
            continue
        nodes.append(Node(name, res.get("CPU", 0), res.get("GPU", 0), res.get("memory", 0), alive=False))
    return nodes


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(path).expanduser().read_text())


def cluster_nodes(cluster_config: str | Path | None = None) -> list[Node]:
    """Alive nodes, then the node types of the autoscaler's config: `cluster_config` if given, else
    ~/ray_bootstrap_config.yaml where it exists (on the head of a `ray up` cluster)."""
    nodes = alive_nodes()
    path = Path(cluster_config) if cluster_config is not None else BOOTSTRAP_CONFIG.expanduser()
    if cluster_config is not None or path.is_file():
        nodes += node_types(load_cluster_config(path))
    return nodes


def largest(nodes: Iterable[Node]) -> Node | None:
    """The node with the most GPUs, then CPUs, then memory (known resources only)."""
    known = [n for n in nodes if n.known]
    return max(known, key=lambda n: (n.gpus, n.cpus, n.memory), default=None)


def fit_verdict(request: WorkerRequest, nodes: list[Node]) -> tuple[bool | None, str]:
    """(True, the first node that holds one worker), (False, why not: the largest node), or
    (None, why unknown) when nothing fits but a node type's resources are unknown."""
    for node in nodes:
        if request.fits(node):
            return True, node.describe()
    unknown = [n.name for n in nodes if not n.known]
    big = largest(nodes)
    biggest = big.describe() if big else "the cluster has no nodes"
    if unknown:
        return None, (
            f"no node holds {request.describe()} yet; node type(s) {', '.join(unknown)} state no "
            f"resources (largest known: {biggest})"
        )
    return False, f"the largest is {biggest}"


def check_fits(request: WorkerRequest, nodes: list[Node], *, what: str = "one training worker") -> None:
    """Raise InputError (one line) when no node can hold `request`; warn when that is unknown."""
    fits, why = fit_verdict(request, nodes)
    if fits is False:
        raise InputError(f"{what} needs {request.describe()}, which fits no node of the cluster: {why}")
    if fits is None:
        log.warning("%s: %s", what, why)


# --- the shipped configs -------------------------------------------------------------------------


@dataclass(frozen=True)
class ShippedConfig:
    """One shipped experiment file and what each of its training workers asks for on a GPU cluster."""

    path: Path
    kind: str  # "train", "sweep" or "study"
    workers: int
    request: WorkerRequest


def shipped_configs(experiments: str | Path) -> list[ShippedConfig]:
    """Every training, sweep and study config of experiments/*.yaml and experiments/paper/*.yaml
    (the small CPU versions in experiments/smoke/ are left out). A training config's workers take one
    GPU each, as `robint train ... --gpus-per-worker 1` on a GPU cluster; a sweep or a study says its
    own workers and gpus_per_worker; a study asks for the larger of its two models' workers."""
    import yaml

    from .config import load_config
    from .study import load_study
    from .sweep import load_sweep

    experiments = Path(experiments)
    shipped = []
    for path in sorted(experiments.glob("*.yaml")) + sorted((experiments / "paper").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if "space" in data:
            sweep = load_sweep(path)
            request = WorkerRequest(cpus=sweep.trial.cpus_per_worker, gpus=sweep.options.gpus_per_worker)
            shipped.append(ShippedConfig(path, "sweep", sweep.options.workers, request))
        elif "standard" in data or "robust" in data:
            study = load_study(path)
            cpus = max(
                load_config(source.train).cpus_per_worker
                for source in (study.standard, study.robust)
                if source.train is not None
            )
            shipped.append(
                ShippedConfig(path, "study", study.workers, WorkerRequest(cpus=cpus, gpus=study.gpus_per_worker))
            )
        else:
            cfg = load_config(path)
            shipped.append(ShippedConfig(path, "train", 1, WorkerRequest(cpus=cfg.cpus_per_worker, gpus=1)))
    return shipped
