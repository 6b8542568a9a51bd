"""`Study`: runs each stage once (a rerun skips the stages done), holds the two models, writes the report."""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

from ..checkpoint import load_checkpoint
from ..cluster import Job, WorkerRequest, storage_preflight, wait_for_room
from ..config import load_config
from ..data import load_split
from ..distributed import Tasks, default_gpus_per_task, devices_used, init_ray, nodes_used
from ..storage import Location
from . import attributions, evaluation, features, generation, inversion, training
from .config import TASKS_PER_GPU, ModelSource, StudyConfig
from .report import build_report, jsonable, portable

log = logging.getLogger(__name__)

# In the order they run; each module has its stage's NAME, run(study, folder) -> result and
# sections(study, results, paper) -> the report's sections that show it.
STAGES = (training, evaluation, attributions, generation, inversion, features)


class Study:
    def __init__(self, config: StudyConfig, out: str | Path | Location, *, wait_s: float | None = None):
        """wait_s: how long each stage waits for the cluster's room for its Ray tasks or training workers
        (`cluster.wait_for_room`; None: $ROBINT_WAIT_TIMEOUT, else 30 minutes)."""
        self.config, self.out, self.wait_s = config, Location(out), wait_s
        self.timings: dict[str, float] = {}
        self.models: dict[str, Any] = {}
        self._tasks: dict[str, Tasks] = {}

    def run(self) -> Location:
        """Every stage not done yet, then the report; returns OUT/report.html."""
        init_ray()
        storage_preflight(self.out)  # every node can write and read OUT, before anything is trained
        self.out.mkdir()
        # Training writes OUT/train itself (checkpoints and Ray's storage); the others a local folder.
        results = {s.NAME: self.stage(s.NAME, partial(s.run, self), local=s is not training) for s in STAGES}
        nodes = sorted({node for result in results.values() for node in result.get("_nodes", [])})
        return self.report(results, nodes)

    def report(self, results: dict[str, Any], nodes: list[str]) -> Location:
        """OUT/report.html and OUT/report.json from the stages' results; Ray ran their tasks on `nodes`."""
        return build_report(self, results, nodes, STAGES)

    def stage(self, name: str, fn: Callable[[Any], dict[str, Any]], *, local: bool = True) -> dict[str, Any]:
        """Run fn(folder) unless OUT/name/result.json exists; either way return the result. folder: with
        local, a local folder whose files end up in OUT/name (OUT/name itself on a local disk, else a
        temporary folder uploaded when fn returns; paths in the result are rewritten to OUT/name); else
        the Location OUT/name."""
        target = self.out / name
        done = target / "result.json"
        if done.exists():
            log.info("stage %s: done before, skipped", name)
            result = self.result(name)
            self.timings[name] = result.get("_seconds", 0.0)
            return result
        # Training has its own resources (gpus_per_worker); every other stage's Ray tasks ask for
        # what `tasks` says (the stages pass it to their fan-outs).
        gpus = 0.0 if name == training.NAME else self.tasks(name).gpus
        if name != training.NAME:  # (training waits for its own workers)
            task = WorkerRequest(cpus=self.config.cpus_per_task, gpus=gpus)
            wait_for_room(Job(1, task, what=f"{name} task"), timeout_s=self.wait_s)
        log.info("stage %s: starting (Ray tasks: %s GPU and %s CPU each)", name, gpus, self.config.cpus_per_task)
        start = time.perf_counter()
        if local:
            with target.local_dir() as folder:
                result = _relocated(fn(folder), str(folder), target.uri)
        else:
            result = fn(target)
        result["_seconds"] = self.timings[name] = round(time.perf_counter() - start, 2)
        result["_nodes"] = nodes_used()  # Ray nodes that ran this process's fan-out tasks so far
        result["_devices"] = devices_used()
        result["_gpus_per_task"] = gpus
        log.info(
            "stage %s: Ray tasks so far ran on node(s) %s, device(s) %s",
            name,
            ", ".join(n[:8] for n in result["_nodes"]) or "-",
            ", ".join(result["_devices"]) or "-",
        )
        # Paths under OUT as "./...", other local paths relative to OUT: the folder can move (a clone
        # elsewhere resumes it and reads its files), and it names no path of the machine that ran it.
        done.write_text(json.dumps(portable(json.loads(json.dumps(result, default=jsonable)), self.out), indent=2))
        log.info("stage %s: finished in %.1f s", name, result["_seconds"])
        return result

    def tasks(self, stage: str) -> Tasks:
        """Where a stage after training runs its fan-outs: as Ray tasks, `workers` at a time, each with
        cpus_per_task CPUs and the config's gpus_per_task, else on a cluster with GPUs 1 /
        TASKS_PER_GPU[stage] of one (by Ray's resource table: the driver's own CUDA is never asked).
        Decided once per stage."""
        if stage not in self._tasks:
            gpus = self.config.gpus_per_task
            if gpus is None:
                gpus = default_gpus_per_task(None) / TASKS_PER_GPU.get(stage, 1)
            self._tasks[stage] = Tasks(self.config.workers, cpus=self.config.cpus_per_task, gpus=gpus)
        return self._tasks[stage]

    def train_config(self, name: str):
        """The TrainConfig a model trained here follows: its file, the study's data and seed, its `set`."""
        source: ModelSource = getattr(self.config, name)
        cfg = load_config(source.train, {"data.path": self.config.data, "seed": self.config.seed})
        return cfg.override(list(source.set))

    def model(self, name: str):
        """The standard or robust model, from the checkpoint the training stage recorded."""
        if name not in self.models:
            trained = self.result(training.NAME)
            self.models[name] = load_checkpoint(trained[name]["checkpoint"])[0]
        return self.models[name]

    def result(self, name: str) -> dict[str, Any]:
        """OUT/name/result.json with its "./" paths under OUT again (see `stage`)."""
        return _relocated((self.out / name / "result.json").read_json(), HERE, self.out.uri)

    def shown(self, path: str) -> str:
        """A path as the report prints it: relative to OUT, as report.json holds it (see `portable`)."""
        return portable(path, self.out)

    def test_split(self):
        return load_split(self.config.data, "test")


HERE = "."  # how result.json and report.json write OUT itself: its paths are "./train/standard/best", ...


def _relocated(value: Any, local: str, uri: str) -> Any:
    """value with every string that names a path under the local folder `local` renamed under `uri`."""
    if isinstance(value, dict):
        return {k: _relocated(v, local, uri) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_relocated(v, local, uri) for v in value)
    if isinstance(value, str) and (value == local or value.startswith(local + "/")):
        return uri + value[len(local) :]
    return value
