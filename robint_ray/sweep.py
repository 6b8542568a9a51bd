"""The sweep schema, with no Ray in it: what a sweep file says (the search space over the PGD budget and
the learning rate, grid or random, ASHA and the cheaper validation attack), the training config of one
trial, and the results of a sweep (results.csv, the Pareto front of clean vs PGD accuracy, the best trial
and best.yaml). `robint_ray.tune` runs a Sweep on Ray Tune.

    sweep = load_sweep("experiments/sweep_cifar10_l2.yaml")   # an unknown key or parameter names itself
    cfg = trial_config(sweep.trial, {"pgd.eps": 0.5, "pgd.step_rel": 4.0})
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Mapping

from .config import TrainConfig, build_dataclass, dump_config, load_config, read_yaml
from .errors import InputError, check
from .storage import Location

# The sweepable parameters and their type. pgd.step_rel sets pgd.step_size = step_rel * eps / steps
# (the paper's CIFAR-10 choice, 0.1 for eps 0.5 in 20 steps, is step_rel 4; Madry et al. use 2.5).
PARAMETERS: dict[str, type] = {
    "pgd.eps": float,
    "pgd.step_size": float,
    "pgd.step_rel": float,
    "pgd.steps": int,
    "optim.lr": float,
}
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


# --- the sweep configuration ----------------------------------------------------------------------


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
        check(
            self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
            f"max_concurrent_trials must be >= 1 or null, got {self.max_concurrent_trials}",
        )


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
        return {
            "base": self.base.to_dict(),
            "trial": self.trial.to_dict(),
            "space": {d.name: {d.kind: list(d.values)} for d in self.space},
            **asdict(self.options),
        }


def _dimension(name: str, spec: Any) -> Dimension:
    check(name in PARAMETERS, f"unknown sweep parameter '{name}'; sweepable: {', '.join(PARAMETERS)}")
    kind_of = PARAMETERS[name]
    if isinstance(spec, list):
        spec = {"grid": spec}
    check(
        isinstance(spec, Mapping) and len(spec) == 1,
        f"space.{name}: give a list of values (a grid) or one of "
        f"{', '.join(f'{{{k}: ...}}' for k in KINDS)}; got {spec!r}",
    )
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
        check(
            len(values) == 2 and values[0] <= values[1],
            f"space.{name}.{kind} takes [low, high] with low <= high, got {list(values)}",
        )
        check(kind != "loguniform" or values[0] > 0, f"space.{name}.loguniform needs low > 0, got {values[0]}")
    check(kind != "randint" or kind_of is int, f"space.{name}: randint is for integer parameters (pgd.steps)")
    if name in ("pgd.eps", "pgd.step_size", "pgd.step_rel", "optim.lr"):
        bad = [v for v in values if not (v > 0 and math.isfinite(v))]
        if bad:
            raise InputError(f"space.{name} must be > 0, got {bad[0]}")
    if name == "pgd.steps":
        check(min(values) >= 1, f"space.pgd.steps must be >= 1, got {min(values)}")
    return Dimension(name, kind, values)


def trial_config(
    start: TrainConfig, params: Mapping[str, Any], *, val_attack: ValAttackConfig | None = None
) -> TrainConfig:
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
    step_size = val_attack.step_rel * cfg.pgd.eps / val_attack.steps
    return replace(cfg, val_pgd=cfg.pgd.given(steps=val_attack.steps, step_size=step_size))


def parse_sweep(data: Mapping[str, Any], *, root: Path = Path(".")) -> Sweep:
    """A Sweep from the mapping of a sweep file; `base` as a path is read relative to `root`."""
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
        trial = base.override(overrides)
    except InputError as err:
        raise InputError(f"overrides: {err}") from err
    trial = trial.override({"test": False})  # a sweep selects on validation; the test split waits for best.yaml
    options: SweepOptions = build_dataclass(SweepOptions, data)

    check(isinstance(space, Mapping) and len(space) > 0, "'space' must map at least one parameter to its values")
    dims = tuple(_dimension(str(name), spec) for name, spec in space.items())
    names = [d.name for d in dims]
    check(
        not {"pgd.step_size", "pgd.step_rel"} <= set(names),
        "sweep either pgd.step_size (absolute) or pgd.step_rel (relative to eps), not both",
    )
    random = [d.name for d in dims if d.kind != "grid"]
    if options.search == "grid":
        check(
            not random,
            f"search: grid, but {', '.join(random)} {'is' if len(random) == 1 else 'are'} drawn at random "
            f"(give lists, or search: random)",
        )
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
    path = Path(path)
    data = read_yaml(path, "sweep file")
    try:
        return parse_sweep(data, root=path.parent)
    except InputError as err:
        raise InputError(f"{path}: {err}") from err


# --- the results ----------------------------------------------------------------------------------


def trial_row(
    trial_id: str, params: Mapping[str, Any], metrics: Mapping[str, Any] | None, *, epochs_planned: int, state: str
) -> dict[str, Any]:
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
    return {
        **{name: params.get(name) for name in sorted(params)},
        "epochs": epochs,
        "epochs_planned": epochs_planned,
        **{
            k: metrics.get(k)
            for k in ("val_clean_accuracy", "val_adversarial_accuracy", "val_score", "best_epoch", "best_val_score")
        },
        "status": status,
        "trial_id": trial_id,
    }


def write_table(path: str | Path | Location, rows: list[dict[str, Any]]) -> None:
    """results.csv, written whole and atomically (a local path or a storage URI)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["trial_id"])
    writer.writeheader()
    writer.writerows(rows)
    Location(path).write_text(text.getvalue())


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point beats in both coordinates (ties kept), by x then y."""
    front = [
        i for i, (x, y) in enumerate(points) if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for x2, y2 in points)
    ]
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
    for status, marker in (
        ("completed", "o"),
        ("stopped_early", "x"),
        ("error", "s"),
        ("running", "."),
        ("pending", "."),
    ):
        pts = [p for p, r in zip(points, done) if r["status"] == status]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=status.replace("_", " "), zorder=3)
    for (x, y), row in zip(points, done):
        ax.annotate(
            f"eps {float(row['pgd.eps']):g}" if row.get("pgd.eps") is not None else row["trial_id"],
            (x, y),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    if front:
        ax.plot(
            *zip(*(points[i] for i in front)),
            "k--",
            marker="o",
            markersize=12,
            markerfacecolor="none",
            lw=1,
            label="Pareto front",
            zorder=2,
        )
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


def write_best_config(sweep: Sweep, rows: list[dict[str, Any]], sweep_dir: str | Path | Location) -> dict[str, Any]:
    """SWEEP_DIR/best.yaml: the base training config with the best trial's parameters (see best_row);
    returns that trial's row."""
    sweep_dir = Location(sweep_dir)
    best = best_row(rows)
    best_cfg = trial_config(sweep.base, {k: best[k] for k in PARAMETERS if k in best})
    (sweep_dir / "best.yaml").write_text(
        f"# The best trial ({best['trial_id']}) of the sweep in {sweep_dir}: val score {best['best_val_score']:.4f} "
        f"(epoch {best['best_epoch']}).\n# Train it with: robint train {sweep_dir / 'best.yaml'} --out RUN_DIR\n"
        + dump_config(best_cfg)
    )
    return best


def trial_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The swept parameters of a trial's config (Tune's trial.config)."""
    return {k: v for k, v in config.items() if k in PARAMETERS}
