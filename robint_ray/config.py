"""Typed training configuration: frozen dataclasses loaded from YAML, with `--set key=value` overrides.

    cfg = load_config("experiments/cifar10_robust_l2.yaml", sets=["optim.lr=0.05", "epochs=10"])
    cfg.to_dict()                      # a plain dict (travels to Ray workers, Tune trials, checkpoints)
    TrainConfig.from_dict(d)           # and back; an unknown or misspelt key is an error naming it

Defaults are the paper's CIFAR-10 settings, read from the author's code where the paper is silent
(see shared/paper/settings-from-the-authors-code.md): SGD lr 0.01, momentum 0.9, weight decay 5e-4,
batch 128, 100 epochs, cosine annealing with T_max = 200 epochs; L2 PGD eps 0.5, step 0.1, 20 steps, no
random start, batch norm in train mode during the training attack. A config that runs PGD holds its
budget as a `PGDSettings` in its `pgd` field.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Mapping

from .errors import InputError, check
from .storage import Location, is_uri


@dataclass(frozen=True)
class PGDSettings:
    """A PGD budget: `steps` ascent steps of length step_size inside the `norm` ball of radius eps, in
    pixel units of [0, 1] images. The one budget type of the package: every config that runs PGD holds
    one as its `pgd` field (training, `evaluate.AttackConfig`, the study's stages; in YAML a mapping
    `pgd: {eps: ..., step_size: ..., steps: ..., norm: ...}`), and the global methods (`visualize`) take
    one. Checked here, once, when it is made."""

    eps: float
    step_size: float
    steps: int
    norm: Literal["l2", "linf"] = "l2"

    def __post_init__(self):
        from .attacks import check_ball  # attacks imports torch; configs stay light to load

        check(isinstance(self.steps, int) and self.steps >= 1, f"steps must be an integer >= 1, got {self.steps!r}")
        check_ball(self.norm, self.eps, self.step_size)

    @property
    def threat(self):
        """The ball as the PGD engine takes it (`attacks.Threat`)."""
        from .attacks import Threat  # attacks imports torch; configs stay light to load

        return Threat(self.norm, self.eps, self.step_size)

    def given(self, **values: Any) -> PGDSettings:
        """These settings with each of `values` that is not None put in: a default and a user's choices."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    def describe(self) -> str:
        """As the report prints a budget: "L2 eps 0.5, step 0.1, 20 steps"."""
        return f"{self.norm.upper()} eps {self.eps:g}, step {self.step_size:g}, {self.steps} steps"


# The paper's CIFAR-10 PGD, of adversarial training (Algorithm 1) and of the evaluation (Table 1).
PAPER_PGD = PGDSettings(eps=0.5, step_size=0.1, steps=20)


def flat_record(config: Any) -> dict[str, Any]:
    """A config that holds a PGD budget (`pgd`) as results record it: the budget's keys (eps, step_size,
    steps, norm) beside the config's own, one flat mapping, as before the budget was a field."""
    own = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "pgd"}
    return {**dataclasses.asdict(config.pgd), **own}


@dataclass(frozen=True)
class DataConfig:
    """path: as `robint_ray.data.load_split` takes it (`sample`, a .npz, a CIFAR-10 folder or an
    ImageFolder root); relative paths are read from the current directory. Training uses the `fit`
    split and model selection the `val` split (val_fraction of each class of `train`, chosen with
    split_seed); `test` is only evaluated at the end, on the selected model.
    train_n / val_n / test_n: a seeded random subset of that many images (None: all), for smoke runs.
    """

    path: str = "sample"
    val_fraction: float = 0.1
    split_seed: int = 0
    augment: bool = True
    train_n: int | None = None
    val_n: int | None = None
    test_n: int | None = None
    loader_workers: int = 0  # DataLoader processes per training worker

    def __post_init__(self):
        check(0 < self.val_fraction < 1, f"data.val_fraction must lie in (0, 1), got {self.val_fraction}")
        for name in ("train_n", "val_n", "test_n"):
            n = getattr(self, name)
            check(n is None or n >= 1, f"data.{name} must be >= 1 or null, got {n}")
        check(self.loader_workers >= 0, f"data.loader_workers must be >= 0, got {self.loader_workers}")


@dataclass(frozen=True)
class OptimConfig:
    """name: "sgd" (with momentum) or "adam". schedule: "cosine" (CosineAnnealingLR stepped once per
    epoch, t_max in epochs, None meaning the run's epochs) or "constant"."""

    name: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01  # for the global batch (batch_size), whatever the number of workers
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    t_max: int | None = 200  # the author's quirk: over 100 epochs the rate only falls halfway

    def __post_init__(self):
        check(self.lr > 0 and math.isfinite(self.lr), f"optim.lr must be > 0, got {self.lr}")
        check(0 <= self.momentum < 1, f"optim.momentum must lie in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        check(self.t_max is None or self.t_max >= 1, f"optim.t_max must be >= 1 or null, got {self.t_max}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. adversarial=False trains on clean images (the standard model); the `pgd`
    attack then only measures validation robustness. batch_size is the global batch, split evenly
    over the workers."""

    arch: str = "cifar_resnet18"
    num_classes: int | None = None  # None: the number of classes of the data
    epochs: int = 100
    batch_size: int = 128
    adversarial: bool = False
    pgd: PGDSettings = PAPER_PGD  # the training attack (with adversarial) and the validation attack
    # The per-epoch validation attack's budget, from x (no random start; sweeps set a cheaper one); None:
    # the training attack, pgd with pgd_random_start.
    val_pgd: PGDSettings | None = None
    pgd_random_start: bool = False  # PGD from a random point of the ball; the trainer of the paper's models: from x
    # Batch norm during the *training* attack: "train" (batch statistics; the author's trainer) or "eval"
    # (running statistics). Validation always attacks the model in eval mode.
    pgd_bn_mode: Literal["train", "eval"] = "train"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_batch_size: int = 256  # validation / test batch per worker
    test: bool = True  # evaluate the selected (best) model on the test split at the end
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on a GPU, fp32 on a CPU
    channels_last: bool = True  # on a GPU only
    deterministic: bool = False  # on a GPU: cuDNN's deterministic kernels, no autotuning (bit-for-bit reruns, slower)
    cpus_per_worker: int = 1  # CPU threads (and Ray CPUs) per training worker
    max_failures: int = 3  # worker-group restarts Ray Train may make before giving up
    log_every: int = 50  # batches between progress lines
    # The best epoch: "mean" (val clean + val PGD) / 2, "clean" val accuracy, or "auto": clean for a
    # standard model, mean for an adversarially trained one, as the authors' two trainers select.
    selection: Literal["auto", "mean", "clean"] = "auto"
    # Clip every gradient value to [-grad_clip, grad_clip] before each optimiser step (the authors' two
    # trainers: 0.1, torch's clip_grad_value_); None: no clipping.
    grad_clip: float | None = None
    # Batch norm in train mode (training and the training attack) over the whole batch, synchronised
    # across workers, as one process would see it (the authors trained on one GPU); False: each worker's
    # own batch_size / workers images.
    sync_batch_norm: bool = True
    # Start from these weights instead of a random initialisation: a robint checkpoint folder, or a
    # weights file that `robint eval --weights` reads (.safetensors, a torch state dict, the akamaster
    # format), a path or a storage URI. A resumed run continues its own checkpoint instead.
    init: str | None = None

    # Keys of earlier versions and where they live now (an old file's key is an error naming the new one).
    MOVED: ClassVar[dict[str, str]] = {
        "pgd.random_start": "pgd_random_start",
        "pgd.bn_mode": "pgd_bn_mode",
    }

    def __post_init__(self):
        check(
            self.grad_clip is None or (math.isfinite(self.grad_clip) and self.grad_clip > 0),
            f"grad_clip must be > 0 or null, got {self.grad_clip}",
        )
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        check(self.num_classes is None or self.num_classes >= 2, f"num_classes must be >= 2, got {self.num_classes}")
        check(self.cpus_per_worker >= 1, f"cpus_per_worker must be >= 1, got {self.cpus_per_worker}")
        check(self.max_failures >= 0, f"max_failures must be >= 0, got {self.max_failures}")
        check(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        check(
            self.selection in ("auto", "mean", "clean"),
            f"selection must be auto, mean or clean, got {self.selection!r}",
        )

    @property
    def selection_rule(self) -> str:
        """The selection rule in force: "mean" or "clean" (see `selection`)."""
        if self.selection != "auto":
            return self.selection
        return "mean" if self.adversarial else "clean"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        return _build(cls, data, "")

    def override(self, sets: Mapping[str, Any] | Iterable[str]) -> "TrainConfig":
        """A copy with dotted keys replaced: {"optim.lr": 0.1} or ["optim.lr=0.1", ...] (values as YAML)."""
        return TrainConfig.from_dict(apply_overrides(self.to_dict(), sets, moved_keys(TrainConfig)))


# --- loading and checking --------------------------------------------------------------------------


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _config_class(kind: Any) -> Any:
    """The config dataclass of a field type (X or X | None), else None."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        inner = [o for o in typing.get_args(kind) if o is not type(None)]
        kind = inner[0] if len(inner) == 1 else None
    return kind if dataclasses.is_dataclass(kind) else None


def moved_keys(cls, prefix: str = "") -> dict[str, str]:
    """Every key of earlier versions of the config `cls` (its own and its sections' `MOVED`), dotted from
    its top, and where it lives now: {"evaluation.eps": "evaluation.pgd.eps", ...}."""
    out = {prefix + old: prefix + new for old, new in getattr(cls, "MOVED", {}).items()}
    for name, kind in _fields(cls).items():
        inner = _config_class(kind)
        if inner is not None:
            out.update(moved_keys(inner, f"{prefix}{name}."))
    return out


def _moved_error(key: str, new: str) -> InputError:
    """The error for an old key: config key 'evaluation.eps' moved: write it as evaluation: {pgd: {eps: ...}}."""
    *sections, leaf = new.split(".")
    where = f"{leaf}: ..."
    for section in reversed(sections):
        where = f"{section}: {{{where}}}"
    return InputError(f"config key '{key}' moved: write it as {where}")


def _coerce(value: Any, kind: Any, key: str, moved: Mapping[str, str]) -> Any:
    """value as type `kind` (int, float, bool, str, Literal[...], X | None, a config dataclass)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(value, inner, key, moved)
    if dataclasses.is_dataclass(kind):
        check(
            isinstance(value, Mapping),
            f"config key '{key}' must be a mapping of {kind.__name__} settings, got {value!r}",
        )
        return _build(kind, value, key + ".", moved)
    if origin is tuple:  # tuple[X, ...]: a YAML list
        check(isinstance(value, (list, tuple)), f"config key '{key}' must be a list, got {value!r}")
        (inner, _) = typing.get_args(kind)
        return tuple(_coerce(v, inner, f"{key}[{i}]", moved) for i, v in enumerate(value))
    if origin is Literal:
        choices = typing.get_args(kind)
        check(value in choices, f"config key '{key}' must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return value
    if kind is bool:
        check(isinstance(value, bool), f"config key '{key}' must be true or false, got {value!r}")
        return value
    if kind is int:
        check(
            isinstance(value, int) and not isinstance(value, bool),
            f"config key '{key}' must be an integer, got {value!r}",
        )
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise InputError(f"config key '{key}' must be a number, got {value!r}") from None
        check(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            f"config key '{key}' must be a number, got {value!r}",
        )
        return float(value)
    if kind is str:
        check(isinstance(value, str), f"config key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {kind!r} for {key}")


def _build(cls, data: Mapping[str, Any], prefix: str, moved: Mapping[str, str] | None = None):
    """cls from a mapping: every key known (a key of an earlier version is an error naming its new
    place, `moved_keys`), every required one given, each value of its field's type."""
    check(
        isinstance(data, Mapping), f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}"
    )
    moved = moved_keys(cls, prefix) if moved is None else moved
    known = _fields(cls)
    for key in data:
        if prefix + key in moved:
            raise _moved_error(prefix + key, moved[prefix + key])
        if key not in known:
            raise InputError(f"unknown config key '{prefix}{key}'; known keys here: {', '.join(known)}")
    required = [f.name for f in dataclasses.fields(cls) if f.default is f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    section = prefix.rstrip(".")
    check(not missing, f"config section '{section or '<top>'}' lacks {', '.join(missing)}")
    values = {k: _coerce(v, known[k], prefix + k, moved) for k, v in data.items()}
    try:
        return cls(**values)
    except InputError as err:  # a section's own check: say which section, where it does not
        if not section or str(err).startswith(section):
            raise
        raise InputError(f"{section}: {err}") from None


def _parse_set(item: str) -> tuple[str, Any]:
    import yaml

    check("=" in item, f"--set takes key=value, got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    check(key != "", f"--set takes key=value, got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise InputError(f"--set {key}: cannot read value {text!r} ({err})") from err
    return key, value


def apply_overrides(
    data: Mapping[str, Any], sets: Mapping[str, Any] | Iterable[str], moved: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A deep copy of the config dict `data` with dotted keys replaced. Every key must exist (a
    misspelt key is an error naming it, a key of `moved` one naming its new place); the result still
    needs TrainConfig.from_dict to be checked."""
    out = copy.deepcopy(dict(data))
    pairs = sets.items() if isinstance(sets, Mapping) else (_parse_set(s) for s in sets)
    for dotted, value in pairs:
        if moved and dotted in moved:
            raise _moved_error(dotted, moved[dotted])
        node, parts = out, dotted.split(".")
        for depth, part in enumerate(parts):
            check(
                isinstance(node, dict) and part in node,
                f"unknown config key '{'.'.join(parts[: depth + 1])}' in --set {dotted}",
            )
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return out


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The content of a YAML file, a local path or a storage URI ({} when empty); a missing file or
    invalid YAML is an InputError."""
    import yaml

    source = Location(path)
    path = path if is_uri(str(path)) else Path(path)
    check(source.is_file(), f"{what} not found: {path}")
    try:
        return yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({err})") from err


def load_config(path: str | Path | None, sets: Iterable[str] | Mapping[str, Any] = ()) -> TrainConfig:
    """The TrainConfig of a YAML file (None: the defaults), with `sets` applied."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
        check(isinstance(data, dict), f"{path}: a config file must be a mapping of keys to values")
    try:
        base = TrainConfig.from_dict(data).to_dict()
        cfg = TrainConfig.from_dict(apply_overrides(base, sets, moved_keys(TrainConfig)))
    except InputError as err:
        raise InputError(f"{path}: {err}" if path is not None else str(err)) from err
    if path is not None and cfg.init is not None and "://" not in cfg.init:
        beside = Path(path).parent / cfg.init  # a relative init is read beside the config file where it is there
        if not Path(cfg.init).is_absolute() and beside.exists():
            cfg = dataclasses.replace(cfg, init=str(beside.resolve()))
    return cfg


def dump_config(cfg: TrainConfig) -> str:
    """The config as YAML (every key, so the file documents the run completely)."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def build_dataclass(cls, data: Mapping[str, Any], context: str = ""):
    """Any config dataclass from a plain mapping, with the checks of TrainConfig (unknown keys and
    wrong types are InputErrors naming the key). context prefixes the message (e.g. the file)."""
    try:
        return _build(cls, data, "")
    except InputError as err:
        raise InputError(f"{context}{err}") from err
