"""Ray Tune sweeps over the PGD budget (eps, step size, steps) and the learning rate; every trial is a
distributed Ray Train run of `robint_ray.train`.

    sweep = load_sweep("experiments/sweep_cifar10_l2.yaml")
    rows = run_sweep(sweep, "sweeps/cifar10_l2")          # results.csv, tradeoff.png, best.yaml

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

import csv
import io
import itertools
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Mapping

from ray.tune import Callback

from .config import TrainConfig, _build, apply_overrides, dump_config
from .errors import InputError, check
from .storage import Location

log = logging.getLogger(__name__)

TUNE_NAME = "tune"  # Tune's experiment folder: SWEEP_DIR/tune
METRIC = "val_score"  # mean(val clean, val PGD) accuracy, the paper's selection metric
PLACEMENT_GROUPS = "placement_groups.txt"  # in a trial's folder: its Train worker groups' placement groups
TIME_ATTR = "epoch"  # ASHA's clock: the trial's epoch (survives a restored trial, unlike Tune's iteration count)

# The sweepable parameters and their type. pgd.step_rel sets pgd.step_size = step_rel * eps / steps
# (the paper's CIFAR-10 choice, 0.1 for eps 0.5 in 20 steps, is step_rel 4; Madry et al. use 2.5).
PARAMETERS: dict[str, type] = {"pgd.eps": float, "pgd.step_size": float, "pgd.step_rel": float, "pgd.steps": int,
                               "optim.lr": float}
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class SweepInterrupted(RuntimeError):
    """The sweep stopped (Ctrl-C, SIGUSR1) before every trial ended; `--resume` continues it."""


# --- the sweep configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """One swept parameter. grid: every value (Tune's grid_search); choice: one value drawn per sample;
    uniform / loguniform: a float drawn in [low, high]; randint: an integer in [low, high]."""

    name: str
    kind: Literal["grid", "choice", "uniform", "loguniform", "randint"]
    values: tuple  # the grid or choice values, or (low, high)

    def corners(self) -> tuple:
        """The values to check the configs at: every grid / choice value, or both bounds."""
        return self.values

    def to_tune(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper bound is exclusive


@dataclass(frozen=True)
class ASHAConfig:
    """Asynchronous successive halving on val_score, with the epoch as its clock: a trial is compared
    with the others at epochs grace_period * reduction_factor**k and goes on only in the top
    1/reduction_factor. max_t is the trials' epochs."""

    grace_period: int = 1  # epochs every trial trains before it can be stopped
    reduction_factor: float = 2
    brackets: int = 1

    def __post_init__(self):
        check(self.grace_period >= 1, f"asha.grace_period must be >= 1, got {self.grace_period}")
        check(self.reduction_factor > 1, f"asha.reduction_factor must be > 1, got {self.reduction_factor}")
        check(self.brackets >= 1, f"asha.brackets must be >= 1, got {self.brackets}")


@dataclass(frozen=True)
class ValAttackConfig:
    """A cheaper per-epoch validation PGD for the sweep: the trial's norm and eps, `steps` steps of
    step_rel * eps / steps, no random start. None (the default) validates with the training attack."""

    steps: int = 10
    step_rel: float = 2.5

    def __post_init__(self):
        check(self.steps >= 1, f"val_pgd.steps must be >= 1, got {self.steps}")
        check(self.step_rel > 0 and math.isfinite(self.step_rel), f"val_pgd.step_rel must be > 0, got {self.step_rel}")


@dataclass(frozen=True)
class SweepOptions:
    """The scalar settings of a sweep file (everything but base, overrides and space)."""

    search: Literal["grid", "random"] = "grid"  # documents the intent; checked against the space's kinds
    num_samples: int = 1  # random: trials drawn; grid: repeats of the whole grid
    seed: int | None = 0  # of the random draws (None: unseeded)
    workers: int = 1  # Ray Train workers per trial
    gpus_per_worker: float = 0
    max_concurrent_trials: int | None = None  # None: as many as the cluster's resources allow
    asha: ASHAConfig | None = field(default_factory=ASHAConfig)  # null: no early stopping
    val_pgd: ValAttackConfig | None = None

    def __post_init__(self):
        check(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}")
        check(self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        check(self.gpus_per_worker >= 0, f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        check(self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
              f"max_concurrent_trials must be >= 1 or null, got {self.max_concurrent_trials}")


@dataclass(frozen=True)
class Sweep:
    base: TrainConfig  # the training config that best.yaml starts from
    trial: TrainConfig  # what every trial starts from: base + overrides, test split never touched
    space: tuple[Dimension, ...]
    options: SweepOptions

    @property
    def num_trials(self) -> int:
        """Tune's count: every grid combination, num_samples times (ranges drawn once per trial)."""
        return self.options.num_samples * math.prod(len(d.values) for d in self.space if d.kind == "grid")

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base.to_dict(), "trial": self.trial.to_dict(),
                "space": {d.name: {d.kind: list(d.values)} for d in self.space}, **asdict(self.options)}


def _dimension(name: str, spec: Any) -> Dimension:
    check(name in PARAMETERS, f"unknown sweep parameter '{name}'; sweepable: {', '.join(PARAMETERS)}")
    kind_of = PARAMETERS[name]
    if isinstance(spec, list):
        spec = {"grid": spec}
    check(isinstance(spec, Mapping) and len(spec) == 1,
          f"space.{name}: give a list of values (a grid) or one of {', '.join(f'{{{k}: ...}}' for k in KINDS)}; got {spec!r}")
    ((kind, values),) = spec.items()
    check(kind in KINDS, f"space.{name}: unknown search kind '{kind}'; known: {', '.join(KINDS)}")
    check(isinstance(values, list), f"space.{name}.{kind} must be a list, got {values!r}")
    check(len(values) > 0, f"space.{name}: empty {kind} (give at least one value)")

    def number(v):
        if kind_of is int or kind == "randint":
            check(isinstance(v, int) and not isinstance(v, bool), f"space.{name}: {v!r} is not an integer")
            return v
        if isinstance(v, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        check(isinstance(v, (int, float)) and not isinstance(v, bool), f"space.{name}: {v!r} is not a number")
        return float(v)

    values = tuple(number(v) for v in values)
    if kind in ("uniform", "loguniform", "randint"):
        check(len(values) == 2 and values[0] <= values[1], f"space.{name}.{kind} takes [low, high] with low <= high, "
                                                             f"got {list(values)}")
        check(kind != "loguniform" or values[0] > 0, f"space.{name}.loguniform needs low > 0, got {values[0]}")
    check(kind != "randint" or kind_of is int, f"space.{name}: randint is for integer parameters (pgd.steps)")
    if name in ("pgd.eps", "pgd.step_size", "pgd.step_rel", "optim.lr"):
        bad = [v for v in values if not (v > 0 and math.isfinite(v))]
        if bad:
            raise InputError(f"space.{name} must be > 0, got {bad[0]}")
    if name == "pgd.steps":
        check(min(values) >= 1, f"space.pgd.steps must be >= 1, got {min(values)}")
    return Dimension(name, kind, values)


def trial_config(start: TrainConfig, params: Mapping[str, Any], *,
                 val_attack: ValAttackConfig | None = None) -> TrainConfig:
    """The training config of one trial: `start` with the swept params set (pgd.step_rel resolved to
    pgd.step_size = step_rel * eps / steps), and val_pgd the cheaper validation attack if given (at the
    trial's norm and eps; else start's val_pgd stays)."""
    sets = {k: v for k, v in params.items() if k != "pgd.step_rel"}
    check(all(k in PARAMETERS for k in params), f"unknown sweep parameters {sorted(set(params) - set(PARAMETERS))}")
    cfg = start.override(sets)
    if "pgd.step_rel" in params:
        cfg = cfg.override({"pgd.step_size": params["pgd.step_rel"] * cfg.pgd.eps / cfg.pgd.steps})
    if val_attack is None:
        return cfg
    return cfg.override({"val_pgd": {**asdict(cfg.pgd), "steps": val_attack.steps, "random_start": False,
                                     "step_size": val_attack.step_rel * cfg.pgd.eps / val_attack.steps}})


def parse_sweep(data: Mapping[str, Any], *, root: Path = Path(".")) -> Sweep:
    """A Sweep from the mapping of a sweep file; `base` as a path is read relative to `root`."""
    from .config import load_config

    check(isinstance(data, Mapping), "a sweep file must be a mapping of keys to values")
    data = dict(data)
    check("base" in data, "the sweep has no 'base' (a training config file or an inline mapping)")
    check("space" in data, "the sweep has no 'space' (the parameters to sweep)")
    base_spec, space, overrides = data.pop("base"), data.pop("space"), data.pop("overrides", None) or {}
    if isinstance(base_spec, str):
        path = Path(base_spec)
        base = load_config(path if path.is_absolute() else root / path)
    else:
        check(isinstance(base_spec, Mapping), f"'base' must be a config path or a mapping, got {base_spec!r}")
        base = TrainConfig.from_dict(base_spec)
    check(isinstance(overrides, Mapping), f"'overrides' must be a mapping of dotted keys to values, got {overrides!r}")
    try:
        trial = TrainConfig.from_dict(apply_overrides(base.to_dict(), overrides))
    except InputError as err:
        raise InputError(f"overrides: {err}") from err
    trial = trial.override({"test": False})  # a sweep selects on validation; the test split waits for best.yaml
    options: SweepOptions = _build(SweepOptions, data, "")

    check(isinstance(space, Mapping) and len(space) > 0, "'space' must map at least one parameter to its values")
    dims = tuple(_dimension(str(name), spec) for name, spec in space.items())
    names = [d.name for d in dims]
    check(not {"pgd.step_size", "pgd.step_rel"} <= set(names),
          "sweep either pgd.step_size (absolute) or pgd.step_rel (relative to eps), not both")
    random = [d.name for d in dims if d.kind != "grid"]
    if options.search == "grid":
        check(not random, f"search: grid, but {', '.join(random)} {'is' if len(random) == 1 else 'are'} drawn at random "
                          f"(give lists, or search: random)")
    # Every combination of the grid values and the bounds of the ranges must make a valid training
    # config (e.g. an absolute step_size that is not smaller than an eps is allowed, but eps <= 0 is not).
    for values in itertools.product(*(d.corners() for d in dims)):
        params = dict(zip(names, values))
        try:
            trial_config(trial, params, val_attack=options.val_pgd)
        except InputError as err:
            raise InputError(f"trial {params}: {err}") from err
    return Sweep(base=base, trial=trial, space=dims, options=options)


def load_sweep(path: str | Path) -> Sweep:
    """The Sweep of a YAML sweep file (an unknown key, parameter or search kind is an error naming it)."""
    from .config import read_yaml

    path = Path(path)
    data = read_yaml(path, "sweep file")
    try:
        return parse_sweep(data, root=path.parent)
    except InputError as err:
        raise InputError(f"{path}: {err}") from err


# --- one trial -----------------------------------------------------------------------------------


def _run_trial(params: dict[str, Any], *, start: dict[str, Any], val_attack: dict[str, Any] | None, workers: int,
               gpus_per_worker: float, trials_dir: str) -> None:
    """The Tune function trainable: one distributed training run with the trial's parameters.

    Its training run folder is trials_dir/<trial_id>; a trial restored by `--resume` finds its Ray
    Train run snapshot there and continues after its last finished epoch."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import make_trainer

    cfg = trial_config(TrainConfig.from_dict(start), params,
                       val_attack=ValAttackConfig(**val_attack) if val_attack else None)
    run_dir = Location(trials_dir) / ray.tune.get_context().get_trial_id()
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    _append_line(run_dir / "starts.jsonl", json.dumps({"started": time.time(), "pid": os.getpid(), "params": params}))
    trainer = make_trainer(cfg, run_dir, workers=workers, gpus_per_worker=gpus_per_worker,
                           callbacks=[TuneReportCallback(), _placement_group_recorder(run_dir / PLACEMENT_GROUPS)])
    trainer.fit()


def _append_line(target: Location, line: str) -> None:
    """Add a line to a small file (rewritten whole: object stores cannot append)."""
    target.write_text((target.read_text() if target.exists() else "") + line + "\n")


def _placement_group_recorder(path: Location):
    """A Ray Train callback (run by the Train controller) that appends the id of every worker group's
    placement group to `path`. When ASHA stops a trial, Tune kills the trial's actor and with it the
    controller and the workers it owns; their placement group, though, lives as long as the job and
    Ray's own cleaner for it needs the dashboard's state API (absent from our local Ray), so the sweep
    driver removes the recorded groups itself (`remove_placement_groups`)."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class RecordPlacementGroup(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group):
            group = worker_group.get_worker_group_state().placement_group_handle.placement_group
            _append_line(path, group.id.hex())

    return RecordPlacementGroup()


def remove_placement_groups(run_dir: Location) -> int:
    """Remove the placement groups recorded in run_dir that still exist; returns how many."""
    from ray._raylet import PlacementGroupID
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


# --- the results table ---------------------------------------------------------------------------

def trial_row(trial_id: str, params: Mapping[str, Any], metrics: Mapping[str, Any] | None, *, epochs_planned: int,
              state: str) -> dict[str, Any]:
    """One row of results.csv; state is Tune's trial status (TERMINATED, ERROR, RUNNING, PENDING, ...).
    status: completed (all epochs), stopped_early (by ASHA), error, or while the sweep runs (or after an
    interruption) running / pending. The accuracies are the last epoch's."""
    metrics = metrics or {}
    epochs = int(metrics.get("epoch", 0))
    if state == "TERMINATED":
        status = "completed" if epochs >= epochs_planned else "stopped_early"
    elif state == "ERROR":
        status = "error"
    else:
        status = "running" if state == "RUNNING" else "pending"
    return {**{name: params.get(name) for name in sorted(params)}, "epochs": epochs, "epochs_planned": epochs_planned,
            **{k: metrics.get(k) for k in ("val_clean_accuracy", "val_adversarial_accuracy", "val_score",
                                           "best_epoch", "best_val_score")},
            "status": status, "trial_id": trial_id}


def trial_rows(trials, epochs_planned: int, finished: Mapping[str, str] = {}) -> list[dict[str, Any]]:
    """The rows of Tune's Trial objects; `finished` overrides the status of trials that just ended."""
    return [trial_row(t.trial_id, _params(t.config), t.last_result, epochs_planned=epochs_planned,
                      state=finished.get(t.trial_id, t.status)) for t in trials]


def write_table(path: str | Path | Location, rows: list[dict[str, Any]]) -> None:
    """results.csv, written whole and atomically (a local path or a storage URI)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["trial_id"])
    writer.writeheader()
    writer.writerows(rows)
    Location(path).write_text(text.getvalue())


def read_table(path: str | Path | Location) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(Location(path).read_text(), newline="")))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point beats in both coordinates (ties kept), by x then y."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i])


def plot_tradeoff(rows: list[dict[str, Any]], path: str | Path | Location) -> None:
    """Val clean vs val PGD accuracy (last epoch) of every trial that reported, labelled by eps; the
    Pareto front of the completed trials circled and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["val_clean_accuracy"] is not None]
    points = [(float(r["val_clean_accuracy"]), float(r["val_adversarial_accuracy"])) for r in done]
    # The front of the trials that ran all their epochs (a stopped trial's accuracies are of an earlier epoch).
    completed = [i for i, r in enumerate(done) if r["status"] == "completed"] or list(range(len(done)))
    front = [completed[i] for i in pareto_front([points[i] for i in completed])]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for status, marker in (("completed", "o"), ("stopped_early", "x"), ("error", "s"), ("running", "."),
                           ("pending", ".")):
        pts = [p for p, r in zip(points, done) if r["status"] == status]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=status.replace("_", " "), zorder=3)
    for (x, y), row in zip(points, done):
        ax.annotate(f"eps {float(row['pgd.eps']):g}" if row.get("pgd.eps") is not None else row["trial_id"], (x, y),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    if front:
        ax.plot(*zip(*(points[i] for i in front)), "k--", marker="o", markersize=12, markerfacecolor="none", lw=1,
                label="Pareto front", zorder=2)
    ax.set_xlabel("val clean accuracy")
    ax.set_ylabel("val PGD accuracy")
    ax.set_title("Clean vs robust accuracy per trial (last epoch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    Location(path).write_bytes(png.getvalue())


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The trial with the highest best_val_score among the completed ones (else among all that reported)."""
    reported = [r for r in rows if r["best_val_score"] is not None]
    check(reported, "no trial reported a validation score; see the trials' logs under trials/")
    completed = [r for r in reported if r["status"] == "completed"]
    return max(completed or reported, key=lambda r: float(r["best_val_score"]))


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


def _params(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k in PARAMETERS}


# --- the driver ----------------------------------------------------------------------------------


def check_resources(sweep: Sweep) -> None:
    """Fail (InputError) when one trial needs more than the cluster has (a trial that can never start
    would leave Tune waiting); under $RAY_ADDRESS only warn, an autoscaler may add nodes."""
    import ray

    from .cluster import WorkerRequest, check_fits, cluster_nodes

    o = sweep.options
    check_fits(WorkerRequest(cpus=sweep.trial.cpus_per_worker, gpus=o.gpus_per_worker), cluster_nodes())
    need = {"CPU": o.workers * sweep.trial.cpus_per_worker, "GPU": o.workers * o.gpus_per_worker}
    have = ray.cluster_resources()
    short = [f"{need[k]:g} {k} (the cluster has {have.get(k, 0):g})" for k in need if need[k] > have.get(k, 0)]
    if short and not os.environ.get("RAY_ADDRESS"):
        raise InputError(f"one trial ({o.workers} workers) needs {' and '.join(short)}: use fewer workers, "
                         f"gpus_per_worker or cpus_per_worker")
    if short:
        log.warning("the cluster has too few resources for one trial for now: %s; waiting for the autoscaler",
                    "; ".join(short))


def run_sweep(sweep: Sweep, sweep_dir: str | Path | Location, *, resume: bool = False) -> list[dict[str, Any]]:
    """Run (or, with resume, continue) the sweep in sweep_dir (a local path or a storage URI; Tune's
    and every trial's files go there too); writes results.csv, tradeoff.png and best.yaml and returns
    the rows of results.csv."""
    import yaml
    from ray import tune

    from . import storage
    from .distributed import init_ray
    from .train import preflight, resolve_paths

    sweep_dir = Location(sweep_dir)
    tune_dir = sweep_dir / TUNE_NAME
    storage_path, storage_filesystem = sweep_dir.for_ray_train()
    tune_path, _ = tune_dir.for_ray_train()
    stored = sweep_dir / "sweep.yaml"
    sweep = replace(sweep, trial=resolve_paths(sweep.trial))
    if resume:
        check(stored.is_file() and tune.Tuner.can_restore(tune_path, storage_filesystem=storage_filesystem),
              f"{sweep_dir}: no sweep to resume (no {stored.name} and Tune state in {tune_dir})")
        check(yaml.safe_load(stored.read_text()) == yaml.safe_load(yaml.safe_dump(sweep.to_dict(), sort_keys=False)),
              f"{sweep_dir} holds a different sweep than CONFIG: resume it with the config it started with")
    else:
        check(not tune_dir.exists(), f"{sweep_dir} already holds a sweep: continue it with --resume, or choose another --out")
    preflight(sweep.trial, sweep.options.workers)
    init_ray()
    check_resources(sweep)
    storage.preflight(sweep_dir)  # every node can write and read there, before a trial starts
    sweep_dir.mkdir()
    if not resume:
        stored.write_text(yaml.safe_dump(sweep.to_dict(), sort_keys=False))

    o = sweep.options
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, start=sweep.trial.to_dict(),
                             val_attack=asdict(o.val_pgd) if o.val_pgd else None, workers=o.workers,
                             gpus_per_worker=o.gpus_per_worker, trials_dir=(sweep_dir / "trials").uri),
        # The trial only waits on its Train controller; the training workers reserve the CPUs and GPUs.
        # Tune refuses an all-zero request, so a trial holds one byte of Ray's `memory` resource.
        {"cpu": 0, "memory": 1})
    table = sweep_dir / "results.csv"
    epochs = sweep.trial.epochs
    if resume:
        log.info("resuming the sweep in %s", sweep_dir)
        tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=storage_filesystem)
    else:
        scheduler = None
        if o.asha is not None:
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=epochs, grace_period=min(o.asha.grace_period, epochs),
                                      reduction_factor=o.asha.reduction_factor, brackets=o.asha.brackets)
        search_alg = None
        if o.seed is not None and any(d.kind != "grid" for d in sweep.space):
            from ray.tune.search.basic_variant import BasicVariantGenerator

            search_alg = BasicVariantGenerator(random_state=o.seed)
        tuner = tune.Tuner(
            trainable,
            param_space={d.name: d.to_tune() for d in sweep.space},
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler, search_alg=search_alg,
                                        num_samples=o.num_samples, max_concurrent_trials=o.max_concurrent_trials,
                                        trial_dirname_creator=lambda trial: trial.trial_id),
            run_config=tune.RunConfig(name=TUNE_NAME, storage_path=storage_path, storage_filesystem=storage_filesystem,
                                      callbacks=[SweepCallback(table, sweep_dir / "trials", epochs)], verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=0)),  # Train retries workers
        )
    log.info("sweeping %s into %s", ", ".join(d.name for d in sweep.space), sweep_dir)
    tuner.fit()

    trials = tune.ExperimentAnalysis(tune_path, storage_filesystem=storage_filesystem).trials
    for trial in trials:  # the trials that ran but did not end through the callback (interrupted ones)
        remove_placement_groups(sweep_dir / "trials" / trial.trial_id)
    rows = sorted(trial_rows(trials, epochs),
                  key=lambda row: [row[d.name] for d in sweep.space] + [row["trial_id"]])
    write_table(table, rows)
    ended = [r for r in rows if r["status"] not in ("running", "pending")]
    if len(ended) < sweep.num_trials:  # Tune creates trials lazily: an interrupted sweep may lack some
        raise SweepInterrupted(f"the sweep in {sweep_dir} stopped with {len(ended)} of its {sweep.num_trials} trials "
                               f"ended; continue it with --resume")
    plot_tradeoff(rows, sweep_dir / "tradeoff.png")
    best = best_row(rows)
    best_cfg = trial_config(sweep.base, {k: best[k] for k in PARAMETERS if k in best})
    (sweep_dir / "best.yaml").write_text(
        f"# The best trial ({best['trial_id']}) of the sweep in {sweep_dir}: val score {best['best_val_score']:.4f} "
        f"(epoch {best['best_epoch']}).\n# Train it with: robint train {sweep_dir / 'best.yaml'} --out RUN_DIR\n"
        + dump_config(best_cfg))
    return rows
