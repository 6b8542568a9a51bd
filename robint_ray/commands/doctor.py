"""robint doctor: is this Ray cluster ready for the shipped experiments? Run it on the head after `ray up`.

    ray exec cluster.yaml 'robint doctor'                        # on the head, through the launcher
    ray job submit -- robint doctor --out s3://my-bucket/runs    # as a job (the cluster's $RAY_ADDRESS)

One screen: the alive nodes with their CPUs, GPUs and memory, the node types the autoscaler may add
(from ~/ray_bootstrap_config.yaml, which `ray up` writes on the head, or --cluster-config) and what its
status says (launch failures, node types with fewer alive nodes than their min_workers), whether each
shipped config (experiments/*.yaml, experiments/paper/*.yaml) fits as a whole job (all its workers at
once, on the alive nodes or on those the autoscaler may add: robint_ray.cluster.judge, the judgement
train, tune and study wait on), CUDA in a task on each GPU node (torch version, device name), and
whether --out is storage every node shares. The last line is the verdict: "ready" (exit status 0) or
"not ready", with the first problem and where to look (exit status 1). Where no cluster answers (none
started, or the one recorded in /tmp/ray stopped) it says so in one line, within seconds, exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..cluster import (
    WHERE_TO_LOOK,
    Job,
    WorkerRequest,
    autoscaler_config,
    judge,
    problems,
    read_cluster,
    storage_preflight,
)
from ..distributed import init_ray
from ..errors import InputError, check
from ..ray_address import recorded_cluster, recorded_cluster_file, running_cluster, tcp_answers

DEFAULT_EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"  # of a clone (pip install -e)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=None, help="the cluster to check (default: $RAY_ADDRESS, else the one running here: auto)"
    )
    parser.add_argument(
        "--cluster-config",
        type=Path,
        default=None,
        help="a cluster.yaml whose node types the autoscaler may start "
        "(default: ~/ray_bootstrap_config.yaml where it exists)",
    )
    parser.add_argument(
        "--experiments",
        type=Path,
        default=None,
        help=f"folder of the shipped configs (default: ./experiments, else {DEFAULT_EXPERIMENTS})",
    )
    parser.add_argument("--out", default=None, help="an output location (folder or s3:// URI) to check is shared")
    parser.add_argument(
        "--timeout", type=float, default=120, help="seconds to wait for the CUDA check on each GPU node (default: 120)"
    )


def cuda_report() -> dict:
    """What torch sees in this process: run as a Ray task that holds one GPU."""
    import torch

    report = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "available": torch.cuda.is_available()}
    if report["available"]:
        x = torch.ones(256, 256, device="cuda")
        report["device"] = torch.cuda.get_device_name(0)
        report["matmul_ok"] = bool(torch.allclose((x @ x)[0, 0].cpu(), torch.tensor(256.0)))
    return report


def check_cuda(nodes: list[dict], timeout: float) -> list[tuple[str, bool | None, str]]:
    """(node, verdict, text) per alive node: a task holding 1 GPU on each GPU node; None: no GPU."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(cuda_report)
    calls = {}
    for info in nodes:
        if info["Resources"].get("GPU", 0) >= 1:
            strategy = NodeAffinitySchedulingStrategy(info["NodeID"], soft=False)
            calls[info["NodeID"]] = remote.options(
                num_cpus=0, num_gpus=1, max_retries=0, scheduling_strategy=strategy
            ).remote()
    ready, _ = ray.wait(list(calls.values()), num_returns=len(calls), timeout=timeout) if calls else ([], [])
    rows = []
    for info in nodes:
        name = _node_name(info)
        call = calls.get(info["NodeID"])
        if call is None:
            rows.append((name, None, "no GPU"))
            continue
        if call not in ready:
            ray.cancel(call, force=True)
            rows.append((name, False, f"no answer within {timeout:g} s (every GPU busy, or the node is stuck)"))
            continue
        try:
            r = ray.get(call)
        except ray.exceptions.RayError as err:
            rows.append((name, False, f"the task failed: {str(err).strip().splitlines()[-1]}"))
            continue
        if not r["available"]:
            rows.append(
                (
                    name,
                    False,
                    f"Ray counts a GPU, but torch {r['torch']} (CUDA {r['cuda_build']}) sees none: "
                    f"no NVIDIA driver, or one older than CUDA {r['cuda_build']} needs",
                )
            )
        else:
            rows.append(
                (
                    name,
                    r["matmul_ok"],
                    f"torch {r['torch']}, CUDA {r['cuda_build']}, {r['device']}"
                    + ("" if r["matmul_ok"] else ", but a matmul gave a wrong result"),
                )
            )
    return rows


def check_storage(out: str | None) -> tuple[bool | None, str]:
    if out is None:
        return None, "not checked (give --out FOLDER_OR_URI)"
    try:
        storage_preflight(out)
    except InputError as err:
        return False, str(err)
    return True, f"{out}: every node writes there and reads what the others wrote"


def _node_name(info: dict) -> str:
    return f"{info['NodeID'][:8]} ({info.get('NodeManagerAddress', '?')})"


VERDICT = {True: "ok", False: "FAIL", None: "-"}


def cluster_address(given: str | None) -> tuple[str | None, str]:
    """(the address of the cluster to check, ""), or (None, why no cluster answers): --address, else the
    cluster `init_ray` would join (`running_cluster`: $RAY_ADDRESS, else the one `ray start` recorded on
    this machine); each must accept a connection within seconds (ray.init would retry a stopped
    cluster's address for many minutes)."""
    address = given or running_cluster()
    if address == "local":
        return None, "--address local would start a new Ray instance; the doctor checks a running cluster"
    if address is None or address == "auto":
        recorded = recorded_cluster()
        if recorded is None:
            return None, (
                f"no Ray cluster is running here (none recorded in {recorded_cluster_file()}): start one "
                "(ray start --head, or ray up cluster.yaml) or give --address HOST:PORT"
            )
        if not tcp_answers(recorded):
            return None, (
                f"the Ray cluster recorded in {recorded_cluster_file()} ({recorded}) does not answer: it has "
                "stopped; start one (ray start --head, or ray up cluster.yaml) or give --address HOST:PORT"
            )
        return recorded, ""
    if not tcp_answers(address.split("://", 1)[-1]):
        return None, f"no Ray cluster answers at {address}"
    return address, ""


def run(args: argparse.Namespace) -> int:
    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():  # a doctor joins, never starts
        address, why = cluster_address(args.address)
        if address is None:
            print(f"robint doctor: {why}", file=sys.stderr)
            return 1
        os.environ["RAY_ADDRESS"] = address
        if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":  # robint_ray's loopback-only switch
            del os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]
        args.address = address
    import ray

    experiments = args.experiments or (Path("experiments") if Path("experiments").is_dir() else DEFAULT_EXPERIMENTS)
    check(experiments.is_dir(), f"{experiments}: no experiments folder (give --experiments DIR)")
    init_ray(args.address)
    config_path, _ = autoscaler_config(args.cluster_config)
    cluster = read_cluster(args.cluster_config)
    infos = [n for n in ray.nodes() if n.get("Alive")]
    found: list[tuple[str, str]] = []  # (problem, where to look)

    lines = [f"Ray {ray.__version__}, {len(cluster.alive)} alive node(s):"]
    lines += [f"  {n.describe()}" for n in cluster.alive]
    if config_path:
        lines.append(f"node types the autoscaler may start ({config_path}):")
        alive = cluster.alive_of_type()
        for t in cluster.types:
            amounts = t.describe().split(": ", 1)[1] if t.known else "resources detected at start"
            lines.append(
                f"  {t.name!r}: {amounts}; min_workers {t.min_workers}, max_workers {t.max_workers}, "
                f"{alive.get(t.name, 0)} worker(s) alive" + (" (the head's type)" if t.head else "")
            )
        status = problems(cluster)
        lines.append("autoscaler: " + ("no problem reported" if not status else f"{len(status)} problem(s):"))
        lines += [f"  FAIL         {text}" for text in status]
        found += [(text, WHERE_TO_LOOK) for text in status]
    else:
        lines.append(
            "node types the autoscaler may start: none known (no ~/ray_bootstrap_config.yaml, no --cluster-config)"
        )

    lines.append(f"shipped configs (all their workers at once; {experiments}):")
    for shipped in shipped_configs(experiments):
        verdict = judge(Job(shipped.workers, shipped.request, what=f"{shipped.kind} worker"), cluster)
        name = f"{shipped.path.parent.name}/{shipped.path.name}"
        if verdict.fits is False:
            found.append((f"{name} does not fit the cluster", "the shipped configs above"))
        label = {True: "fits", "later": "fits later", None: "unknown", False: "NO ROOM"}[verdict.fits]
        lines.append(
            f"  {label:<12} {name} ({shipped.kind}, {shipped.workers} worker(s) x {shipped.request.describe()}): "
            f"{verdict.text}"
        )

    lines.append("CUDA in a task on each node:")
    for name, verdict, text in check_cuda(infos, args.timeout):
        if verdict is False:
            found.append((f"CUDA fails on node {name}", "the CUDA lines above"))
        label = {True: "ok", False: "FAIL", None: "no GPU"}[verdict]
        lines.append(f"  {label:<12} {name}: {text}")

    verdict, text = check_storage(args.out)
    if verdict is False:
        found.append((f"not every node can use {args.out}", "the output location above"))
    lines.append(f"output location: {VERDICT[verdict]}: {text}")
    if not found:
        lines.append("verdict: ready")
    else:
        more = f" (and {len(found) - 1} more problem(s) above)" if len(found) > 1 else ""
        lines.append(f"verdict: not ready: {found[0][0]}{more}; {found[0][1]}")
    print("\n".join(lines))
    return 0 if not found else 1


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

    from ..config import load_config
    from ..study import load_study
    from ..sweep import load_sweep

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
