"""Ray Tune sweeps over the PGD budget (eps, step size, steps) and the learning rate; every trial is a
distributed Ray Train run of `robint_ray.train`.

    sweep = load_sweep("experiments/sweep_cifar10_l2.yaml")   # robint_ray.sweep: the schema, no Ray
    rows = run_sweep(sweep, "sweeps/cifar10_l2")          # results.csv, tradeoff.png, best.yaml

This module is the Ray driver; what a sweep file says, a trial's config and the results table (Pareto
front, best trial, best.yaml) are in `robint_ray.sweep`, which does not import Ray.

The Ray Train v2 way of tuning over Train: a Tune *function* trainable per trial (`_run_trial`) builds the
TorchTrainer of `train.make_trainer` and calls fit(); `TuneReportCallback` in the trainer's RunConfig
forwards every per-epoch `ray.train.report` of the training workers to Tune, where ASHA reads
`val_score` = mean(val clean, val PGD accuracy) per `epoch`. The trial itself reserves no CPU: its
training workers ask for their own (workers x cpus_per_worker CPUs, gpus_per_worker GPUs each).
When ASHA stops a trial, Tune kills the trial's actor; the Train controller and workers it owns die
with it (Ray's ownership fate-sharing), and their placement group is removed.

A sweep folder SWEEP_DIR:
    sweep.yaml          the resolved sweep (checked against CONFIG on --resume)
    results.csv         one row per trial: parameters, epochs run, val accuracies, status (kept up to
                        date while the sweep runs)
    tradeoff.png        val clean vs val PGD accuracy per trial, labelled by eps, Pareto front marked
    best.yaml           the base training config with the best trial's parameters (for `robint train`)
    trials/<trial_id>/  each trial's training run folder (config.yaml, metrics.jsonl, best/, ray/ ...)
                        and starts.jsonl (one line each time Tune started the trial)
    tune/               Ray Tune's experiment state (what --resume restores from)

Selection: the best trial is the one with the highest val_score at its best epoch among the trials
that ran all their epochs (ASHA-stopped trials only if none did), never on the test split.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Mapping

from ray.tune import Callback

from .cluster import Job, WorkerRequest, storage_preflight, wait_for_room
from .config import TrainConfig, dump_config
from .distributed import init_ray
from .errors import check
from .storage import Location
from .sweep import (
    Dimension,
    Sweep,
    ValAttackConfig,
    plot_tradeoff,
    trial_config,
    trial_params,
    trial_row,
    write_best_config,
    write_table,
)
from .train import make_trainer, preflight, resolve_paths, sigint_handler_restored

log = logging.getLogger(__name__)

TUNE_NAME = "tune"  # Tune's experiment folder: SWEEP_DIR/tune
METRIC = "val_score"  # mean(val clean, val PGD) accuracy, the paper's selection metric
PLACEMENT_GROUPS = "placement_groups.txt"  # in a trial's folder: its Train worker groups' placement groups
TIME_ATTR = "epoch"  # ASHA's clock: the trial's epoch (survives a restored trial, unlike Tune's iteration count)


class SweepInterrupted(RuntimeError):
    """The sweep stopped (Ctrl-C, SIGUSR1) before every trial ended; `--resume` continues it."""


# --- one trial ------------------------------------------------------------------------------------


def _run_trial(
    params: dict[str, Any],
    *,
    start: dict[str, Any],
    val_attack: dict[str, Any] | None,
    workers: int,
    gpus_per_worker: float,
    trials_dir: str,
) -> None:
    """The Tune function trainable: one distributed training run with the trial's parameters.

    Its training run folder is trials_dir/<trial_id>; a trial restored by `--resume` finds its Ray
    Train run snapshot there and continues after its last finished epoch."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(
        TrainConfig.from_dict(start), params, val_attack=ValAttackConfig(**val_attack) if val_attack else None
    )
    run_dir = Location(trials_dir) / ray.tune.get_context().get_trial_id()
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    _append_line(run_dir / "starts.jsonl", json.dumps({"started": time.time(), "pid": os.getpid(), "params": params}))
    trainer = make_trainer(
        cfg,
        run_dir,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        callbacks=[TuneReportCallback(), _placement_group_recorder(run_dir / PLACEMENT_GROUPS)],
    )
    trainer.fit()


def _append_line(target: Location, line: str) -> None:
    """Add a line to a small file (rewritten whole: object stores cannot append)."""
    target.write_text((target.read_text() if target.exists() else "") + line + "\n")


def _placement_group_recorder(path: Location):
    """A Ray Train callback (run by the Train controller) that appends the id of every worker group's
    placement group to `path`. When ASHA stops a trial, Tune kills the trial's actor and with it the
    controller and the workers it owns; their placement group, though, outlives them until Ray's own
    cleaner (a detached actor that polls the controller through the dashboard's state API, which a local
    Ray of ours serves on 127.0.0.1) sees the controller gone. The sweep driver removes the recorded
    groups itself, at once (`remove_placement_groups`), so that the next trial never waits on that poll."""
    # No public API: ray.train.UserCallback (Ray 2.60) has only after_report and after_exception, no hook
    # when a worker group, and so its placement group, starts. tests/test_tune.py pins the Ray version.
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class RecordPlacementGroup(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group):
            group = worker_group.get_worker_group_state().placement_group_handle.placement_group
            _append_line(path, group.id.hex())

    return RecordPlacementGroup()


def remove_placement_groups(run_dir: Location) -> int:
    """Remove the placement groups recorded in run_dir that still exist; returns how many."""
    from ray import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    path = Location(run_dir) / PLACEMENT_GROUPS
    if not path.is_file():
        return 0
    removed = 0
    table = placement_group_table()
    for hex_id in set(path.read_text().split()):
        if table.get(hex_id, {}).get("state") not in (None, "REMOVED"):
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id))))
            removed += 1
    if removed:
        log.info("removed %d placement group(s) left by trial %s", removed, run_dir.name)
    return removed


# --- the results table, from Tune's trials --------------------------------------------------------


def trial_rows(trials, epochs_planned: int, finished: Mapping[str, str] = {}) -> list[dict[str, Any]]:
    """The rows of Tune's Trial objects; `finished` overrides the status of trials that just ended."""
    return [
        trial_row(
            t.trial_id,
            trial_params(t.config),
            t.last_result,
            epochs_planned=epochs_planned,
            state=finished.get(t.trial_id, t.status),
        )
        for t in trials
    ]


class SweepCallback(Callback):
    """Tune Callback on the driver: keeps results.csv up to date as trials report and end, and removes
    the placement groups of a trial that ended (see _placement_group_recorder). A module-level class:
    Tune pickles it with the experiment and `--resume` unpickles it by reference, so with this code."""

    def __init__(self, table: Location, trials_dir: Location, epochs_planned: int):
        self.table, self.trials_dir, self.epochs_planned = table, trials_dir, epochs_planned

    def on_trial_result(self, iteration, trials, trial, result, **info):
        write_table(self.table, trial_rows(trials, self.epochs_planned))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trials, trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trials, trial, "ERROR")

    def _ended(self, trials, trial, state: str) -> None:
        write_table(self.table, trial_rows(trials, self.epochs_planned, {trial.trial_id: state}))
        remove_placement_groups(self.trials_dir / trial.trial_id)


# --- the driver -----------------------------------------------------------------------------------


def check_resources(sweep: Sweep, *, wait_s: float | None = None) -> None:
    """Wait (up to wait_s: `cluster.wait_for_room`) until the cluster has room for one trial's workers;
    a trial the cluster can never hold, which would leave Tune waiting, is an InputError at once."""

    o = sweep.options
    request = WorkerRequest(cpus=sweep.trial.cpus_per_worker, gpus=o.gpus_per_worker)
    wait_for_room(Job(o.workers, request), timeout_s=wait_s)


def run_sweep(
    sweep: Sweep, sweep_dir: str | Path | Location, *, resume: bool = False, wait_s: float | None = None
) -> list[dict[str, Any]]:
    """Run (or, with resume, continue) the sweep in sweep_dir (a local path or a storage URI; Tune's
    and every trial's files go there too); writes results.csv, tradeoff.png and best.yaml and returns
    the rows of results.csv. Waits up to wait_s for room for one trial (`check_resources`)."""
    sweep_dir = Location(sweep_dir)
    sweep = _prepare(sweep, sweep_dir, resume=resume, wait_s=wait_s)
    tuner = _restored_tuner(sweep, sweep_dir) if resume else _new_tuner(sweep, sweep_dir)
    log.info("sweeping %s into %s", ", ".join(d.name for d in sweep.space), sweep_dir)
    with sigint_handler_restored():  # Tune's handler would outlive the sweep and swallow a later Ctrl-C
        tuner.fit()
    rows = _final_rows(sweep, sweep_dir)
    plot_tradeoff(rows, sweep_dir / "tradeoff.png")
    write_best_config(sweep, rows, sweep_dir)
    return rows


def _prepare(sweep: Sweep, sweep_dir: Location, *, resume: bool, wait_s: float | None = None) -> Sweep:
    """Check, before any trial starts, that sweep_dir holds this sweep (resume) or none, that a trial's
    data and resources are there and that every node can use sweep_dir; start Ray; record sweep.yaml.
    Returns the sweep with its data path made absolute."""
    import yaml
    from ray import tune

    tune_dir, stored = sweep_dir / TUNE_NAME, sweep_dir / "sweep.yaml"
    sweep = replace(sweep, trial=resolve_paths(sweep.trial))
    if resume:
        tune_path, storage_filesystem = tune_dir.for_ray_train()
        check(
            stored.is_file() and tune.Tuner.can_restore(tune_path, storage_filesystem=storage_filesystem),
            f"{sweep_dir}: no sweep to resume (no {stored.name} and Tune state in {tune_dir})",
        )
        check(
            yaml.safe_load(stored.read_text()) == yaml.safe_load(yaml.safe_dump(sweep.to_dict(), sort_keys=False)),
            f"{sweep_dir} holds a different sweep than CONFIG: resume it with the config it started with",
        )
    else:
        check(
            not tune_dir.exists(),
            f"{sweep_dir} already holds a sweep: continue it with --resume, or choose another --out",
        )
    preflight(sweep.trial, sweep.options.workers)
    init_ray()
    check_resources(sweep, wait_s=wait_s)
    storage_preflight(sweep_dir)  # every node can write and read there, before a trial starts
    sweep_dir.mkdir()
    if not resume:
        stored.write_text(yaml.safe_dump(sweep.to_dict(), sort_keys=False))
    return sweep


def _trainable(sweep: Sweep, sweep_dir: Location):
    """_run_trial with the sweep's settings bound, reserving nothing itself."""
    from ray import tune

    o = sweep.options
    return tune.with_resources(
        tune.with_parameters(
            _run_trial,
            start=sweep.trial.to_dict(),
            val_attack=asdict(o.val_pgd) if o.val_pgd else None,
            workers=o.workers,
            gpus_per_worker=o.gpus_per_worker,
            trials_dir=(sweep_dir / "trials").uri,
        ),
        # The trial only waits on its Train controller; the training workers reserve the CPUs and GPUs.
        # Tune refuses an all-zero request, so a trial holds one byte of Ray's `memory` resource.
        {"cpu": 0, "memory": 1},
    )


def _restored_tuner(sweep: Sweep, sweep_dir: Location):
    """The Tuner of an interrupted sweep: its unfinished and errored trials run again, the ended ones not."""
    from ray import tune

    log.info("resuming the sweep in %s", sweep_dir)
    tune_path, storage_filesystem = (sweep_dir / TUNE_NAME).for_ray_train()
    return tune.Tuner.restore(
        tune_path,
        _trainable(sweep, sweep_dir),
        resume_unfinished=True,
        resume_errored=True,
        storage_filesystem=storage_filesystem,
    )


def _new_tuner(sweep: Sweep, sweep_dir: Location):
    """The Tuner of a new sweep: its search space, ASHA, and results.csv kept up to date by SweepCallback."""
    from ray import tune

    o, epochs = sweep.options, sweep.trial.epochs
    storage_path, storage_filesystem = sweep_dir.for_ray_train()
    return tune.Tuner(
        _trainable(sweep, sweep_dir),
        param_space={d.name: _tune_domain(d) for d in sweep.space},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=_asha(sweep),
            search_alg=_search_alg(sweep),
            num_samples=o.num_samples,
            max_concurrent_trials=o.max_concurrent_trials,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name=TUNE_NAME,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            callbacks=[SweepCallback(sweep_dir / "results.csv", sweep_dir / "trials", epochs)],
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=0),
        ),  # Train retries workers
    )


def _tune_domain(dimension: Dimension):
    """A swept parameter as Tune's search space takes it."""
    from ray import tune

    kind, values = dimension.kind, dimension.values
    if kind == "grid":
        return tune.grid_search(list(values))
    if kind == "choice":
        return tune.choice(list(values))
    if kind == "uniform":
        return tune.uniform(*values)
    if kind == "loguniform":
        return tune.loguniform(*values)
    return tune.randint(values[0], values[1] + 1)  # Tune's upper bound is exclusive


def _asha(sweep: Sweep):
    """Tune's ASHAScheduler on the epoch clock (None: no early stopping)."""
    asha, epochs = sweep.options.asha, sweep.trial.epochs
    if asha is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=TIME_ATTR,
        max_t=epochs,
        grace_period=min(asha.grace_period, epochs),
        reduction_factor=asha.reduction_factor,
        brackets=asha.brackets,
    )


def _search_alg(sweep: Sweep):
    """Seeded random draws where the space has any (None: Tune's default, unseeded or all grid)."""
    if sweep.options.seed is None or all(d.kind == "grid" for d in sweep.space):
        return None
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.options.seed)


def _final_rows(sweep: Sweep, sweep_dir: Location) -> list[dict[str, Any]]:
    """results.csv once Tune has returned, sorted by the swept values; the placement groups of trials
    that did not end through the callback (interrupted ones) removed. Raises SweepInterrupted when some
    trial has not ended."""
    from ray import tune

    tune_path, storage_filesystem = (sweep_dir / TUNE_NAME).for_ray_train()
    trials = tune.ExperimentAnalysis(tune_path, storage_filesystem=storage_filesystem).trials
    for trial in trials:
        remove_placement_groups(sweep_dir / "trials" / trial.trial_id)
    rows = sorted(
        trial_rows(trials, sweep.trial.epochs), key=lambda row: [row[d.name] for d in sweep.space] + [row["trial_id"]]
    )
    write_table(sweep_dir / "results.csv", rows)
    ended = [r for r in rows if r["status"] not in ("running", "pending")]
    if len(ended) < sweep.num_trials:  # Tune creates trials lazily: an interrupted sweep may lack some
        raise SweepInterrupted(
            f"the sweep in {sweep_dir} stopped with {len(ended)} of its {sweep.num_trials} trials "
            f"ended; continue it with --resume"
        )
    return rows
