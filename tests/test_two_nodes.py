"""A two-node Ray cluster whose nodes share no output folder, with an S3-compatible store (moto's server
on 127.0.0.1), all in a private network namespace: the study is submitted with `ray job submit` and
`--out s3://BUCKET/run`, and must leave every output in the bucket; the same study with `--out` a local
path must fail at once. One cluster serves every check (starting it costs a minute on 2 cores).

Each node runs in its own mount namespace with a private empty tmpfs mounted at the same path PRIVATE,
so a file one node writes there is invisible to the other, as on two machines. The head's /tmp/ray is
private too, so `ray start` records its address there for this cluster alone (init_ray finds it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import token_auth_env
from test_study import TINY, smoke_config

ROOT = Path(__file__).resolve().parents[1]

needs_namespaces = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("nsenter") is None or os.geteuid() != 0,
    reason="needs root, unshare and nsenter",
)

# Runs inside `unshare -n`. $CLUSTER_TEMP: this cluster's session files (a short path: Ray's unix sockets
# live there) and the tag its processes are stopped by; $PRIVATE: the folder each node mounts privately;
# $RESULTS: where this script leaves what the test asserts on (the host's disk, seen by every node).
SCRIPT = r"""
set -e
ip link set lo up
# A real multi-node cluster: undo the loopback-only switch robint_ray set in this test process.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 PATH="$BIN:$PATH" PYTHONUNBUFFERED=1
export AWS_ENDPOINT_URL=http://127.0.0.1:9123 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
       AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
unset RAY_ADDRESS
# The script is PID 1 of a private PID namespace (see cluster_run): every process of this cluster,
# Ray's agents and client server included, ends with it. The trap stops them early.
python -m moto.server -H 127.0.0.1 -p 9123 >/dev/null 2>&1 &
MOTO=$!
trap 'kill $MOTO; pkill -9 -f "$CLUSTER_TEMP" >/dev/null 2>&1 || true' EXIT
python - <<'EOF'
import socket, time
deadline = time.monotonic() + 60
while True:
    try:
        socket.create_connection(("127.0.0.1", 9123), timeout=1).close()
        break
    except OSError:
        assert time.monotonic() < deadline, "moto did not start"
        time.sleep(0.2)
from pyarrow import fs
fs.S3FileSystem(endpoint_override="http://127.0.0.1:9123", allow_bucket_creation=True).create_dir("bucket")
EOF
# node NAME COMMAND: a node in its own mount namespace with a private tmpfs at $PRIVATE; a keeper
# process holds the namespace (for nsenter) after `ray start` has returned.
node() {
  unshare -m --propagation private bash -c "set -e; mount -t tmpfs tmpfs '$PRIVATE'; $2; touch '$RESULTS/$1.ready';
                                            exec -a 'keeper $CLUSTER_TEMP' sleep infinity" &
  echo $! > "$RESULTS/$1.pid"
  while [ ! -e "$RESULTS/$1.ready" ]; do kill -0 "$(cat "$RESULTS/$1.pid")"; sleep 0.5; done
}
in_node() { nsenter -t "$(cat "$RESULTS/$1.pid")" -m -- bash -c "$2"; }
# Each node its own temp dir, as on separate machines: sharing one, the two nodes' runtime-env agents
# unpack the job's working_dir into the same folder and delete it under each other's workers. The
# head's is Ray's default folder under RAY_TMPDIR=$CLUSTER_TEMP/head, where ray start records its address.
node head "ray start --head --port=6391 --num-cpus=1 --dashboard-host=127.0.0.1 --dashboard-port=8271 \
  --disable-usage-stats --temp-dir='$CLUSTER_TEMP/head/ray' >/dev/null"
node node2 "ray start --address=127.0.0.1:6391 --num-cpus=1 --disable-usage-stats \
  --temp-dir='$CLUSTER_TEMP/node2' >/dev/null"

# init_ray on the head, with no RAY_ADDRESS: joins the cluster that `ray start` recorded.
in_node head "cd '$ROOT' && RAY_TMPDIR='$CLUSTER_TEMP/head' python - > '$RESULTS/init_ray.json'" <<'EOF'
import json, ray
from robint_ray.distributed import init_ray
from robint_ray.ray_address import joined_cluster
init_ray()
print(json.dumps({"joined": joined_cluster(), "nodes": len([n for n in ray.nodes() if n["Alive"]])}))
EOF

submit() {  # submit OUT LOG [CONFIG]: the study as a Ray job; its exit status and seconds in LOG.status
  local start=$SECONDS rc=0
  ray job submit --address http://127.0.0.1:8271 --working-dir "$ROOT" \
    --runtime-env-json '{"excludes": [".venv", ".git", "runs", "demo_out", "**/__pycache__"]}' \
    -- python -m robint_ray study "${3:-$CONFIG}" --out "$1" > "$RESULTS/$2.log" 2>&1 || rc=$?
  echo "$rc $((SECONDS - start))" > "$RESULTS/$2.status"
}
submit "$PRIVATE/run" local
for n in head node2; do in_node $n "find '$PRIVATE' -mindepth 1 | sort" > "$RESULTS/private-local-$n.txt"; done
submit s3://bucket/run s3
for n in head node2; do in_node $n "find '$PRIVATE' -mindepth 1 | sort" > "$RESULTS/private-s3-$n.txt"; done

# From a third process: the bucket's keys, the report, and robint eval of the robust checkpoint there.
python - <<'EOF'
import json, os
from pyarrow import fs
from robint_ray.storage import Location
s3 = fs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"])
keys = sorted(i.path for i in s3.get_file_info(fs.FileSelector("bucket", recursive=True)) if i.type == fs.FileType.File)
results = os.environ["RESULTS"]
json.dump(keys, open(f"{results}/keys.json", "w"))
Location("s3://bucket/run/report.json").download(f"{results}/report.json")
EOF
(cd "$ROOT" && python -m robint_ray eval --checkpoint s3://bucket/run/train/robust/best --data sample --split test \
  --n "$EVAL_N" --attack none --json "$RESULTS/eval.json" > "$RESULTS/eval.log" 2>&1)

[ -n "$KILL_CONFIG" ] || exit 0
# The same study from the checkpoints just trained (in the bucket), the worker node killed (every
# process of its mount namespace) once generation has begun.
submit s3://bucket/kill kill "$KILL_CONFIG" &
job=$!
python - <<'EOF'
import time
from robint_ray.storage import Location
deadline = time.monotonic() + 1200
while not Location("s3://bucket/kill/attributions/result.json").exists():
    assert time.monotonic() < deadline, "the study did not reach generation"
    time.sleep(0.5)
time.sleep(3)
EOF
ns=$(readlink /proc/"$(cat "$RESULTS/node2.pid")"/ns/mnt)
for p in /proc/[0-9]*; do [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$ns" ] && kill -9 "${p#/proc/}" 2>/dev/null; done
echo killed > "$RESULTS/node2.killed"
wait $job
python - <<'EOF'
import json, os
from robint_ray.storage import Location
bucket = Location("s3://bucket")
same = {}
for model in ("standard", "robust"):
    ours, ref = bucket / "kill" / "generation" / model / "shards", bucket / "run" / "generation" / model / "shards"
    same[model] = [ours.list() == ref.list()] + [(ours / n).read_bytes() == (ref / n).read_bytes() for n in ref.list()]
fid = {run: (bucket / run / "generation" / "result.json").read_json()["fid"] for run in ("run", "kill")}
json.dump({"same_shards": same, "fid": fid}, open(os.environ["RESULTS"] + "/kill.json", "w"))
EOF
"""


# The smoke study smaller still than test_study's TINY: the tests below check where every output lands,
# on which nodes the tasks ran and that `robint eval` of the robust checkpoint agrees with the report, not
# what the models learnt, so each model trains 1 epoch on 128 images (Ray Train's checkpoint of that epoch
# is in the bucket all the same) and the stages after training take a few steps each. Evaluation keeps
# 40 test images: `robint eval` must give the report's clean accuracy on them. Generation keeps 4
# images a class (8 shards a model, so that the slow test's shards can be compared byte for byte), and FID
# the Inception's 64 features (the layers before its first max-pool, half the cost of 192: the real
# test split's 500 images are the stage's largest part).
TRAIN_ONE_EPOCH = "epochs=1, data.train_n=128, data.val_n=32, data.test_n=32"
SIZES = {
    **TINY,
    "epochs=15": TRAIN_ONE_EPOCH,
    "epochs=10": TRAIN_ONE_EPOCH,
    "step_size: 0.1, steps: 20}": "step_size: 0.1, steps: 3}",  # evaluation's PGD
    "autoattack_n: 50": "autoattack_n: 2",
    "n: 24,": "n: 3,",  # attributions: as many as the overlays
    "ig_steps: 32, ig_baselines: 4, shap_nsamples: 64, shap_background: 64": (
        "ig_steps: 8, ig_baselines: 2, shap_nsamples: 16, shap_background: 16"
    ),
    "steps: 300": "steps: 5",
    "steps: 150": "steps: 3",
    "steps: 60": "steps: 2",
    "fid_dims: 2048": "fid_dims: 64",
}


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, request):
    """The script above, once: every test below reads what it left in RESULTS. Where the slow test is
    selected too, the script goes on to kill the worker node in a second study's generation."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    config = smoke_config(tmp, **SIZES)
    kill = any(item.get_closest_marker("slow") and item.module is request.module for item in request.session.items)
    kill_config = tmp / "from_checkpoints.yaml"
    text = config.read_text()
    for name in ("standard", "robust"):
        start = text.index(f"{name}: {{train:")
        text = (
            text[:start]
            + f"{name}: {{checkpoint: s3://bucket/run/train/{name}/best}}"
            + text[text.index("\n", start) :]
        )
    kill_config.write_text(text)
    private, results = tmp / "private", tmp / "results"
    private.mkdir()
    results.mkdir()
    temp = tempfile.mkdtemp(prefix="rt2n", dir="/tmp")
    env = {
        **os.environ,
        **token_auth_env(tmp),
        "CLUSTER_TEMP": temp,
        "PRIVATE": str(private),
        "RESULTS": str(results),
        "ROOT": str(ROOT),
        "CONFIG": str(config),
        "BIN": str(Path(sys.executable).parent),
        "EVAL_N": "40",
        "PYTHONPATH": str(ROOT),
        "KILL_CONFIG": str(kill_config) if kill else "",
    }
    try:
        proc = subprocess.run(
            ["unshare", "--kill-child", "-n", "-p", "-f", "--mount-proc", "bash", "-c", SCRIPT],
            capture_output=True,
            text=True,
            timeout=2400,
            env=env,
        )
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(results.glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    return results


pytestmark = [pytest.mark.ray, needs_namespaces]


def test_init_ray_joins_the_cluster_ray_start_recorded(cluster_run):
    assert json.loads((cluster_run / "init_ray.json").read_text()) == {"joined": True, "nodes": 2}


def test_a_local_out_fails_at_once_with_one_line_and_nothing_trained(cluster_run):
    rc, seconds = map(int, (cluster_run / "local.status").read_text().split())
    log = (cluster_run / "local.log").read_text()
    # `ray job submit` shows the job's output, then its last lines again in the status message.
    errors = sorted({line for line in log.splitlines() if line.startswith("robint study: error:")})
    assert rc != 0 and seconds < 60, (rc, seconds, log[-2000:])
    assert len(errors) == 1 and "cannot read what node" in errors[0] and "do not share" in errors[0], log[-2000:]
    assert "s3://" in errors[0]  # the fix
    for node in ("head", "node2"):  # the check removed its markers; nothing was trained or written
        assert (cluster_run / f"private-local-{node}.txt").read_text() == ""


def test_the_study_on_s3_finishes_with_everything_in_the_bucket(cluster_run):
    rc, seconds = map(int, (cluster_run / "s3.status").read_text().split())
    assert rc == 0, (cluster_run / "s3.log").read_text()[-3000:]
    keys = set(json.loads((cluster_run / "keys.json").read_text()))
    run = "bucket/run"
    for name in (
        "report.json",
        "report.html",
        *[f"{s}/result.json" for s in ("train", "evaluation", "attributions", "generation", "inversion", "features")],
    ):
        assert f"{run}/{name}" in keys, name
    for model in ("standard", "robust"):
        assert {
            f"{run}/train/{model}/best/model.safetensors",
            f"{run}/train/{model}/best/meta.json",
            f"{run}/train/{model}/metrics.jsonl",
            f"{run}/train/{model}/config.yaml",
        } <= keys
        assert any(k.startswith(f"{run}/train/{model}/ray/train/epoch_") for k in keys)  # Ray Train's checkpoints
        assert any(k.startswith(f"{run}/train/{model}/tensorboard/events.") for k in keys)
        # Uploaded when the stage ends: generate() writes shards to the driver's temporary folder, which
        # the tasks on node2 reach here only because both nodes share the host's /tmp (issue 20).
        assert any(k.startswith(f"{run}/generation/{model}/shards/shard-") for k in keys)
    assert not any("/.robint-preflight/" in k for k in keys)
    for node in ("head", "node2"):  # nothing of the run in either node's private folder
        assert (cluster_run / f"private-s3-{node}.txt").read_text() == ""
    report = json.loads((cluster_run / "report.json").read_text())
    assert report["hardware"]["ray_nodes"] == 2
    assert len(report["nodes_used"]) == 2, report["nodes_used"]  # tasks ran on both nodes


def test_robint_eval_of_the_checkpoint_in_the_bucket_gives_the_reports_accuracy(cluster_run):
    report = json.loads((cluster_run / "report.json").read_text())
    ours = json.loads((cluster_run / "eval.json").read_text())
    theirs = report["results"]["evaluation"]["robust"]["pgd"]
    assert ours["n"] == theirs["n"] == 40
    assert ours["clean_accuracy"] == theirs["clean_accuracy"]


@pytest.mark.slow
def test_killing_the_worker_node_in_generation_still_finishes_with_the_same_result(cluster_run):
    """Its tasks rerun on the head (fan_out retries a task lost with its node): the job finishes, and its
    shards are byte for byte those of the uninterrupted run, so its FIDs are too."""
    assert (cluster_run / "node2.killed").exists()
    rc, _ = map(int, (cluster_run / "kill.status").read_text().split())
    assert rc == 0, (cluster_run / "kill.log").read_text()[-3000:]
    result = json.loads((cluster_run / "kill.json").read_text())
    assert all(all(same) and len(same) > 1 for same in result["same_shards"].values()), result
    # The driver adds the shards' float64 statistics in the order their tasks end (memory stays O(d^2)),
    # so a run whose tasks ended in another order agrees to rounding, not bit for bit.
    assert result["fid"]["kill"].keys() == result["fid"]["run"].keys()
    for name, fid in result["fid"]["run"].items():
        assert result["fid"]["kill"][name] == pytest.approx(fid, rel=1e-12), name
