"""The study's report: how the run differs from the paper, each stage's sections (beside the stage, in
its own module), and the run's time, code and hardware. OUT/report.html and OUT/report.json."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..config import PGDSettings, TrainConfig
from ..data import holdout_indices, load_split
from ..report import Section, Table, code_version, hardware, write_report
from ..storage import Location
from ..train import load_data
from . import claims
from .config import PAPER

if TYPE_CHECKING:
    from .core import Study

MODELS = ("standard", "robust")


def build_report(study: Study, results: dict[str, Any], nodes: list[str], stages: Sequence[ModuleType]) -> Location:
    """The report of a study whose `stages` (modules with NAME and sections(), in order) returned
    `results` (by stage name); Ray ran on `nodes`."""
    c, paper = study.config, PAPER[study.config.paper]
    images = images_used(study, results)
    settings = run_settings(study, results, images)
    tested = claims.claims(results, paper)
    data = {
        "config": asdict(c),
        "code_version": code_version(),
        "hardware": hardware(),
        "timings_s": dict(study.timings),
        "nodes_used": nodes,
        "paper": paper,
        "run_settings": settings,
        "claims": tested,
        "images": images,
        "results": results,
    }
    sections = [run_section(study, data), claims.section(tested), settings_section(settings, paper["settings"])]
    for stage in stages:
        sections += stage.sections(study, results, paper)
    return write_report(
        study.out,
        title=f"robint_ray: {c.name}",
        sections=sections,
        data=portable(json.loads(json.dumps(data, default=jsonable)), study.out),
    )


def portable(value: Any, out: Location) -> Any:
    """report.json without the running machine's paths: paths under OUT as "./...", other local
    absolute paths that exist (the data, the configs) relative to OUT ("../../cpu/...")."""
    if isinstance(value, dict):
        return {k: portable(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, out) for v in value]
    if not (isinstance(value, str) and value.startswith("/") and out.is_local):
        return value
    if value == out.uri or value.startswith(out.uri + "/"):
        return "." + value[len(out.uri) :]
    if Path(value).exists():
        return os.path.relpath(value, out.uri)
    return value


def run_section(study: Study, data: dict[str, Any]) -> Section:
    """The run: data, workers, nodes, each stage's time, the code's version and the hardware."""
    c, timings = study.config, data["timings_s"]
    about = {**data["code_version"], **data["hardware"]}
    return Section(
        "Run",
        f"{c.name}: data {study.shown(c.data)}, {c.workers} worker(s). Ray tasks ran on {len(data['nodes_used'])} "
        "node(s).",
        [
            Table("Time per stage", ["stage", "seconds"], [[k, v] for k, v in timings.items()]),
            Table("Code and hardware", ["what", "value"], [[k, v] for k, v in about.items()]),
        ],
    )


def settings_section(ours: dict[str, Any], paper: dict[str, Any]) -> Section:
    """Every setting of the paper beside the run's, "same" or "differs"."""
    rows = [
        [key, paper[key], value, "same" if str(value) == str(paper[key]) else "differs"] for key, value in ours.items()
    ]
    return Section(
        "How this run differs from the paper",
        "Every setting of the paper's experiment (its section 3 and its author's code) beside this run's, as "
        "configured and as the stages recorded them. Where they differ, the figures below are not the paper's "
        "experiment and compare the two models with each other, not with the paper's numbers.",
        [Table("Settings", ["setting", "paper", "this run", ""], rows)],
    )


def training_images(cfg: TrainConfig) -> dict[str, int]:
    """The training images of a run: the training split's size (`split`), its fit part (`fit`) and the
    part held out of it for model selection (`held_out`), how many of the fit part it trained on
    (`trained_on`: data.train_n's draw, else all) and how many held-out images it evaluated each epoch
    (`per_epoch`: data.val_n's draw, the same every epoch, else all)."""
    train = load_split(cfg.data.path, "train")
    fit, held_out = holdout_indices(train.labels, val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed)
    return {
        "split": len(train),
        "fit": len(fit),
        "held_out": len(held_out),
        "trained_on": len(load_data(cfg, "fit")),
        "per_epoch": len(load_data(cfg, "val")),
    }


def images_used(study: Study, results: dict[str, Any]) -> dict[str, Any]:
    """Per model trained here, training_images(its config); and the test split's size beside the images
    the evaluation's PGD used (`test`: {"split", "evaluated"})."""
    c, seen = study.config, {}
    out: dict[str, Any] = {}
    for name in MODELS:
        if getattr(c, name).train is not None:
            cfg = study.train_config(name)
            key = (cfg.data, cfg.seed)  # both models usually draw the same images: count them once
            if key not in seen:
                seen[key] = training_images(cfg)
            out[name] = seen[key]
    evaluated = results["evaluation"]["robust"]["pgd"]["n"]
    out["test"] = {"split": len(study.test_split()), "evaluated": evaluated}
    return out


def part_of(part: int, whole: int) -> str:
    """The part's size alone where it is the whole, else "part of whole"."""
    return str(part) if part == whole else f"{part} of {whole}"


def describe_training_images(images: dict[str, int]) -> str:
    """training_images' counts in words: "800 (fit part: 800 + 200 held out = the training split's 1000)"."""
    trained_on = part_of(images["trained_on"], images["fit"])
    parts = f"fit part: {images['fit']} + {images['held_out']} held out = the training split's {images['split']}"
    return f"{trained_on} ({parts})"


def describe_validation_images(images: dict[str, int]) -> str:
    """training_images' validation counts in words: "2000 of 4500 held out, the same each epoch"."""
    return f"{part_of(images['per_epoch'], images['held_out'])} held out, the same each epoch"


def run_settings(study: Study, results: dict[str, Any], images: dict[str, Any]) -> dict[str, Any]:
    """This run's values of the settings in PAPER[...]["settings"] (same keys), from the study config,
    the models' training configs, the images they used (`images_used`) and what the stages recorded."""
    c, g = study.config, results["generation"]
    trained = {name: study.train_config(name) for name in MODELS if getattr(c, name).train is not None}

    def per_model(read) -> str:  # "x" where both models agree, else "standard: x; robust: y"
        values = {name: read(name) for name in MODELS}
        if values["standard"] == values["robust"]:
            return str(values["standard"])
        return "; ".join(f"{k}: {v}" for k, v in values.items())

    def train_value(name: str, read) -> Any:
        return read(trained[name]) if name in trained else f"checkpoint ({getattr(c, name).checkpoint})"

    robust = trained.get("robust")
    a, test = c.attributions, images["test"]

    def batch_norm(cfg) -> str:
        if c.workers == 1 or cfg.sync_batch_norm:
            return "the whole batch"
        return f"{cfg.batch_size // c.workers} images a worker"

    return {
        "architecture": per_model(lambda name: study.model(name).arch),
        "initial weights": per_model(
            lambda name: train_value(name, lambda cfg: f"{Path(cfg.init).name} (given)" if cfg.init else "random")
        ),
        "training images": per_model(lambda name: train_value(name, lambda _: describe_training_images(images[name]))),
        "validation images per epoch": per_model(
            lambda name: train_value(name, lambda _: describe_validation_images(images[name]))
        ),
        "epochs": per_model(lambda name: train_value(name, lambda cfg: cfg.epochs)),
        "batch size": per_model(lambda name: train_value(name, lambda cfg: cfg.batch_size)),
        "gradient clipping": per_model(
            lambda name: train_value(name, lambda cfg: f"+-{cfg.grad_clip:g} per value" if cfg.grad_clip else "none")
        ),
        "batch norm over": per_model(lambda name: train_value(name, batch_norm)),
        "robust training PGD": robust.pgd.describe() if robust else f"checkpoint ({c.robust.checkpoint})",
        "test images (clean, PGD)": part_of(test["evaluated"], test["split"]),
        "evaluation PGD": c.evaluation.pgd.describe(),
        "AutoAttack images": (results["evaluation"]["robust"].get("autoattack") or {}).get("n", 0),
        "explained images": a.n,
        "explained class": a.target,
        "IG baselines x steps": f"{a.ig_baselines} x {a.ig_steps}",
        "SHAP samples, background": f"{a.shap_nsamples}, {a.shap_background}",
        "SHAP background from": a.background,
        "generated images a class": c.generation.per_class,
        "generation PGD": PGDSettings(**g["robust"]["settings"]).describe(),
        "class seeds pooled by": g["robust"]["seed_pool"],
        "real-data FID images (train vs test)": f"{g['n']['train']} vs {g['n']['test']}",
        "generated-image FID images (generated vs test)": f"{g['n']['robust']} vs {g['n']['test']}",
        "inversion PGD": c.inversion.pgd.describe(),
        "inversion runs": c.inversion.runs,
        "feature visualisation PGD": c.features.pgd.describe(),
    }


def jsonable(value: Any) -> Any:
    """json.dumps' default: numpy and torch values as plain numbers and lists, anything else as text."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    return str(value)
