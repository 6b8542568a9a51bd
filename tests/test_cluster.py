"""robint_ray.cluster: the whole job judged against the cluster (alive nodes, and what an autoscaler may
add); a job that never fits fails at once in one line, one that waits for the autoscaler gives up in
one line at its timeout; `robint doctor` on a cluster, on none, and on one whose GPU node never came."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import run_in_namespaces

from robint_ray.cluster import GIB, Cluster, Job, Node, WorkerRequest, judge, node_types, problems, room
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


GPU = {
    "max_workers": 4,
    "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 0, "GPU": 0}, "max_workers": 0},
        "gpu": {"resources": {"CPU": 8, "GPU": 1, "memory": 2**34}, "min_workers": 1, "max_workers": 4},
        "off": {"resources": {"CPU": 64, "GPU": 8}, "max_workers": 0},  # may never start
        "auto": {"max_workers": 1},  # resources detected at start
    },
}
KNOWN = {**GPU, "available_node_types": {k: v for k, v in GPU["available_node_types"].items() if k != "auto"}}


def test_node_types_of_a_cluster_config():
    nodes = {n.name: n for n in node_types(GPU)}
    assert sorted(nodes) == ["auto", "gpu", "head", "off"]
    gpu = nodes["gpu"]
    assert (gpu.cpus, gpu.gpus, gpu.memory, gpu.alive, gpu.min_workers, gpu.max_workers) == (8, 1, 2**34, False, 1, 4)
    assert not nodes["auto"].known and nodes["head"].head and nodes["off"].max_workers == 0


def test_the_whole_job_is_judged_not_one_worker():
    """paper/cifar10.yaml's 4 workers of 1 GPU on one 1-GPU node: once "fitting" (one worker did), now
    not, unless an autoscaler may add nodes; whole workers are packed per node, within max_workers."""
    head, one_gpu = Node("h", 0, 0, head=True), Node("w", cpus=4, gpus=1, memory=15 * GIB)
    job = Job(4, WorkerRequest(cpus=1, gpus=1))
    verdict = judge(job, Cluster([head, one_gpu]))
    assert verdict.fits is False and verdict.text.startswith("4 training worker(s) of 1 CPU + 1 GPU need room for 4")
    assert "the alive nodes hold 1" in verdict.text
    assert judge(Job(1, WorkerRequest(cpus=1, gpus=1)), Cluster([head, one_gpu])).fits is True
    # One worker larger than every node: why, with the largest node.
    verdict = judge(Job(1, WorkerRequest(cpus=6, gpus=1)), Cluster([head, one_gpu]))
    assert verdict.fits is False and verdict.text == (
        "one training worker needs 6 CPU + 1 GPU, which fits no node of the cluster: "
        "the largest is node w: 4 CPU + 1 GPU + 15.0 GiB"
    )
    assert judge(Job(1, WorkerRequest(cpus=1, gpus=1, memory=16 * GIB)), Cluster([head, one_gpu])).fits is False
    # With the autoscaler: gpu nodes (8 CPU + 1 GPU) may be added, 4 at most in all.
    autoscaled = Cluster([head, one_gpu], node_types(GPU), max_workers=4)
    verdict = judge(job, autoscaled)
    assert verdict.fits == "later" and (verdict.holds_now, verdict.holds_at_most) == (1, 5), verdict
    assert judge(Job(6, WorkerRequest(cpus=1, gpus=1)), autoscaled).fits is None  # type 'auto': who knows
    verdict = judge(Job(6, WorkerRequest(cpus=1, gpus=1)), Cluster([head, one_gpu], node_types(KNOWN), max_workers=4))
    assert verdict.fits is False and "the alive nodes hold 1, 5 with the nodes the autoscaler may add" in verdict.text
    # Two alive gpu nodes (by their resources) leave room for two more of that type, within max_workers 3.
    gpu_node = Node("g", cpus=8, gpus=1, memory=2**34)
    three = Cluster([head, gpu_node, gpu_node], node_types(GPU), max_workers=3)
    assert three.alive_of_type() == {"gpu": 2} and room(WorkerRequest(cpus=1, gpus=1), three) == (2, 3)
    assert room(WorkerRequest(cpus=2, gpus=0.25), three) == (8, 12)  # four a GPU, four a node by CPUs
    # The autoscaler's own count wins over resource matching.
    counted = Cluster([head, gpu_node], node_types(GPU), status={"autoscaler_report": {"active_nodes": {"gpu": 4}}})
    assert counted.may_add()["gpu"] == 0
    # A type with unknown resources: not a failure, the verdict is unknown.
    verdict = judge(
        Job(1, WorkerRequest(cpus=100)), Cluster([head], [Node("t", 0, 0, alive=False, known=False, max_workers=1)])
    )
    assert verdict.fits is None and "node type(s) t state no resources" in verdict.text


def _status(failed_type: str | None = None, active: dict | None = None) -> dict:
    """An autoscaler status as Ray's monitor publishes it (its own dataclasses, as asdict), with a failed
    launch of `failed_type` as Ray's AWS node provider reports one."""
    from dataclasses import asdict

    from ray.autoscaler._private.autoscaler import AutoscalerSummary
    from ray.autoscaler._private.node_provider_availability_tracker import NodeProviderAvailabilityTracker
    from ray.autoscaler.node_launch_exception import NodeLaunchException

    tracker = NodeProviderAvailabilityTracker()
    if failed_type:
        error = "You are not authorized to perform this operation. User: arn:aws:sts::1:assumed-role/ray-head\nmore"
        tracker.update_node_availability(
            failed_type, int(time.time()), NodeLaunchException("UnauthorizedOperation", error, None)
        )
    summary = AutoscalerSummary(
        active_nodes=active or {},
        idle_nodes=None,
        pending_nodes=[],
        pending_launches={},
        failed_nodes=[],
        node_availability_summary=tracker.summary(),
    )
    return {"autoscaler_report": asdict(summary)}


def test_problems_of_an_autoscaled_cluster():
    head = Node("h", 0, 0, head=True)
    cluster = Cluster([head], node_types(GPU), 4, _status("gpu", active={"head": 1}))
    assert problems(cluster) == [
        "the autoscaler could not launch node type 'gpu' (UnauthorizedOperation: You are not authorized to "
        "perform this operation. User: arn:aws:sts::1:assumed-role/ray-head)",
        "node type 'gpu' wants min_workers 1, 0 alive",
    ]
    assert problems(Cluster([head, Node("g", 8, 1, 2**34)], node_types(GPU), 4)) == []  # matched by resources
    error = "The autoscaler failed with the following error:\nboto3 said no\ntraceback"  # as Ray's monitor puts it
    assert problems(Cluster([head], node_types(GPU), 4, {"error": error}))[0] == "the autoscaler failed: boto3 said no"


def test_the_local_providers_one_type_is_the_heads_and_the_workers():
    """cluster-local.yaml as `ray up` fills it in (Ray's prepare_local): one node type, the head's, with
    the workers' bounds and no stated resources; the autoscaler counts the head under it too."""
    local = {
        "max_workers": 1,
        "head_node_type": "local.cluster.node",
        "available_node_types": {
            "local.cluster.node": {"node_config": {}, "resources": {}, "min_workers": 1, "max_workers": 1}
        },
    }
    alive = [Node("h", 2, 0, head=True), Node("w", 2, 0)]
    up = Cluster(alive, node_types(local), 1, {"autoscaler_report": {"active_nodes": {"local.cluster.node": 2}}})
    assert up.alive_of_type() == {"local.cluster.node": 1} and problems(up) == []
    assert judge(Job(1, WorkerRequest(cpus=1, gpus=1)), up).fits is None  # who knows what the workers have
    assert judge(Job(2, WorkerRequest(cpus=1)), up).fits is True
    down = Cluster(alive[:1], node_types(local), 1, {"autoscaler_report": {"active_nodes": {"local.cluster.node": 1}}})
    assert problems(down) == ["node type 'local.cluster.node' wants min_workers 1, 0 alive"]


@pytest.fixture
def autoscaled(tmp_path, monkeypatch):
    """This process as if it had joined a cluster whose autoscaler (~/ray_bootstrap_config.yaml) may add
    a GPU node type that never starts: the session's Ray (2 CPUs, no GPU) stands for the cluster. The
    requests to the autoscaler are recorded."""
    from robint_ray import cluster, ray_address

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(KNOWN))
    monkeypatch.setattr(ray_address, "_JOINED", True)
    asked = []
    monkeypatch.setattr(cluster, "_ask_autoscaler", asked.append)
    return asked


@pytest.mark.ray
def test_a_job_larger_than_the_cluster_fails_at_once(ray_local, tmp_path, monkeypatch, run_cli):
    """A private local Ray: nothing is added to it, so a job it cannot hold fails at once in one line
    (exit status 2), nothing written."""
    from robint_ray.train import run

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/ray_bootstrap_config.yaml of this machine
    cpus = ray_local.cluster_resources()["CPU"]
    with pytest.raises(InputError) as err:
        run(tiny(cpus_per_worker=int(cpus) + 1), tmp_path / "run", workers=1)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"one training worker needs {int(cpus) + 1} CPU + 0 GPU")
    assert "the largest is node " in message and f": {cpus:g} CPU + 0 GPU" in message
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
    config = tmp_path / "tiny.yaml"
    config.write_text("arch: cifar_resnet8\nepochs: 1\nbatch_size: 64\ndata: {path: sample, val_fraction: 0.2}\n")
    for extra, text in [
        (["--gpus-per-worker", "1"], "needs 1 CPU + 1 GPU, which fits no node"),
        (["--workers", str(2 * int(cpus))], f"need room for {2 * int(cpus)}, the alive nodes hold {cpus:g}"),
    ]:
        code, _, err = run_cli(["train", config, "--out", tmp_path / "cli", *extra])
        assert code == 2 and len(err.strip().splitlines()) == 1 and text in err, err
    assert not (tmp_path / "cli").exists()


@pytest.mark.ray
@pytest.mark.parametrize("joined", [False, True], ids=["private Ray", "cluster from ray start"])
def test_train_and_tune_fail_alike_on_a_job_the_cluster_cannot_hold(ray_local, tmp_path, monkeypatch, run_cli, joined):
    """`robint train` and `robint tune` take the same check (cluster.wait_for_room), on a private Ray and
    on a cluster joined from `ray start` (no autoscaler config): a worker group the cluster cannot hold
    fails both at once with the same line, exit status 2, nothing written."""
    from robint_ray import ray_address

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/ray_bootstrap_config.yaml of this machine
    monkeypatch.setattr(ray_address, "_JOINED", joined)
    workers = 2 * int(ray_local.cluster_resources()["CPU"])
    config = tmp_path / "tiny.yaml"
    config.write_text("arch: cifar_resnet8\nepochs: 1\nbatch_size: 64\ndata: {path: sample, val_fraction: 0.2}\n")
    smoke = ROOT / "experiments" / "smoke" / "sweep_cifar10_l2.yaml"
    sweep = yaml.safe_load(smoke.read_text())
    sweep.update(base=str(smoke.parent / sweep["base"]), workers=workers)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    said = {}
    for command, argv in [
        ("train", ["train", config, "--out", tmp_path / "train", "--workers", workers]),
        ("tune", ["tune", tmp_path / "sweep.yaml", "--out", tmp_path / "tune"]),
    ]:
        code, _, err = run_cli(argv)
        (line,) = [line for line in err.splitlines() if line.startswith(f"robint {command}: ")]
        assert code == 2, err
        said[command] = line.removeprefix(f"robint {command}: ")
        assert not (tmp_path / command).exists()
    assert said["train"] == said["tune"], said
    assert f"{workers} training worker(s) of 1 CPU + 0 GPU need room for {workers}" in said["train"], said


@pytest.mark.ray
def test_training_waits_for_the_autoscaler_then_gives_up_in_one_line(ray_local, tmp_path, autoscaled, run_cli):
    """Joined to a cluster whose autoscaler may add a GPU node: `robint train --gpus-per-worker 1` asks it
    for the node, says what it waits for, and gives up at --wait-timeout in one line, exit status 1,
    the request withdrawn; a job no node type can hold still fails at once."""
    config = tmp_path / "tiny.yaml"
    config.write_text("arch: cifar_resnet8\nepochs: 1\nbatch_size: 64\ndata: {path: sample, val_fraction: 0.2}\n")
    started = time.monotonic()
    argv = ["train", config, "--out", tmp_path / "run", "--gpus-per-worker", "1", "--wait-timeout", "2"]
    code, _, err = run_cli(argv)
    assert code == 1 and 2 <= time.monotonic() - started < 30, err
    (line,) = [line for line in err.splitlines() if line.startswith("robint train:")]
    assert line.startswith("robint train: gave up after 2 s waiting for room for 1 training worker(s) of 1 CPU + 1 GPU")
    assert "4 x 'gpu'" in line, line
    assert "node type 'gpu' wants min_workers 1, 0 alive" in line
    assert "ray status" in line and "rerun the same command" in line
    assert autoscaled == [[{"CPU": 1, "GPU": 1}], []]
    code, _, err = run_cli(
        ["train", config, "--out", tmp_path / "run", "--gpus-per-worker", "2", "--wait-timeout", "60"]
    )
    assert code == 2 and "the largest is node type 'gpu' (not started): 8 CPU + 1 GPU" in err


@pytest.mark.ray
def test_a_study_waiting_for_a_gpu_node_that_never_comes_gives_up_and_resumes(
    ray_local, tmp_path, autoscaled, run_cli, monkeypatch, caplog
):
    """Models from checkpoints, one GPU per Ray task: training is done at once, evaluation waits for a
    GPU node that never starts and gives up at $ROBINT_WAIT_TIMEOUT in one line; what was done is kept
    (a rerun skips training)."""
    from robint_ray.checkpoint import save_checkpoint
    from robint_ray.models import build_model

    checkpoint = save_checkpoint(tmp_path / "ckpt", build_model("cifar_resnet8"))
    config = tmp_path / "study.yaml"
    config.write_text(
        f"data: sample\nworkers: 1\ngpus_per_task: 1\nstandard: {{checkpoint: {checkpoint}}}\n"
        f"robust: {{checkpoint: {checkpoint}}}\n"
        "evaluation: {n: 8, pgd: {norm: l2, eps: 0.5, step_size: 0.1, steps: 2}, autoattack_n: 0}\n"
    )
    monkeypatch.setenv("ROBINT_WAIT_TIMEOUT", "3")
    caplog.set_level(logging.INFO, logger="robint_ray")
    for attempt in range(2):
        started = time.monotonic()
        code, stdout, err = run_cli(["study", config, "--out", tmp_path / "out"])
        assert code == 1 and 3 <= time.monotonic() - started < 30 and stdout == "", err
        (line,) = [line for line in err.splitlines() if line.startswith("robint study:")]
        assert line.startswith("robint study: gave up after 3 s waiting for room for 1 evaluation task(s) of 1 CPU")
        assert (tmp_path / "out" / "train" / "result.json").is_file()
        assert not (tmp_path / "out" / "evaluation").exists()
    assert "stage train: done before, skipped" in caplog.text


@pytest.mark.ray
def test_doctor_on_a_cluster_whose_gpu_node_type_never_started(ray_local, tmp_path, monkeypatch, run_cli):
    """The cluster config's GPU node type wants one node (min_workers 1), none is alive: not ready, exit
    status 1, the verdict one line that says where to look; an autoscaler error it published, too."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(KNOWN))
    argv = ["doctor", "--cluster-config", config, "--experiments", ROOT / "experiments", "--timeout", "30"]
    code, out, _ = run_cli(argv)
    assert code == 1, out
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("verdict: not ready: node type 'gpu' wants min_workers 1, 0 alive"), out
    assert verdict.endswith("see `ray status -v` and /tmp/ray/session_latest/logs/monitor.* on the head"), out
    assert "  FAIL         node type 'gpu' wants min_workers 1, 0 alive" in out
    # paper/cifar10.yaml: 4 workers of 1 GPU do not fit the alive node, but 4 gpu nodes may be added
    line = next(row for row in out.splitlines() if "paper/cifar10.yaml" in row)
    assert line.split()[:2] == ["fits", "later"] and "4 x 'gpu'" in line, line
    try:  # Ray's monitor publishes a fatal error under this key (ray status reads it the same way)
        _internal_kv_put(
            ray_constants.DEBUG_AUTOSCALING_ERROR,
            "The autoscaler failed with the following error:\nUnauthorizedOperation: not allowed\nTraceback",
        )
        code, out, _ = run_cli(argv)
    finally:
        _internal_kv_del(ray_constants.DEBUG_AUTOSCALING_ERROR)
    assert code == 1 and out.strip().splitlines()[-1].startswith(
        "verdict: not ready: the autoscaler failed: UnauthorizedOperation: not allowed (and 1 more problem(s) above);"
    ), out


@pytest.mark.parametrize("where", ["nothing recorded", "a stale address", "--address"])
def test_doctor_where_no_cluster_answers_says_so_in_one_line(where, tmp_path):
    """No cluster started, or the address `ray start` recorded in /tmp/ray of a cluster that has stopped
    (here: a port nothing listens on), or an --address of none: one line, exit status 1, within 30 s
    (ray.init sat there for over 10 minutes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    args = ["--address", closed] if where == "--address" else []
    if where == "a stale address":
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(closed + "\n")
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "robint_ray", "doctor", *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and time.monotonic() - started < 30 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    expected = {
        "nothing recorded": f"robint doctor: no Ray cluster is running here (none recorded in {tmp_path}/ray/",
        "a stale address": f"robint doctor: the Ray cluster recorded in {tmp_path}/ray/ray_current_cluster ({closed}) "
        "does not answer: it has stopped",
        "--address": f"robint doctor: no Ray cluster answers at {closed}",
    }[where]
    assert line.startswith(expected), line


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
doctor() {  # doctor FILE ARGS...: its output and exit status in FILE (its stderr on ours where it fails)
  python -m robint_ray doctor "${@:2}" > "$1" 2> "$1.err" && echo "exit 0" >> "$1" ||
    { echo "exit $?" >> "$1"; cat "$1.err" >&2; }
}
# The two at once (they read the cluster and write nothing the other reads; their CUDA tasks take
# node2's GPU in turn): each starts a Python process that imports torch and Ray, seconds on 2 cores.
doctor /tmp/ray/plain.txt --address 127.0.0.1:6393 --timeout 60 &
doctor /tmp/ray/types.txt --address 127.0.0.1:6393 --cluster-config cluster.yaml --timeout 60 \
  --out /tmp/ray/shared-out &
wait
cat /tmp/ray/plain.txt; echo ====; cat /tmp/ray/types.txt
"""


@pytest.mark.ray
@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare")
def test_doctor_on_a_two_node_cluster(tmp_path):
    """`robint doctor` on a simulated two-node cluster (private network, PID and mount namespaces: every
    Ray process ends with them): every node, a verdict per shipped config as a whole job (all its workers
    at once), the configs that need more than the alive nodes fitting only once cluster.yaml's node types
    are known, its GPU node type that did not start, CUDA failing on the node that claims a GPU."""
    proc = run_in_namespaces(DOCTOR, tmp_path, ROOT=str(ROOT))
    plain, types = proc.stdout.split("====\n")
    verdicts = {}
    for name, text in (("plain", plain), ("types", types)):
        assert "2 alive node(s):" in text
        assert ": 0 CPU + 0 GPU" in text and ": 4 CPU + 1 GPU" in text  # the head and the second node
        rows = {line.split(" (")[0].split()[-1]: line for line in text.splitlines() if "worker(s) x" in line}
        assert len(rows) == 7, text
        verdicts[name] = rows
        assert rows["experiments/cifar10_robust_l2.yaml"].split()[0] == "fits"  # one worker, one GPU: node2
        assert "no GPU" in text  # the head
        assert "FAIL" in text and "Ray counts a GPU, but torch" in text  # the second node has no CUDA
        assert text.strip().endswith("exit 1") and "verdict: not ready: " in text
    # Alive nodes only: the paper's CIFAR-10 study (4 workers of 1 GPU) needs 4 GPUs, the cluster has 1;
    # the Small ImageNet 150 workers (6 CPUs + 1 GPU) fit no node, and it says why.
    line = verdicts["plain"]["paper/cifar10.yaml"]
    assert line.split()[:2] == ["NO", "ROOM"] and "need room for 4, the alive nodes hold 1" in line, line
    line = verdicts["plain"]["paper/smallimagenet150.yaml"]
    assert line.split()[:2] == ["NO", "ROOM"] and "6 CPU + 1 GPU, which fits no node" in line, line
    assert "the largest is node" in line and (line.rstrip().endswith(": 4 CPU + 1 GPU") or ": 4 CPU + 1 GPU +" in line)
    # The output folder: both nodes share this machine's disk here, so each reads what the other wrote.
    assert "/tmp/ray/shared-out: every node writes there and reads what the others wrote" in types, types
    # With cluster.yaml's node types, gpu_worker nodes (8 CPUs + 1 GPU) would hold both, once started.
    for config in ("paper/cifar10.yaml", "paper/smallimagenet150.yaml"):
        line = verdicts["types"][config]
        assert line.split()[:2] == ["fits", "later"] and "x 'gpu_worker'" in line, line
    # cluster.yaml's GPU node type wants min_workers alive; none is (node2 is not of it): not ready.
    wanted = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]["gpu_worker"]["min_workers"]
    if wanted:
        problem = f"node type 'gpu_worker' wants min_workers {wanted}, 0 alive"
        assert f"  FAIL         {problem}" in types and f"verdict: not ready: {problem}" in types, types
