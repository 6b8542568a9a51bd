"""On a cluster with GPUs every stage after training runs its Ray tasks on them, and the driver never
touches CUDA. The GPU is simulated: a local Ray instance started with num_gpus=1 on this CPU machine
(Ray then hands each GPU task CUDA_VISIBLE_DEVICES=0; torch in the worker sees no CUDA device), and
the driver says so with ROBINT_SIMULATED_GPUS=1, so the tasks run on the CPU. What each task asked for
is read back from Ray's state API, not from our code. Without that variable, as in a real run, the same
task fails in one line that names the node, and a command exits 1 with that line.

The driver's torch.cuda lazy initialisation is made to raise, so that any CUDA use in the driver (a
model moved to "cuda", a tensor made there) fails the run; the script checks first that it does.
It runs in a subprocess: its own Ray instance (the session's has no GPU) and its own patched torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.ray

SCRIPT = r'''
import functools, json, sys, time
import robint_ray  # noqa: F401  (first: a loopback-only local Ray instance)
import torch
from torch import nn

# --- the driver must never initialise CUDA -----------------------------------------------------------
class DriverTouchedCUDA(RuntimeError):
    pass


def forbidden(*args, **kwargs):
    raise DriverTouchedCUDA("the driver initialised CUDA")


# torch.cuda._lazy_init is what every CUDA tensor, module.to("cuda") and device query goes through
# (torch's C++ calls this module attribute); it has no public name, so the script checks right here
# that replacing it makes CUDA use in this process fail.
torch.cuda._lazy_init = forbidden
torch.cuda.init = forbidden
try:
    torch.zeros(1, device="cuda")
    live = False
except DriverTouchedCUDA:
    live = True
except (RuntimeError, AssertionError):
    live = False
assert live, "the CUDA guard does not fire: the check could not fail"

import ray
from ray.util.state import list_tasks

from robint_ray import inception
from robint_ray.config import PAPER_PGD
from robint_ray.distributed import init_ray
from robint_ray.models import build_model
from robint_ray.visualize import FEATURE_VIS, GENERATION, INVERSION
from robint_ray.study import (STAGES, AttributionStage, EvalStage, FeatureStage, GenerationStage, InversionStage,
                              ModelSource, Study, StudyConfig)


class StandIn(nn.Module):
    """A cheap stand-in for the FID Inception (same `features(x, dims)`), defined in __main__ so that
    Ray ships it by value."""

    weights_info = {"sha256": "stand-in", "source": "test"}

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.project = nn.Linear(3 * 8 * 8, 2048)

    @torch.no_grad()
    def features(self, x, dims=2048):
        return self.project(nn.functional.adaptive_avg_pool2d(x, 8).flatten(1))[:, :dims]


inception.load_fid_inception = lambda *a, **k: StandIn()

init_ray("local", num_cpus=2, num_gpus=1)
config = StudyConfig(
    data="sample", workers=2, standard=ModelSource(checkpoint="unused"), robust=ModelSource(checkpoint="unused"),
    evaluation=EvalStage(n=8, pgd=PAPER_PGD.given(steps=2), autoattack_n=4, autoattack_version="custom",
                         autoattack_attacks=("apgd-ce",), batch_size=4),
    attributions=AttributionStage(n=2, overlays=1, ig_steps=2, ig_baselines=1, shap_nsamples=2, shap_background=2),
    generation=GenerationStage(per_class=1, pgd=GENERATION[32].given(steps=1), shard_size=5, fid_dims=64,
                               real_per_class=2),
    inversion=InversionStage(runs=1, pgd=INVERSION.given(steps=2)),
    features=FeatureStage(features=((1,),), starts=1, top=2, pgd=FEATURE_VIS.given(steps=2)))
study = Study(config, sys.argv[1])
torch.manual_seed(0)
study.models = {name: build_model("cifar_resnet8").eval() for name in ("standard", "robust")}
results = {s.NAME: study.stage(s.NAME, functools.partial(s.run, study)) for s in STAGES[1:]}  # all but training

# A real run (no ROBINT_SIMULATED_GPUS): a task given the GPU fails, in one line; so does a command.
import contextlib, io, os
from robint_ray.checkpoint import save_checkpoint
from robint_ray.cli import main
from robint_ray.distributed import Tasks, fan_out
from robint_ray.errors import ClusterError

del os.environ["ROBINT_SIMULATED_GPUS"]
try:
    fan_out(torch.neg, [torch.ones(1)], tasks=Tasks(1, cpus=1, gpus=1), progress=False)
    no_cuda = None
except ClusterError as err:
    no_cuda = str(err)
save_checkpoint(sys.argv[1] + "-ckpt", build_model("cifar_resnet8"))
stderr = io.StringIO()
with contextlib.redirect_stderr(stderr):
    code = main(["eval", "--checkpoint", sys.argv[1] + "-ckpt", "--data", "sample", "--n", "4", "--attack", "none",
                 "--workers", "1", "--gpus-per-task", "1"])
cli = {"code": code, "stderr": stderr.getvalue()}
# The state API learns of tasks from events the workers send about every second: ask until it knows of
# the last task, the command's failed evaluation (at most 30 s; the tasks it lists then are checked).
deadline = time.monotonic() + 30
while True:
    tasks = [{"name": t.name, "state": t.state, "required_resources": t.required_resources}
             for t in list_tasks(address=ray.get_runtime_context().gcs_address,
                                 filters=[("type", "=", "NORMAL_TASK")], detail=True, limit=10_000,
                                 raise_on_missing_output=False)]
    if any(t["name"] == "_evaluate_shard" and t["state"] == "FAILED" for t in tasks) or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print("RESULT " + json.dumps({"tasks": tasks, "devices": {k: r["_devices"] for k, r in results.items()},
                              "gpus": {k: r["_gpus_per_task"] for k, r in results.items()},
                              "cuda_initialised": torch.cuda.is_initialized(), "no_cuda": no_cuda, "cli": cli,
                              "node_ip": ray.util.get_node_ip_address()}))
ray.shutdown()
'''


def test_every_stage_asks_for_gpus_and_the_driver_never_touches_cuda(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "", "ROBINT_SIMULATED_GPUS": "1"}
    env.pop("RAY_ADDRESS")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "out")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert not out["cuda_initialised"]
    by_name: dict[str, list] = {}
    for task in out["tasks"]:
        by_name.setdefault(task["name"], []).append(task)
    # One task function per stage: evaluation, attributions, real-data FID, generation + FID, inversion,
    # feature visualisation; every one of their tasks asked for a GPU or a share of one.
    stages = ["_evaluate_shard", "explain_shard", "shard_stats", "generate_shard", "_invert_chunk", "_featvis_chunk"]
    assert set(stages) <= set(by_name), sorted(by_name)
    # One task per GPU where a task runs batches of images; four share one for the single-image
    # inversions and feature visualisations (study.TASKS_PER_GPU).
    share = {"_invert_chunk": 0.25, "_featvis_chunk": 0.25}
    for name in stages:
        for task in by_name[name]:
            assert task["required_resources"].get("GPU") == share.get(name, 1.0), task
    assert out["gpus"] == {
        "evaluation": 1.0,
        "attributions": 1.0,
        "generation": 1.0,
        "inversion": 0.25,
        "features": 0.25,
    }
    # Simulated GPUs: Ray gave each task a GPU id, torch saw no CUDA device there, so the tasks ran on the CPU.
    assert all(devices == ["cpu"] for devices in out["devices"].values()), out["devices"]
    # Not simulated: the task fails in one line naming the node; the command exits 1 with that line.
    assert out["no_cuda"] is not None and "\n" not in out["no_cuda"], out["no_cuda"]
    assert out["no_cuda"].startswith(f"node {out['node_ip']} (id ") and "sees no CUDA device there" in out["no_cuda"]
    said = [
        line for line in out["cli"]["stderr"].splitlines() if line.startswith("robint eval")
    ]  # (not the progress bar)
    assert out["cli"]["code"] == 1 and said == [f"robint eval: {out['no_cuda']}"], out["cli"]
