"""robint doctor: is this Ray cluster ready for the shipped experiments? Run it on the head after `ray up`.

    ray exec cluster.yaml 'robint doctor'                        # on the head, through the launcher
    ray job submit -- robint doctor --out s3://my-bucket/runs    # as a job (the cluster's $RAY_ADDRESS)

One screen: the alive nodes with their CPUs, GPUs and memory, the node types the autoscaler may add
(from ~/ray_bootstrap_config.yaml, which `ray up` writes on the head, or --cluster-config), whether one
training worker of each shipped config (experiments/*.yaml, experiments/paper/*.yaml) fits a node and
why not, CUDA in a task on each GPU node (torch version, device name), and whether --out is storage
every node shares. Exit status 0 when every verdict is good, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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
    from ..errors import InputError
    from ..storage import preflight

    try:
        preflight(out)
    except InputError as err:
        return False, str(err)
    return True, f"{out}: every node writes there and reads what the others wrote"


def _node_name(info: dict) -> str:
    return f"{info['NodeID'][:8]} ({info.get('NodeManagerAddress', '?')})"


VERDICT = {True: "ok", False: "FAIL", None: "-"}


def run(args: argparse.Namespace) -> int:
    if "ray" not in sys.modules:  # a doctor joins a running cluster, never starts one
        address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
        os.environ["RAY_ADDRESS"] = address
        if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":  # robint_ray's loopback-only switch
            del os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]
    import ray

    from ..cluster import BOOTSTRAP_CONFIG, alive_nodes, fit_verdict, load_cluster_config, node_types, shipped_configs
    from ..distributed import init_ray
    from ..errors import check

    experiments = args.experiments or (Path("experiments") if Path("experiments").is_dir() else DEFAULT_EXPERIMENTS)
    check(experiments.is_dir(), f"{experiments}: no experiments folder (give --experiments DIR)")
    init_ray(args.address or os.environ.get("RAY_ADDRESS") or "auto")
    alive = alive_nodes()
    infos = [n for n in ray.nodes() if n.get("Alive")]
    config_path = args.cluster_config or (
        BOOTSTRAP_CONFIG.expanduser() if BOOTSTRAP_CONFIG.expanduser().is_file() else None
    )
    types = node_types(load_cluster_config(config_path)) if config_path else []
    nodes = alive + types
    bad = 0

    lines = [f"Ray {ray.__version__}, {len(alive)} alive node(s):"]
    lines += [f"  {n.describe()}" for n in alive]
    if config_path:
        lines.append(f"node types the autoscaler may start ({config_path}):")
        lines += [
            f"  {t.describe() if t.known else f'node type {t.name!r}: resources detected at start'}" for t in types
        ]
    else:
        lines.append(
            "node types the autoscaler may start: none known (no ~/ray_bootstrap_config.yaml, no --cluster-config)"
        )

    lines.append(f"shipped configs (one training worker of each; {experiments}):")
    for shipped in shipped_configs(experiments):
        fits, why = fit_verdict(shipped.request, nodes)
        bad += fits is False
        label = {True: "fits", False: "FITS NO NODE", None: "unknown"}[fits]
        lines.append(
            f"  {label:<12} {shipped.path.parent.name}/{shipped.path.name} ({shipped.kind}, "
            f"{shipped.workers} worker(s) x {shipped.request.describe()}): {why}"
        )

    lines.append("CUDA in a task on each node:")
    for name, verdict, text in check_cuda(infos, args.timeout):
        bad += verdict is False
        label = {True: "ok", False: "FAIL", None: "no GPU"}[verdict]
        lines.append(f"  {label:<12} {name}: {text}")

    verdict, text = check_storage(args.out)
    bad += verdict is False
    lines.append(f"output location: {VERDICT[verdict]}: {text}")
    lines.append("verdict: ready" if not bad else f"verdict: {bad} problem(s) above")
    print("\n".join(lines))
    return 0 if not bad else 1
