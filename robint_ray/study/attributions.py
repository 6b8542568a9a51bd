"""Stage 3, Figs. 2 / 6, 10 / 13 and 16 / 17: IG and SHAP attributions of both models on the first
test images, their overlay and grid figures, and the attribution metrics (not in the paper)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data import load_split, stack, take
from ..explain import ExplainConfig, IGConfig, ShapConfig, choose_background, explain, plot_grid, plot_overlays, save
from ..report import Section, Table
from ..storage import Location

if TYPE_CHECKING:
    from .core import Study

NAME = "attributions"
MODELS = ("standard", "robust")
METHODS = {"ig": ("Integrated Gradients", "ig_grid"), "shap": ("SHAP expected gradients", "shap_grid")}
METRICS = ("deletion_auc", "insertion_auc", "gini", "top_mass")


def run(study: Study, folder: Path) -> dict[str, Any]:
    """Per method ("ig", "shap"): each model's mean metrics, the robust - standard difference, the
    explained class of each image per model, and the two figures (in folder/<method>/)."""
    c, seed = study.config.attributions, study.config.seed
    test = study.test_split()
    x, y = stack(take(test, c.n))
    background = choose_background(load_split(study.config.data, "train"), c.shap_background, seed=seed)
    out = {}
    for method in METHODS:
        config = ExplainConfig(
            method=method,
            workers=study.config.workers,
            target=c.target,
            num_cpus=study.config.cpus_per_task,
            num_gpus=study.gpus_per_task(NAME),
            ig=IGConfig(steps=c.ig_steps, num_baselines=c.ig_baselines, seed=seed),
            shap=ShapConfig(nsamples=c.shap_nsamples, background=c.shap_background, seed=seed),
        )
        explanations = {
            name: explain(study.model(name), x, y, config=config, background=background if method == "shap" else None)
            for name in MODELS
        }
        sub = folder / method
        metrics = save(sub, explanations, labels=y.numpy())
        maps = {name: e.attributions for name, e in explanations.items()}
        captions = _captions(y, explanations, getattr(test, "classes", None))
        overlays = {name: m[: c.overlays] for name, m in maps.items()}
        plot_overlays(x[: c.overlays], overlays, sub / "overlay.png", captions=captions[: c.overlays])
        title = f"{method.upper()} of the {c.target} class: {study.config.name}"
        plot_grid(x, maps, sub / "grid.png", captions=captions, title=title)
        out[method] = {
            "means": {name: metrics["models"][name]["mean"] for name in explanations},
            "difference": metrics.get("difference"),
            "target": c.target,
            "labels": y.tolist(),
            "targets": {name: e.targets.tolist() for name, e in explanations.items()},
            "figures": [str(sub / "overlay.png"), str(sub / "grid.png")],
        }
    return out


def _captions(labels: torch.Tensor, explanations: dict[str, Any], classes) -> list[str]:
    """Per image: its label, then each model's explained class where that differs ("cat; robust: dog")."""
    name = lambda k: classes[k] if classes and k < len(classes) else str(k)  # noqa: E731
    captions = []
    for i, label in enumerate(labels.tolist()):
        other = [
            f"{model}: {name(int(e.targets[i]))}" for model, e in explanations.items() if int(e.targets[i]) != label
        ]
        captions.append("; ".join([name(label), *other]))
    return captions


def sections(study: Study, results: dict[str, Any], paper: dict[str, Any]) -> list[Section]:
    """One section a method: the metrics with 95 % intervals, the overlays and the grid."""
    number, out = paper["numbers"], []
    for method, (title, grid) in METHODS.items():
        a = results[NAME][method]
        rows = [[name] + [_interval(a["means"][name][m]) for m in METRICS] for name in MODELS]
        if a.get("difference"):
            d = a["difference"]
            rows.append(["robust - standard"] + [_interval(d[m]) + f" p={d[m]['p_value']:.2g}" for m in METRICS])
        out.append(
            Section(
                f"{title} ({number['overlays']}, {number[grid]})",
                f"Each model's attribution of its {a.get('target', 'predicted')} class. Per model, the mean over "
                "the explained test images with a 95 % interval. Deletion AUC: lower is more faithful; insertion "
                "AUC: higher is; Gini and top-5 % mass: higher is more concentrated. The paper shows these "
                "figures without metrics.",
                [Table("Attribution metrics", ["model", *METRICS], rows)],
                [
                    (f"{number['overlays']}: overlays: image | standard | robust", Location(a["figures"][0])),
                    (
                        f"{number[grid]}: the explained images, 8 x 3 (A-H x 1-3): image | standard | robust",
                        Location(a["figures"][1]),
                    ),
                ],
            )
        )
    return out


def _interval(m: dict[str, float]) -> str:
    return f"{m['mean']:.4g} [{m['ci_low']:.4g}, {m['ci_high']:.4g}]"
