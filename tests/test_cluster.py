"""robint_ray.cluster: a training worker that fits no node fails before training, in one line."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import run_in_namespaces

from robint_ray.cluster import Node, WorkerRequest, check_fits, fit_verdict, largest, node_types
from robint_ray.config import TrainConfig
from robint_ray.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def tiny(**changes) -> TrainConfig:
    cfg = TrainConfig.from_dict(
        dict(
            arch="cifar_resnet8",
            epochs=1,
            batch_size=64,
            test=False,
            max_failures=0,
            data=dict(path="sample", val_fraction=0.2),
        )
    )
    return cfg.override(changes)


def test_fit_verdicts():
    worker = Node("w", cpus=4, gpus=1, memory=15 * 1024**3)
    assert WorkerRequest(cpus=4, gpus=1).fits(worker)
    assert not WorkerRequest(cpus=6, gpus=1).fits(worker)
    assert not WorkerRequest(cpus=1, gpus=2).fits(worker)
    assert not WorkerRequest(cpus=1, gpus=1, memory=16 * 1024**3).fits(worker)
    head = Node("h", cpus=0, gpus=0)
    assert largest([head, worker]) is worker
    fits, why = fit_verdict(WorkerRequest(cpus=6, gpus=1), [head, worker])
    assert fits is False and why == "the largest is node w: 4 CPU + 1 GPU + 15.0 GiB"
    # A node type with unknown resources: not a failure, only a warning.
    fits, why = fit_verdict(WorkerRequest(cpus=6, gpus=1), [head, Node("t", 0, 0, alive=False, known=False)])
    assert fits is None and "node type(s) t state no resources" in why
    check_fits(WorkerRequest(cpus=6, gpus=1), [Node("t", 0, 0, alive=False, known=False)])


def test_node_types_of_a_cluster_config():
    config = {
        "max_workers": 2,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 0, "GPU": 0}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 8, "GPU": 1, "memory": 2**34}, "max_workers": 2},
            "off": {"resources": {"CPU": 64, "GPU": 8}, "max_workers": 0},  # may never start
            "auto": {"max_workers": 1},
        },
    }  # resources detected at start
    nodes = {n.name: n for n in node_types(config)}
    assert sorted(nodes) == ["auto", "gpu", "head"]
    assert (nodes["gpu"].cpus, nodes["gpu"].gpus, nodes["gpu"].memory, nodes["gpu"].alive) == (8, 1, 2**34, False)
    assert not nodes["auto"].known


@pytest.mark.ray
def test_a_worker_larger_than_every_node_fails_before_training(ray_local, tmp_path, monkeypatch, run_cli):
    """Under $RAY_ADDRESS (a cluster whose autoscaler might add nodes) a short cluster is only a
    warning, and Ray Train would wait for the worker group forever; a worker larger than every node
    (and every node type) must fail at once, naming the request and the largest node."""
    from robint_ray.train import run

    monkeypatch.setenv("RAY_ADDRESS", "auto")  # ray is initialised already: only run()'s checks read it
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/ray_bootstrap_config.yaml of this machine
    cpus = ray_local.cluster_resources()["CPU"]
    with pytest.raises(InputError) as err:
        run(tiny(cpus_per_worker=int(cpus) + 1), tmp_path / "run", workers=1)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"one training worker needs {int(cpus) + 1} CPU + 0 GPU")
    assert "the largest is node " in message and f": {cpus:g} CPU + 0 GPU" in message
    assert not (tmp_path / "run").exists()  # nothing started, nothing written

    # The same through the CLI: one line on stderr, exit status 2. A GPU on a CPU-only cluster.
    config = tmp_path / "tiny.yaml"
    config.write_text("arch: cifar_resnet8\nepochs: 1\nbatch_size: 64\ndata: {path: sample, val_fraction: 0.2}\n")
    code, _, err = run_cli(["train", config, "--out", tmp_path / "cli", "--gpus-per-worker", "1"])
    assert code == 2
    err_lines = err.strip().splitlines()
    assert len(err_lines) == 1 and "needs 1 CPU + 1 GPU, which fits no node" in err_lines[0], err_lines

    # With a cluster config whose GPU node type is large enough, the autoscaler can start one: no error
    # from the check (run() then goes on, so only the check itself is called here).
    from robint_ray.cluster import cluster_nodes

    (tmp_path / "ray_bootstrap_config.yaml").write_text(
        "max_workers: 1\nhead_node_type: head\navailable_node_types:\n"
        "  head: {resources: {CPU: 0, GPU: 0}, max_workers: 0, node_config: {}}\n"
        "  gpu: {resources: {CPU: 8, GPU: 1}, max_workers: 1, node_config: {}}\n"
    )
    check_fits(WorkerRequest(cpus=6, gpus=1), cluster_nodes())
    with pytest.raises(InputError, match="the largest is node type 'gpu' \\(not started\\): 8 CPU \\+ 1 GPU"):
        check_fits(WorkerRequest(cpus=6, gpus=2), cluster_nodes())


DOCTOR = """
set -e
ip link set lo up
mkdir -p /tmp/ray && mount -t tmpfs tmpfs /tmp/ray
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1  # RAY_AUTH_MODE=token and the token: from the test
# A head with no resources for tasks (as cluster.yaml's) and a second node that claims a GPU it has not.
ray start --head --port=6393 --num-cpus=0 --num-gpus=0 --dashboard-host=127.0.0.1 --disable-usage-stats \
  --temp-dir=/tmp/ray/head >/dev/null
ray start --address=127.0.0.1:6393 --num-cpus=4 --num-gpus=1 --disable-usage-stats --temp-dir=/tmp/ray/node2 >/dev/null
cd "$ROOT"
doctor() {  # doctor FILE ARGS...: its output and exit status in FILE
  python -m robint_ray doctor "${@:2}" > "$1" && echo "exit 0" >> "$1" || echo "exit $?" >> "$1"
}
doctor /tmp/ray/plain.txt --address 127.0.0.1:6393 --timeout 60
doctor /tmp/ray/types.txt --cluster-config cluster.yaml --timeout 60 --out /tmp/ray/shared-out
cat /tmp/ray/plain.txt; echo ====; cat /tmp/ray/types.txt
"""


@pytest.mark.ray
@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare")
def test_doctor_on_a_two_node_cluster(tmp_path):
    """`robint doctor` on a simulated two-node cluster (private network, PID and mount namespaces: every
    Ray process ends with them): every node, a verdict per shipped config, the 6-CPU workers fitting no
    node until cluster.yaml's node types are known, CUDA failing on the node that claims a GPU."""
    proc = run_in_namespaces(DOCTOR, tmp_path, ROOT=str(ROOT))
    plain, types = proc.stdout.split("====\n")
    for text in (plain, types):
        assert "2 alive node(s):" in text
        assert ": 0 CPU + 0 GPU" in text and ": 4 CPU + 1 GPU" in text  # the head and the second node
        verdicts = {
            line.split(" (")[0].split()[-1]: line.split()[0] for line in text.splitlines() if "worker(s) x" in line
        }
        assert len(verdicts) == 7, text
        assert verdicts["experiments/cifar10_robust_l2.yaml"] == "fits" and verdicts["paper/cifar10.yaml"] == "fits"
        assert "no GPU" in text  # the head
        assert "FAIL" in text and "Ray counts a GPU, but torch" in text  # the second node has no CUDA
        assert text.strip().endswith("exit 1")
    # Alive nodes only: the Small ImageNet 150 workers (6 CPUs + 1 GPU) fit no node, and it says why.
    line = next(row for row in plain.splitlines() if "paper/smallimagenet150.yaml" in row)
    assert line.split()[0] == "FITS" and "6 CPU + 1 GPU" in line and "the largest is node" in line, line
    assert line.rstrip().endswith(": 4 CPU + 1 GPU") or ": 4 CPU + 1 GPU +" in line, line
    # The output folder: both nodes share this machine's disk here, so each reads what the other wrote.
    assert "/tmp/ray/shared-out: every node writes there and reads what the others wrote" in types, types
    # With cluster.yaml's node types, gpu_worker (8 CPUs + 1 GPU) would hold them.
    line = next(row for row in types.splitlines() if "paper/smallimagenet150.yaml" in row)
    assert line.split()[0] == "fits" and "node type 'gpu_worker' (not started): 8 CPU + 1 GPU" in line, line
