"""The paper end to end as one job: train, evaluate, explain, generate + FID, invert, visualise, report.

    robint study experiments/paper/cifar10.yaml --out runs/paper-cifar10
    ray job submit --working-dir . -- robint study experiments/paper/cifar10.yaml --out s3://bucket/paper

OUT is a local path or a storage URI (storage.Location); on a cluster every node must be able to write
and read it (an s3:// URI or a shared mount), which storage.preflight checks before any work. Stages
run in order; each writes OUT/<stage>/result.json when it has finished, and a rerun skips every
stage whose result exists (and, inside generation, every shard already written), so a job that failed
or was killed resumes where it stopped. The last stage writes OUT/report.html (figures embedded) and
OUT/report.json (every number, the settings, the code version, the hardware, each stage's time).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .distributed import default_gpus_per_task, devices_used, nodes_used, task_resources
from .errors import check
from .storage import Location

log = logging.getLogger(__name__)


def _pgd(norm: str, eps: float, step_size: float, steps: int) -> str:
    """A PGD budget as the report prints it, for the paper's settings and ours alike."""
    return f"{norm.upper()} eps {eps:g}, step {step_size:g}, {steps} steps"


# The paper's figures, shown beside ours in the report (Tables 1-6); where each of its tables and figures
# lands in our report (`numbers`); and its settings (`settings`, section 3 and the authors' code), which
# the report compares with the run's own ("How this run differs from the paper").
PAPER = {
    "cifar10": {
        "accuracy": {"standard": (93.2, 0.36), "robust": (85.0, 64.6)},  # clean, PGD-20 L2 eps 0.5 (%)
        "fid": {"real": 5.39, "standard": 152.29, "robust": 88.25},
        "inception192": {"standard": 30.1, "robust": 20.05},  # Inv. 1 (Fig. 4)
        "inception192_inv2": {"standard": 30.07, "robust": 21.18},  # Inv. 2 (Fig. 11)
        "numbers": {
            "accuracy": "Table 1",
            "fid": "Table 2",
            "inversion": "Table 3",
            "overlays": "Fig. 2",
            "ig_grid": "Fig. 10",
            "shap_grid": "Fig. 13",
            "classes": "Fig. 3",
            "seeds": "Fig. 14",
            "inv1": "Fig. 4",
            "inv2": "Fig. 11",
            "features": "Figs. 5 / 12",
        },
        "settings": {
            "architecture": "cifar_resnet18",
            "training images": 50_000,
            "epochs": 100,
            "batch size": 128,
            "robust training PGD": _pgd("l2", 0.5, 0.1, 20),
            "test images (clean, PGD)": 10_000,
            "evaluation PGD": _pgd("l2", 0.5, 0.1, 20),
            "AutoAttack images": 0,
            "explained images": 24,
            "explained class": "predicted",
            "IG baselines x steps": "10 x 50",
            "SHAP samples, background": "200, 176",
            "generated images a class": 1000,
            "generation PGD": _pgd("l2", 30, 0.5, 60),
            "class seeds pooled by": 4,
            "real-data FID images (train vs test)": "10000 vs 10000",
            "generated-image FID images (generated vs test)": "10000 vs 10000",
            "inversion PGD": _pgd("l2", 1000, 1, 10_000),
            "inversion runs": 2,
            "feature visualisation PGD": _pgd("l2", 1000, 1, 400),
        },
    },
    "folder128": {
        "accuracy": {"standard": (70.1, 0.88), "robust": (55.8, 35.4)},  # PGD-20 L2 eps 1.5
        "fid": {"real": 7.62, "standard": 237.53, "robust": 81.2},
        "inception192": {"standard": 23.3, "robust": 12.84},  # Inv. 1 (Fig. 8)
        "inception192_inv2": {"standard": 26.75, "robust": 14.91},  # Inv. 2 (Fig. 18)
        "numbers": {
            "accuracy": "Table 4",
            "fid": "Table 5",
            "inversion": "Table 6",
            "overlays": "Fig. 6",
            "ig_grid": "Fig. 16",
            "shap_grid": "Fig. 17",
            "classes": "Fig. 7",
            "seeds": "Fig. 19",
            "inv1": "Fig. 8",
            "inv2": "Fig. 18",
            "features": "Figs. 9 / 15",
        },
        "settings": {
            "architecture": "resnet50",
            "training images": 90_000,
            "epochs": 100,
            "batch size": 200,
            "robust training PGD": _pgd("l2", 1.5, 2.5 * 1.5 / 20, 20),
            "test images (clean, PGD)": "7500 (val) and ImageNetV2",
            "evaluation PGD": _pgd("l2", 1.5, 2.5 * 1.5 / 20, 20),
            "AutoAttack images": 0,
            "explained images": 24,
            "explained class": "predicted",
            "IG baselines x steps": "10 x 50",
            "SHAP samples, background": "200, 176",
            "generated images a class": 60,
            "generation PGD": _pgd("l2", 40, 1, 60),
            "class seeds pooled by": 4,
            "real-data FID images (train vs test)": "9000 vs 9000",
            "generated-image FID images (generated vs test)": "9000 vs 9000",
            "inversion PGD": _pgd("l2", 1000, 1, 10_000),
            "inversion runs": 2,
            "feature visualisation PGD": _pgd("l2", 1000, 1, 400),
        },
    },
}


@dataclass(frozen=True)
class ModelSource:
    """A model: trained here from a training config (`train`, a YAML path), or taken as it is from a
    robint checkpoint folder (`checkpoint`)."""

    train: str | None = None
    checkpoint: str | None = None
    set: tuple[str, ...] = ()  # overrides of the training config, as `robint train --set`: ["epochs=20"]


@dataclass(frozen=True)
class EvalStage:
    n: int | None = None  # first n test images (None: all)
    norm: str = "l2"
    eps: float = 0.5
    step_size: float = 0.1
    steps: int = 20
    autoattack_n: int = 100  # AutoAttack is slow: the first n test images (0: skip)
    autoattack_version: str = "standard"  # or "custom" with autoattack_attacks, e.g. [apgd-ce, apgd-t]
    autoattack_attacks: tuple[str, ...] = ()
    batch_size: int = 128


@dataclass(frozen=True)
class AttributionStage:
    n: int = 24  # the paper's grids hold 24 images
    overlays: int = 3  # images in the overlay figure (Figs. 2, 6)
    ig_steps: int = 50
    ig_baselines: int = 10
    shap_nsamples: int = 200
    shap_background: int = 176
    target: str = "predicted"  # explain each model's own argmax (the authors'), or "label"


@dataclass(frozen=True)
class GenerationStage:
    per_class: int = 1000
    eps: float | None = None  # None: the paper's for the input size
    step_size: float | None = None
    steps: int | None = None
    shard_size: int = 100
    fid_dims: int = 2048
    # Training images per class in the real-data FID (train vs test), drawn seeded (the authors: 1,000
    # a class, 10,000 against CIFAR-10's 10,000 test images); a class with fewer gives all it has.
    # None: every training image.
    real_per_class: int | None = 1000
    seed_pool: int | None = None  # class seeds pooled by this (None: 4, the authors'; 16 at 128 px: robustness's)
    fid_preprocess: str = "robint"  # or "author": truncated uint8 generations, resized on uint8 (inception.py)

    def __post_init__(self):
        from .inception import PREPROCESSING

        check(
            self.fid_preprocess in PREPROCESSING,
            f"generation.fid_preprocess must be one of {', '.join(PREPROCESSING)}, got {self.fid_preprocess!r}",
        )


@dataclass(frozen=True)
class InversionStage:
    """The authors' protocol: each run inverts one test image from `image_sources` test images of
    other classes and `noise` grey-noise images (0.5 + U/20); run 1 is the paper's Inv. 1 (Figs. 4 / 8),
    run 2 its Inv. 2 (Figs. 11 / 18), each with its own draw."""

    runs: int = 2
    image_sources: int = 2
    noise: int = 1
    eps: float = 1000.0
    step_size: float = 1.0
    steps: int = 10_000


@dataclass(frozen=True)
class FeatureStage:
    features: tuple[tuple[int, ...], ...] = ((130,), (492,))  # the paper's Figs. 5 and 9
    starts: int = 4
    top: int = 8
    eps: float = 1000.0
    step_size: float = 1.0
    steps: int = 400


# How many Ray tasks of each stage share one GPU by default (gpus_per_task None, a cluster with GPUs):
# evaluation, attributions and generation + FID run batches of 100 or more images (IG: 50 steps x 10
# baselines per image) and keep a GPU busy alone; inversion and feature visualisation run one image per
# task through 400-10,000 sequential steps, too small to fill a GPU, so four share one.
TASKS_PER_GPU = {"evaluation": 1, "attributions": 1, "generation": 1, "inversion": 4, "features": 4}


@dataclass(frozen=True)
class StudyConfig:
    name: str = "CIFAR-10"
    paper: str = "cifar10"  # which of the paper's tables to show beside ours: cifar10 or folder128
    data: str = "sample"
    workers: int = 2  # Ray workers for training; tasks at a time for the fan-outs
    gpus_per_worker: float = 0
    # GPUs / CPUs per Ray task of the evaluation, attribution, generation + FID, inversion and feature
    # stages (fractions allowed); gpus_per_task None: on a cluster with GPUs, TASKS_PER_GPU's share of
    # one per stage, else 0.
    gpus_per_task: float | None = None
    cpus_per_task: float = 1
    seed: int = 0
    standard: ModelSource = field(default_factory=ModelSource)
    robust: ModelSource = field(default_factory=ModelSource)
    evaluation: EvalStage = field(default_factory=EvalStage)
    attributions: AttributionStage = field(default_factory=AttributionStage)
    generation: GenerationStage = field(default_factory=GenerationStage)
    inversion: InversionStage = field(default_factory=InversionStage)
    features: FeatureStage = field(default_factory=FeatureStage)

    def __post_init__(self):
        check(self.paper in PAPER, f"paper must be one of {', '.join(PAPER)}, got {self.paper!r}")
        check(self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        check(
            self.gpus_per_task is None or self.gpus_per_task >= 0,
            f"gpus_per_task must be >= 0, got {self.gpus_per_task}",
        )
        check(self.cpus_per_task > 0, f"cpus_per_task must be > 0, got {self.cpus_per_task}")
        for name in ("standard", "robust"):
            source = getattr(self, name)
            check(
                (source.train is None) != (source.checkpoint is None),
                f"{name}: give exactly one of train (a training config) or checkpoint (a folder)",
            )


def load_study(path: str | Path) -> StudyConfig:
    from .config import build_dataclass, read_yaml

    path = Path(path)
    data = read_yaml(path, "study config")
    base = path.parent
    for name in ("standard", "robust"):  # paths in the file are relative to the file
        for key in ("train", "checkpoint"):
            value = (data.get(name) or {}).get(key)
            if value is not None and not Path(value).is_absolute() and (base / value).exists():
                data[name][key] = str((base / value).resolve())
    if (
        data.get("data") not in (None, "sample")
        and not Path(data["data"]).is_absolute()
        and (base / data["data"]).exists()
    ):
        data["data"] = str((base / data["data"]).resolve())
    return build_dataclass(StudyConfig, data, f"{path}: ")


# --- stages -------------------------------------------------------------------------------------


class Study:
    def __init__(self, config: StudyConfig, out: str | Path | Location):
        self.config, self.out = config, Location(out)
        self.timings: dict[str, float] = {}
        self.models: dict[str, Any] = {}

    def stage(self, name: str, fn: Callable[[Any], dict[str, Any]], *, local: bool = True) -> dict[str, Any]:
        """Run fn(folder) unless OUT/name/result.json exists; either way return the result. folder: with
        local, a local folder whose files end up in OUT/name (OUT/name itself on a local disk, else a
        temporary folder uploaded when fn returns; paths in the result are rewritten to OUT/name); else
        the Location OUT/name."""
        target = self.out / name
        done = target / "result.json"
        if done.exists():
            log.info("stage %s: done before, skipped", name)
            result = done.read_json()
            self.timings[name] = result.get("_seconds", 0.0)
            return result
        # Training has its own resources (gpus_per_worker); every other stage's Ray tasks ask for
        # gpus_per_task (default: 1 on a cluster with GPUs, by Ray's resource table) and cpus_per_task.
        gpus = 0.0 if name == "train" else self.gpus_per_task(name)
        log.info("stage %s: starting (Ray tasks: %s GPU and %s CPU each)", name, gpus, self.config.cpus_per_task)
        start = time.perf_counter()
        with task_resources(gpus_per_task=gpus, cpus_per_task=self.config.cpus_per_task):
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
        done.write_text(json.dumps(result, indent=2, default=_jsonable))
        log.info("stage %s: finished in %.1f s", name, result["_seconds"])
        return result

    def gpus_per_task(self, stage: str) -> float:
        """GPUs per Ray task of a stage after training: the config's, else on a cluster with GPUs
        1 / TASKS_PER_GPU[stage] (by Ray's resource table: the driver's own CUDA is never asked)."""
        if self.config.gpus_per_task is not None:
            return self.config.gpus_per_task
        return default_gpus_per_task(None) / TASKS_PER_GPU.get(stage, 1)

    # the models

    def train_config(self, name: str):
        """The TrainConfig a model trained here follows: its file, the study's data and seed, its `set`."""
        from .config import load_config

        source: ModelSource = getattr(self.config, name)
        cfg = load_config(source.train, {"data.path": self.config.data, "seed": self.config.seed})
        return cfg.override(list(source.set))

    def train(self, folder: Location) -> dict[str, Any]:
        from .train import RAY_NAME, run

        out = {}
        for name in ("standard", "robust"):
            source: ModelSource = getattr(self.config, name)
            if source.checkpoint is not None:
                out[name] = {"checkpoint": source.checkpoint}
                continue
            cfg = self.train_config(name)
            run_dir = folder / name
            if not (run_dir / "done").exists():
                resume = (run_dir / "ray" / RAY_NAME).exists()
                run(
                    cfg,
                    run_dir,
                    workers=self.config.workers,
                    gpus_per_worker=self.config.gpus_per_worker,
                    resume=resume,
                )
                (run_dir / "done").write_text("")
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
            out[name] = {"checkpoint": (run_dir / "best").uri, "config": source.train, "epochs": metrics}
        return out

    def model(self, name: str):
        from .checkpoint import load_checkpoint

        if name not in self.models:
            trained = (self.out / "train" / "result.json").read_json()
            self.models[name] = load_checkpoint(trained[name]["checkpoint"])[0]
        return self.models[name]

    def test_split(self):
        from .data import load_split

        return load_split(self.config.data, "test")

    # Tables 1 and 4

    def evaluate(self, folder: Path) -> dict[str, Any]:
        from .data import take
        from .evaluate import AttackConfig, evaluate

        c = self.config.evaluation
        pgd = AttackConfig(kind="pgd", norm=c.norm, eps=c.eps, step_size=c.step_size, steps=c.steps)
        out = {}
        for name in ("standard", "robust"):
            model = self.model(name)
            result = {
                "pgd": evaluate(
                    model,
                    take(self.test_split(), c.n),
                    attack=pgd,
                    batch_size=c.batch_size,
                    workers=self.config.workers,
                    progress=True,
                )
            }
            if c.autoattack_n:
                aa = AttackConfig(
                    kind="autoattack",
                    norm=c.norm,
                    eps=c.eps,
                    seed=self.config.seed,
                    autoattack_version=c.autoattack_version,
                    autoattack_attacks=c.autoattack_attacks,
                )
                result["autoattack"] = evaluate(
                    model,
                    take(self.test_split(), c.autoattack_n),
                    attack=aa,
                    batch_size=c.batch_size,
                    workers=self.config.workers,
                    shard_batches=1,
                    progress=True,
                )
            out[name] = result
        return out

    # Figs. 2/6, 10/13, 16/17 and the attribution metrics

    def attributions(self, folder: Path) -> dict[str, Any]:
        from .data import load_split, stack, take
        from .explain import (
            ExplainConfig,
            IGConfig,
            ShapConfig,
            choose_background,
            explain,
            plot_grid,
            plot_overlays,
            save,
        )

        c = self.config.attributions
        x, y = stack(take(self.test_split(), c.n))
        background = choose_background(load_split(self.config.data, "train"), c.shap_background, seed=self.config.seed)
        out = {}
        for method in ("ig", "shap"):
            config = ExplainConfig(
                method=method,
                workers=self.config.workers,
                target=c.target,
                num_cpus=self.config.cpus_per_task,
                num_gpus=self.gpus_per_task("attributions"),
                ig=IGConfig(steps=c.ig_steps, num_baselines=c.ig_baselines, seed=self.config.seed),
                shap=ShapConfig(nsamples=c.shap_nsamples, background=c.shap_background, seed=self.config.seed),
            )
            explanations = {
                name: explain(
                    self.model(name), x, y, config=config, background=background if method == "shap" else None
                )
                for name in ("standard", "robust")
            }
            sub = folder / method
            metrics = save(sub, explanations, labels=y.numpy())
            maps = {name: e.attributions for name, e in explanations.items()}
            captions = _attribution_captions(y, explanations, getattr(self.test_split(), "classes", None))
            plot_overlays(
                x[: c.overlays],
                {n: m[: c.overlays] for n, m in maps.items()},
                sub / "overlay.png",
                captions=captions[: c.overlays],
            )
            plot_grid(
                x,
                maps,
                sub / "grid.png",
                captions=captions,
                title=f"{method.upper()} of the {c.target} class: {self.config.name}",
            )
            out[method] = {
                "means": {name: metrics["models"][name]["mean"] for name in explanations},
                "difference": metrics.get("difference"),
                "target": c.target,
                "labels": y.tolist(),
                "targets": {name: e.targets.tolist() for name, e in explanations.items()},
                "figures": [str(sub / "overlay.png"), str(sub / "grid.png")],
            }
        return out

    # Tables 2/5, Figs. 3/7, 14/19

    def generation(self, folder: Path) -> dict[str, Any]:
        """Per model, class generation and FID as one streamed step: each shard's task writes its
        images to OUT/generation/<model>/shards/ (straight to OUT, which every node sees) and returns
        only their Inception statistics, added up in the driver as they arrive; the figures show the
        first images of each class. The real sets' statistics come from their own fan-out."""
        from .fid import fid_from_stats, open_source, source_stats
        from .generate import FIDFeatures, GenerationConfig, fit_seeds, generate, sample_images, save_generation_figures
        from .inception import PREPROCESSING, ROUNDING, load_fid_inception
        from .visualize import PGDSettings, generation_settings

        c = self.config.generation
        test = self.test_split()
        out: dict[str, Any] = {}
        inception = load_fid_inception()
        real = {"test": open_source(self.config.data, "test"), "train": self.real_images(folder)}
        stats = dict(
            zip(
                real,
                source_stats(
                    list(real.values()),
                    inception,
                    dims=c.fid_dims,
                    workers=self.config.workers,
                    preprocessing=c.fid_preprocess,
                ),
            )
        )
        features = FIDFeatures(inception, dims=c.fid_dims, preprocessing=c.fid_preprocess)
        for name in ("standard", "robust"):
            model = self.model(name)
            default = generation_settings(model.input_size)
            settings = PGDSettings(
                eps=c.eps or default.eps, step_size=c.step_size or default.step_size, steps=c.steps or default.steps
            )
            config = GenerationConfig(
                per_class=c.per_class,
                classes=tuple(range(model.num_classes)),
                seed=self.config.seed,
                shard_size=c.shard_size,
                batch_size=min(c.shard_size, 100),
                settings=settings,
                rounding=ROUNDING[c.fid_preprocess],
            )
            seeds = fit_seeds(test, num_classes=model.num_classes, pool=c.seed_pool)
            shards_at = self.out / "generation" / name
            made = generate(
                model,
                seeds,
                config=config,
                out_dir=shards_at,
                workers=self.config.workers,
                class_names=test.classes,
                fid=features,
                merge=False,
            )
            stats[name] = made["stats"]
            images, labels, starts = sample_images(shards_at, config, per_class=8)
            figures = save_generation_figures(
                folder / name, images, labels, starts, test.classes, title=f"{name} model: class-specific generation"
            )
            out[name] = {
                "images": made["images"],
                "shards": str(shards_at / "shards"),
                "settings": asdict(settings),
                "seed_pool": seeds.pool,
                "seed_dims": int(seeds.mean.shape[1]),
                "figures": [str(p) for p in figures],
            }
        out["fid"] = {
            "real (train vs test)": fid_from_stats(stats["train"], stats["test"]),
            **{name: fid_from_stats(stats[name], stats["test"]) for name in ("standard", "robust")},
        }
        out["n"] = {n: s.n for n, s in stats.items()}
        out["real_per_class"] = c.real_per_class
        out["dims"], out["weights_sha256"] = c.fid_dims, inception.weights_info.get("sha256")
        out["preprocessing"], out["resize"] = c.fid_preprocess, PREPROCESSING[c.fid_preprocess]
        return out

    def real_images(self, folder: Path):
        """The real-data FID's training images: generation.real_per_class of each class (seeded; fewer
        where a class has fewer), or the whole training split. A selection of the split by position,
        not a file: each FID task reads its own images from the dataset, which every node has (a file
        in this stage's folder would be on the driver's disk alone until the stage ends)."""
        from .data import load_split
        from .fid import open_source
        from .generate import per_class_sample

        c = self.config.generation
        train = open_source(self.config.data, "train")
        if c.real_per_class is None:
            return train
        labels = load_split(self.config.data, "train").labels
        return train.select(per_class_sample(labels, c.real_per_class, seed=self.config.seed))

    # Tables 3/6, Figs. 4/8, 11/18

    def inversion(self, folder: Path) -> dict[str, Any]:
        """Per run r (1, 2): out[f"inv{r}"] = {"target_index", "source_indices", "noise", "figure"} and per
        model out[name][f"inception192_inv{r}"] (the Inception-192 distance of Tables 3 / 6: the
        Frobenius norm over the run's batch) with out[name][f"inv{r}"] the per-image details."""
        from .fid import inception_distance
        from .generate import inversion_run_images, inversions, plan_inversion_run, save_inversion_figure, to_uint8
        from .inception import load_fid_inception
        from .visualize import PGDSettings

        c = self.config.inversion
        test = self.test_split()
        settings = PGDSettings(eps=c.eps, step_size=c.step_size, steps=c.steps)
        inception = load_fid_inception()
        out: dict[str, Any] = {"settings": asdict(settings), "protocol": asdict(c)}
        for r in range(1, c.runs + 1):
            plan = plan_inversion_run(
                test.labels, run=r, seed=self.config.seed, image_sources=c.image_sources, noise=c.noise
            )
            targets, sources = inversion_run_images(test, plan)
            inverted = {}
            for name in ("robust", "standard"):  # the paper's row order
                result = inversions(
                    self.model(name), sources, targets, settings=settings, workers=self.config.workers, chunk=1
                )
                per_image, batch = inception_distance(inception, targets, result["images"])
                inverted[name] = to_uint8(result["images"])
                out.setdefault(name, {})[f"inception192_inv{r}"] = batch
                out[name][f"inv{r}"] = {
                    "inception192_per_image": per_image.tolist(),
                    "representation_distance_before": result["distance_before"].tolist(),
                    "representation_distance_after": result["distance_after"].tolist(),
                }
            kinds = ["image"] * len(plan.source_indices) + ["noise"] * plan.noise
            path = save_inversion_figure(
                folder / f"inv{r}.png",
                to_uint8(targets),
                to_uint8(sources),
                inverted,
                title=f"Inv. {r}: representation inversion (sources: {', '.join(kinds)})",
            )
            out[f"inv{r}"] = {
                "target_index": plan.target_index,
                "target_label": int(test.labels[plan.target_index]),
                "source_indices": list(plan.source_indices),
                "noise": plan.noise,
                "noise_seed": plan.noise_seed,
                "figure": str(path),
            }
        return out

    # Figs. 5/9

    def features(self, folder: Path) -> dict[str, Any]:
        from .generate import dataset_representation, feature_visualisations, save_featvis_figure
        from .visualize import PGDSettings

        c = self.config.features
        test = self.test_split()
        test_images = test.images if hasattr(test, "images") else None
        generator = torch.Generator().manual_seed(self.config.seed)
        out = {}
        for name in ("standard", "robust"):
            model = self.model(name)
            k = model.representation_dim
            groups = [tuple(i % k for i in z) for z in c.features]  # the paper's indices, folded into R's size
            starts = torch.rand(c.starts, 3, model.input_size, model.input_size, generator=generator)
            result = feature_visualisations(
                model,
                starts,
                groups,
                dataset_representation(model, test),
                settings=PGDSettings(eps=c.eps, step_size=c.step_size, steps=c.steps),
                top=c.top,
                workers=self.config.workers,
                chunk=1,
            )
            if test_images is None:  # an ImageFolder: gather the shown images only
                from .generate import to_uint8

                shown = sorted(set(result["top"].flatten().tolist()) | set(result["bottom"].flatten().tolist()))
                test_images = np.zeros((len(test), model.input_size, model.input_size, 3), np.uint8)
                for i in shown:
                    test_images[i] = to_uint8(test[i][0][None])[0]
            path = save_featvis_figure(
                folder / f"{name}.png", result, test_images, title=f"{name} model: direct feature visualisation"
            )
            out[name] = {
                "features": [list(z) for z in groups],
                "objective_before": result["before"].tolist(),
                "objective_after": result["after"].tolist(),
                "top_test_labels": test.labels[result["top"].numpy()].tolist(),
                "figure": str(path),
            }
        return out

    # the whole study

    def run(self) -> Location:
        """Every stage not done yet, then the report; returns OUT/report.html."""
        from .distributed import init_ray
        from .storage import preflight

        init_ray()
        preflight(self.out)  # every node can write and read OUT, before anything is trained
        self.out.mkdir()
        results = {"train": self.stage("train", self.train, local=False)}
        results["evaluation"] = self.stage("evaluation", self.evaluate)
        results["attributions"] = self.stage("attributions", self.attributions)
        results["generation"] = self.stage("generation", self.generation)
        results["inversion"] = self.stage("inversion", self.inversion)
        results["features"] = self.stage("features", self.features)
        nodes = sorted({node for result in results.values() for node in result.get("_nodes", [])})
        return build_report(self, results, nodes)


def _relocated(value: Any, local: str, uri: str) -> Any:
    """value with every string that names a path under the local folder `local` renamed under `uri`."""
    if isinstance(value, dict):
        return {k: _relocated(v, local, uri) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_relocated(v, local, uri) for v in value)
    if isinstance(value, str) and (value == local or value.startswith(local + "/")):
        return uri + value[len(local) :]
    return value


def _attribution_captions(labels: torch.Tensor, explanations: dict[str, Any], classes) -> list[str]:
    """Per image: its label, then each model's explained class where that differs ("cat; robust: dog")."""
    name = lambda k: classes[k] if classes and k < len(classes) else str(k)  # noqa: E731
    captions = []
    for i, label in enumerate(labels.tolist()):
        other = [
            f"{model}: {name(int(e.targets[i]))}" for model, e in explanations.items() if int(e.targets[i]) != label
        ]
        captions.append("; ".join([name(label), *other]))
    return captions


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    return str(value)


# --- the report ---------------------------------------------------------------------------------


def _ci(m: dict[str, float]) -> str:
    return f"{m['mean']:.4g} [{m['ci_low']:.4g}, {m['ci_high']:.4g}]"


def _minus(ours: float | None, paper: float | None) -> float | None:
    return None if ours is None or paper is None else ours - paper


def run_settings(study: Study, results: dict[str, Any]) -> dict[str, Any]:
    """This run's values of the settings in PAPER[...]["settings"] (same keys), from the study config,
    the models' training configs and what the stages recorded."""
    from .data import load_split

    c, g = study.config, results["generation"]
    trained = {name: study.train_config(name) for name in ("standard", "robust") if getattr(c, name).train is not None}

    def per_model(value) -> str:  # "x" where both models agree, else "standard: x; robust: y"
        values = {name: value(name) for name in ("standard", "robust")}
        return (
            str(values["standard"])
            if values["standard"] == values["robust"]
            else "; ".join(f"{k}: {v}" for k, v in values.items())
        )

    def train_value(name: str, read) -> Any:
        return read(trained[name]) if name in trained else f"checkpoint ({getattr(c, name).checkpoint})"

    robust = trained.get("robust")
    e, a, inv, feat = c.evaluation, c.attributions, c.inversion, c.features
    generation = g["robust"]["settings"]
    return {
        "architecture": per_model(lambda name: study.model(name).arch),
        "training images": len(load_split(c.data, "train")),
        "epochs": per_model(lambda name: train_value(name, lambda cfg: cfg.epochs)),
        "batch size": per_model(lambda name: train_value(name, lambda cfg: cfg.batch_size)),
        "robust training PGD": _pgd(robust.pgd.norm, robust.pgd.eps, robust.pgd.step_size, robust.pgd.steps)
        if robust
        else f"checkpoint ({c.robust.checkpoint})",
        "test images (clean, PGD)": results["evaluation"]["robust"]["pgd"]["n"],
        "evaluation PGD": _pgd(e.norm, e.eps, e.step_size, e.steps),
        "AutoAttack images": (results["evaluation"]["robust"].get("autoattack") or {}).get("n", 0),
        "explained images": a.n,
        "explained class": a.target,
        "IG baselines x steps": f"{a.ig_baselines} x {a.ig_steps}",
        "SHAP samples, background": f"{a.shap_nsamples}, {a.shap_background}",
        "generated images a class": c.generation.per_class,
        "generation PGD": _pgd("l2", generation["eps"], generation["step_size"], generation["steps"]),
        "class seeds pooled by": g["robust"]["seed_pool"],
        "real-data FID images (train vs test)": f"{g['n']['train']} vs {g['n']['test']}",
        "generated-image FID images (generated vs test)": f"{g['n']['robust']} vs {g['n']['test']}",
        "inversion PGD": _pgd("l2", inv.eps, inv.step_size, inv.steps),
        "inversion runs": inv.runs,
        "feature visualisation PGD": _pgd("l2", feat.eps, feat.step_size, feat.steps),
    }


def build_report(study: Study, results: dict[str, Any], nodes: list[str]) -> Location:
    from .report import Section, Table, code_version, hardware, training_curves_png, write_report

    c, paper = study.config, PAPER[study.config.paper]
    number = paper["numbers"]
    models = ("standard", "robust")
    sections = []

    settings = run_settings(study, results)
    rows = [
        [key, paper["settings"][key], ours, "same" if str(ours) == str(paper["settings"][key]) else "differs"]
        for key, ours in settings.items()
    ]
    sections.append(
        Section(
            "How this run differs from the paper",
            "Every setting of the paper's experiment (its section 3 and its author's code) beside this run's, as "
            "configured and as the stages recorded them. Where they differ, the figures below are not the paper's "
            "experiment and compare the two models with each other, not with the paper's numbers.",
            [Table("Settings", ["setting", "paper", "this run", ""], rows)],
        )
    )

    train = results["train"]
    histories = {name: train[name]["epochs"] for name in models if train[name].get("epochs")}
    rows = [
        [
            name,
            row.get("epoch"),
            row.get("train_loss"),
            row.get("train_accuracy"),
            row.get("val_clean_accuracy"),
            row.get("val_adversarial_accuracy"),
        ]
        for name in histories
        for row in histories[name]
    ]
    figures = []
    if histories:
        curves = (study.out / "report_training_curves.png").write_bytes(training_curves_png(histories))
        figures.append(("training loss, validation clean and PGD accuracy per epoch", curves))
    sections.append(
        Section(
            "Training",
            "Per epoch, on the validation split carved out of the training set; "
            "the best epoch is kept: by clean validation accuracy for the standard model and by "
            "mean(clean, PGD) for the robust one, as the authors' two trainers select.",
            [Table("Training curves", ["model", "epoch", "train loss", "train acc", "val clean", "val PGD"], rows)]
            if rows
            else [],
            figures,
        )
    )

    ev = results["evaluation"]
    rows = []
    for name in models:
        pgd, aa = ev[name]["pgd"], ev[name].get("autoattack")
        clean, robust = 100 * pgd["clean_accuracy"], 100 * pgd["adversarial_accuracy"]
        (paper_clean, paper_pgd) = paper["accuracy"][name]
        rows.append(
            [
                name,
                pgd["n"],
                clean,
                paper_clean,
                _minus(clean, paper_clean),
                robust,
                paper_pgd,
                _minus(robust, paper_pgd),
                None if aa is None else 100 * aa["adversarial_accuracy"],
                None if aa is None else aa["n"],
            ]
        )
    e = c.evaluation
    sections.append(
        Section(
            f"Accuracy ({number['accuracy']})",
            f"Test split of {c.data}. PGD: {e.norm.upper()}, eps {e.eps}, step {e.step_size}, {e.steps} steps, "
            f"no random start, last iterate (the paper's). AutoAttack ({e.autoattack_version}"
            f"{': ' + ', '.join(e.autoattack_attacks) if e.autoattack_attacks else ''}) on the first images, "
            "the honest robust figure (not in the paper).",
            [
                Table(
                    "Accuracy (%)",
                    [
                        "model",
                        "n",
                        "clean (ours)",
                        "clean (paper)",
                        "ours - paper",
                        "PGD (ours)",
                        "PGD (paper)",
                        "ours - paper",
                        "AutoAttack (ours)",
                        "AutoAttack n",
                    ],
                    rows,
                )
            ],
        )
    )

    for method, title, grid in (
        ("ig", "Integrated Gradients", "ig_grid"),
        ("shap", "SHAP expected gradients", "shap_grid"),
    ):
        a = results["attributions"][method]
        metrics = ["deletion_auc", "insertion_auc", "gini", "top_mass"]
        rows = [[name] + [_ci(a["means"][name][m]) for m in metrics] for name in models]
        if a.get("difference"):
            rows.append(
                ["robust - standard"]
                + [_ci(a["difference"][m]) + f" p={a['difference'][m]['p_value']:.2g}" for m in metrics]
            )
        sections.append(
            Section(
                f"{title} ({number['overlays']}, {number[grid]})",
                f"Each model's attribution of its {a.get('target', 'predicted')} class. Per model, the mean over the "
                "explained test images with a 95 % interval. Deletion AUC: lower is more faithful; insertion AUC: "
                "higher is; Gini and top-5 % mass: higher is more concentrated. The paper shows these figures "
                "without metrics.",
                [Table("Attribution metrics", ["model", *metrics], rows)],
                [
                    (f"{number['overlays']}: overlays: image | standard | robust", Location(a["figures"][0])),
                    (
                        f"{number[grid]}: the explained images, 8 x 3 (A-H x 1-3): image | standard | robust",
                        Location(a["figures"][1]),
                    ),
                ],
            )
        )

    g = results["generation"]
    rows = [
        [
            "real data (train vs test)",
            g["fid"]["real (train vs test)"],
            paper["fid"]["real"],
            _minus(g["fid"]["real (train vs test)"], paper["fid"]["real"]),
            g["n"]["train"],
        ]
    ]
    rows += [
        [f"{name} model", g["fid"][name], paper["fid"][name], _minus(g["fid"][name], paper["fid"][name]), g["n"][name]]
        for name in models
    ]
    figures = [
        (f"{number[kind]}: {name} model: {what}", Location(path))
        for name in models
        for kind, what, path in zip(("classes", "seeds"), ("generated classes", "their seeds"), g[name]["figures"])
    ]
    sections.append(
        Section(
            f"Class-specific generation and FID ({number['fid']}, {number['classes']}, {number['seeds']})",
            f"FID ({g['dims']}-d, {g['resize']}) against the {g['n']['test']} test images. With fewer images FID is "
            "biased upward (the paper used 10,000 CIFAR-10 / 9,000 Small ImageNet images): compare the rows with each "
            "other rather than with the paper's figures.",
            [Table("FID (lower is better)", ["images", "FID (ours)", "FID (paper)", "ours - paper", "n"], rows)],
            figures,
        )
    )

    inv = results["inversion"]
    runs = [r for r in (1, 2) if f"inv{r}" in inv]
    header, rows = ["model"], [[name] for name in models]
    for r in runs:
        key = "inception192" if r == 1 else "inception192_inv2"
        header += [f"Inv. {r} (ours)", f"Inv. {r} (paper)", "ours - paper"]
        for row, name in zip(rows, models):
            row += [
                inv[name][f"inception192_inv{r}"],
                paper[key][name],
                _minus(inv[name][f"inception192_inv{r}"], paper[key][name]),
            ]
    sections.append(
        Section(
            f"Representation inversion ({number['inversion']}, {number['inv1']}, {number['inv2']})",
            "Each run inverts one test image from two test images of other classes and one grey-noise image "
            "(0.5 + U/20), as the authors' notebooks; Inv. 2 is a second draw. Inception-192 distance between the "
            "original and the inverted images: the Frobenius norm over the run's batch of 3, as the authors "
            "computed it.",
            [Table("Inception-192 distance (lower is closer)", header, rows)],
            [
                (
                    f"Inv. {r} ({number[f'inv{r}']}): target | source | robust | standard",
                    Location(inv[f"inv{r}"]["figure"]),
                )
                for r in runs
            ],
        )
    )

    feat = results["features"]
    rows = [
        [
            name,
            str(feat[name]["features"]),
            float(np.mean(feat[name]["objective_before"])),
            float(np.mean(feat[name]["objective_after"])),
        ]
        for name in models
    ]
    sections.append(
        Section(
            f"Direct feature visualisation ({number['features']})",
            "",
            [Table("Feature visualisation", ["model", "features", "objective before", "objective after"], rows)],
            [
                (
                    f"{number['features']}: {name} model: visualisations, most and least activating test images",
                    Location(feat[name]["figure"]),
                )
                for name in models
            ],
        )
    )

    timings = dict(study.timings)
    data = {
        "config": asdict(c),
        "code_version": code_version(),
        "hardware": hardware(),
        "timings_s": timings,
        "nodes_used": nodes,
        "paper": paper,
        "run_settings": settings,
        "results": results,
    }
    sections.insert(
        0,
        Section(
            "Run",
            f"{c.name}: data {c.data}, {c.workers} workers. Ray tasks ran on {len(nodes)} node(s).",
            [
                Table("Time per stage", ["stage", "seconds"], [[k, v] for k, v in timings.items()]),
                Table(
                    "Code and hardware",
                    ["what", "value"],
                    [[k, v] for k, v in {**data["code_version"], **data["hardware"]}.items()],
                ),
            ],
        ),
    )
    return write_report(
        study.out,
        title=f"robint_ray: {c.name}",
        sections=sections,
        data=json.loads(json.dumps(data, default=_jsonable)),
    )
