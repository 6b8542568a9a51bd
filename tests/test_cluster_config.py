"""cluster.yaml and cluster-local.yaml: Ray's own cluster-config schema, token auth, node types that fit
every shipped training config, and the autoscaler starting a GPU node of cluster.yaml for a GPU task."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import run_in_namespaces

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(__import__("ray.autoscaler", fromlist=["x"]).__file__).parent / "ray-schema.json"


def validate(config: dict) -> None:
    """What `ray up` does first: fill in the provider's defaults, then check against ray-schema.json."""
    # Ray's private helpers, the ones `ray up` itself calls: no public API checks a cluster config.
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, json.loads(SCHEMA.read_text()))  # the file as written, before defaults
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_configs_validate(name):
    config = yaml.safe_load((ROOT / name).read_text())
    validate(config)
    for command in config["head_start_ray_commands"]:
        if "ray start --head" in command:
            assert "--dashboard-host=127.0.0.1" in command  # the dashboard stays on the head node
    # Every command is whole shell (YAML ends a plain scalar at " #": a quote cut there breaks it).
    for key in (
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        for command in config.get(key, []):
            check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert check.returncode == 0, f"{name} {key}: {command!r}: {check.stderr}"


def test_cluster_setup_sh_is_whole_shell():
    check = subprocess.run(["bash", "-n", str(ROOT / "cluster-setup.sh")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_the_schema_check_is_real():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_wokers"] = 1  # misspelt key
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    broken = copy.deepcopy(config)
    broken["max_workers"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def node_setup(config: dict) -> dict[str, list[str]]:
    """The setup commands each node type runs, in order, as Ray puts them together: setup_commands,
    then head_setup_commands or worker_setup_commands (a node type's own worker_setup_commands
    replace both)."""
    head = config["setup_commands"] + config.get("head_setup_commands", [])
    workers = config["setup_commands"] + config.get("worker_setup_commands", [])
    types = config.get("available_node_types", {"worker": {}})
    return {
        name: head if name == config.get("head_node_type") else spec.get("worker_setup_commands", workers)
        for name, spec in types.items()
    } | ({"head": head} if "head_node_type" not in config else {})


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_every_node_is_set_up_by_cluster_setup_sh_and_a_gpu_node_checks_its_driver_first(name):
    config = yaml.safe_load((ROOT / name).read_text())
    for node_type, commands in node_setup(config).items():
        gpu = node_type != config.get("head_node_type", "head")
        setup = [i for i, c in enumerate(commands) if "bash ~/robint-ray/cluster-setup.sh" in c]
        assert len(setup) == 1, (node_type, commands)
        assert commands[setup[0]].endswith("cluster-setup.sh gpu" if gpu else "cluster-setup.sh cpu"), node_type
        # nothing installs or downloads before it (the driver check is its first step on a GPU node)
        assert not [c for c in commands[: setup[0]] if re.search(r"pip|uv |curl|s3 sync", c)], node_type
    assert "/home/" not in json.dumps(config)  # every path in the user's home is written ~


def test_cluster_setup_sh_checks_the_driver_before_anything_else(tmp_path):
    """On a GPU node with driver 550 (or none): one line, exit 1, and neither uv nor curl has run."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("curl", "uv"):
        (bin_ / tool).write_text(f"#!/bin/sh\necho {tool} >> {tmp_path}/ran\n")
        (bin_ / tool).chmod(0o755)
    for driver, shown in (("550.54.15", "550.54.15"), (None, "none")):
        smi = bin_ / "nvidia-smi"
        smi.unlink(missing_ok=True)
        if driver:
            smi.write_text(f"#!/bin/sh\necho {driver}\n")
            smi.chmod(0o755)
        env = {"HOME": str(tmp_path), "PATH": f"{bin_}:/usr/bin:/bin"}
        proc = subprocess.run(
            ["bash", str(ROOT / "cluster-setup.sh"), "gpu"], capture_output=True, text=True, env=env, timeout=60
        )
        assert proc.returncode == 1 and proc.stdout == "", proc
        (line,) = proc.stderr.splitlines()
        assert f"NVIDIA driver {shown} < 580: torch 2.14.1 (CUDA 13.0) cannot use the GPU" in line
        assert not (tmp_path / "ran").exists() and not (tmp_path / "robint-venv").exists()


def test_the_lock_pins_every_dependency_at_a_version_pyproject_allows():
    """requirements.lock (make lock) against pyproject.toml, for the nodes' Python 3.11 on x86_64 Linux."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(re.findall(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M))
    lines = [x for x in (ROOT / "requirements.lock").read_text().splitlines() if x and not x.startswith("#")]
    assert len(pins) == len(lines)  # every line an exact pin
    node = {"platform_machine": "x86_64", "sys_platform": "linux", "python_version": "3.11", "extra": "aws"}
    for line in project["dependencies"] + project["optional-dependencies"]["aws"]:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(node):
            assert requirement.name in pins, requirement.name
            assert requirement.specifier.contains(pins[requirement.name]), (line, pins[requirement.name])
    assert pins["torch"] == "2.14.1" and pins["ray"] == "2.60.0" and "boto3" in pins
    assert "nvidia-cudnn-cu13" in pins  # torch's CUDA 13.0 build, as on the GPU nodes
    uv = re.search(r"^UV_VERSION=(\S+)$", (ROOT / "cluster-setup.sh").read_text(), re.M).group(1)
    assert f"uv=={uv}" in project["optional-dependencies"]["test"]  # the uv the tests and `make lock` use
    assert f"UV := uv=={uv}\n" in (ROOT / "Makefile").read_text()  # the uv `make install` installs with


def test_cluster_yaml_names_the_profiles_of_cluster_iam_yaml():
    class Loader(yaml.SafeLoader):  # CloudFormation's short forms (!Ref, !Sub, ...) as plain values
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    template = yaml.load((ROOT / "cluster-iam.yaml").read_text(), Loader=Loader)
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert template["Parameters"]["ClusterName"]["Default"] == config["cluster_name"] == "robint-ray"
    types = config["available_node_types"]
    assert types["head"]["node_config"]["IamInstanceProfile"] == {"Name": "robint-ray-head"}
    assert types["gpu_worker"]["node_config"]["IamInstanceProfile"] == {"Name": "robint-ray-worker"}
    assert "ssm" not in json.dumps(template["Resources"])  # no SSM image left to resolve


CFN_LINT = Path(sys.executable).parent / "cfn-lint"


@pytest.mark.skipif(not CFN_LINT.exists(), reason="cfn-lint is not installed (moto[server] brings it)")
def test_cluster_iam_yaml_passes_cfn_lint():
    proc = subprocess.run([CFN_LINT, ROOT / "cluster-iam.yaml"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _start_commands(config: dict) -> list[str]:
    return [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_every_ray_process_uses_token_auth_and_raised_file_limits(name):
    config = yaml.safe_load((ROOT / name).read_text())
    for command in _start_commands(config):
        assert "RAY_AUTH_MODE=token" in command and "ulimit -n 65536" in command, command
    head = next(c for c in config["head_start_ray_commands"] if "ray start --head" in c)
    assert "--num-cpus=0" in head and "--num-gpus=0" in head  # no tasks beside the driver
    # The token every node authenticates with travels with the file mounts.
    assert any(remote.endswith("/.ray/auth_token") for remote in config["file_mounts"])


def _cluster_of(config: dict):
    """The cluster that cluster.yaml describes before any worker starts: no node alive yet, its node
    types, its overall max_workers."""
    from robint_ray.cluster import Cluster, node_types

    return Cluster(alive=[], types=node_types(config), max_workers=config.get("max_workers"))


def test_every_shipped_training_config_fits_a_node_type_of_cluster_yaml():
    """Read from the files: the node types of cluster.yaml and every config of experiments/ and
    experiments/paper/; all the workers of each config at once must fit the nodes the autoscaler may
    start (`cluster.judge`, the whole job, as robint doctor judges it)."""
    from robint_ray.cluster import Job, judge
    from robint_ray.commands.doctor import shipped_configs

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    shipped = shipped_configs(ROOT / "experiments")
    assert {s.kind for s in shipped} == {"train", "sweep", "study"} and len(shipped) >= 7
    assert any(s.request.cpus == 6 for s in shipped)  # the Small ImageNet 150 configs are among them
    for s in shipped:
        verdict = judge(Job(s.workers, s.request), _cluster_of(config))
        assert verdict.fits == "later", f"{s.path.name}: {verdict.text}"
        assert verdict.holds_at_most >= s.workers
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    assert head == {"CPU": 0, "GPU": 0}


def test_a_4_vcpu_gpu_node_would_not_fit_the_small_imagenet_workers():
    """The check of the test above can fail: g5.xlarge's 4 vCPUs hold no 6-CPU worker."""
    from robint_ray.cluster import Job, judge
    from robint_ray.commands.doctor import shipped_configs

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["resources"] = {"CPU": 4, "GPU": 1}
    failing = [
        s.path.name
        for s in shipped_configs(ROOT / "experiments")
        if judge(Job(s.workers, s.request), _cluster_of(config)).fits is False
    ]
    assert failing == ["smallimagenet150_robust_l2.yaml", "smallimagenet150_standard.yaml", "smallimagenet150.yaml"]


AUTOSCALE = """
import json, subprocess, sys, yaml, ray

# Ray's fake multi-node provider (what ray.cluster_utils.AutoscalingCluster starts, from Ray's docs
# "Testing autoscaling locally"): every node a raylet on this machine, node types as in the config.
config = yaml.safe_load(open(sys.argv[1]))
types, head_type = config["available_node_types"], config["head_node_type"]
head = types[head_type]["resources"]
fake = {"cluster_name": "fake", "max_workers": config["max_workers"], "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0},
            **{name: {"resources": {**spec["resources"], "object_store_memory": 100 * 2**20}, "node_config": {},
                      "min_workers": 0, "max_workers": spec["max_workers"]}
               for name, spec in types.items() if name != head_type}},
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 1, "docker": {}, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}
with open("fake.json", "w") as f:
    json.dump(fake, f)
subprocess.check_call(["ray", "start", "--head", "--autoscaling-config=fake.json", f"--num-cpus={head['CPU']}",
                       f"--num-gpus={head['GPU']}", "--object-store-memory=100000000", "--disable-usage-stats"])
ray.init("auto")
before = ray.cluster_resources().get("GPU", 0)

@ray.remote(num_gpus=1, num_cpus=6)
def where():
    return ray.get_runtime_context().get_node_id()

node = ray.get(where.remote(), timeout=240)
info = next(n for n in ray.nodes() if n["NodeID"] == node)
print(json.dumps({"gpus_before": before, "resources": info["Resources"], "nodes": len(ray.nodes())}))
"""


@pytest.mark.ray
@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare")
def test_the_autoscaler_starts_a_gpu_worker_of_cluster_yaml_for_a_gpu_task(tmp_path):
    """Ray's fake multi-node provider with the node types of cluster.yaml (min_workers 0): a head with
    no GPU, a task that needs 1 GPU and 6 CPUs, and the autoscaler starts a gpu_worker node for it. In
    private network, PID and mount namespaces: AutoscalingCluster runs `ray stop --force`, which there
    stops only its own processes, and all of them end with the namespace."""
    script = tmp_path / "autoscale.py"
    script.write_text(AUTOSCALE)
    shell = (
        f"set -e; ip link set lo up; mkdir -p /tmp/ray && mount -t tmpfs tmpfs /tmp/ray; cd {tmp_path}; "
        f"exec {sys.executable} {script} {ROOT / 'cluster.yaml'}"
    )
    proc = run_in_namespaces(
        shell, tmp_path, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1"
    )
    # the script's one JSON line; Ray's driver may print autoscaler events after it
    result = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith('{"gpus_before"')))
    assert result["gpus_before"] == 0
    assert result["resources"]["GPU"] == 1 and result["resources"]["CPU"] == 8  # gpu_worker's resources
    assert result["nodes"] == 2
