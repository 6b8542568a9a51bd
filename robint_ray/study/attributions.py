"""Stage 3, Figs. 2 / 6, 10 / 13 and 16 / 17: IG and SHAP attributions of both models on test images
drawn across the classes, their overlay and grid figures, and the attribution metrics (not in the paper)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data import load_split, spread_over_classes, stack
from ..explain import (
    ExplainConfig,
    IGConfig,
    ShapConfig,
    choose_background,
    explain,
    grid_cell,
    plot_grid,
    plot_overlays,
    save,
)
from ..report import Section, Table
from ..storage import Location

if TYPE_CHECKING:
    from .config import AttributionStage
    from .core import Study

NAME = "attributions"
MODELS = ("standard", "robust")
METHODS = {"ig": ("Integrated Gradients", "ig_grid"), "shap": ("SHAP expected gradients", "shap_grid")}
METRICS = ("deletion_auc", "insertion_auc", "gini", "top_mass")


def run(study: Study, folder: Path) -> dict[str, Any]:
    """Per method ("ig", "shap"): each model's mean metrics, the robust - standard difference, the
    explained class of each image per model, and the two figures (in folder/<method>/); "images": the
    explained images (test index and class) and where SHAP's background came from.

    The explained images are drawn seeded and spread over the classes (`data.spread_over_classes`); with
    `background: test` (the authors': one shuffled test batch of 200, 176 background + 24 explained)
    the background is the next shap_background images of the same draw, so never an explained one."""
    c, seed = study.config.attributions, study.config.seed
    test = study.test_split()
    explained, background = explained_and_background(test, study.config.data, c, seed=seed)
    x, y = stack(explained)
    out: dict[str, Any] = {
        "images": {
            "index": explained.indices.tolist(),
            "class": [explained.classes[k] for k in explained.labels.tolist()],
            "background": {"split": c.background, "n": len(background)},
            "classes": list(test.classes),
        }
    }
    for method in METHODS:
        config = ExplainConfig(
            method=method,
            target=c.target,
            ig=IGConfig(steps=c.ig_steps, num_baselines=c.ig_baselines, seed=seed),
            shap=ShapConfig(nsamples=c.shap_nsamples, background=c.shap_background, seed=seed),
        )
        explanations = {
            name: explain(
                study.model(name),
                x,
                y,
                config=config,
                background=background if method == "shap" else None,
                tasks=study.tasks(NAME),
            )
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


def explained_and_background(test, data: str, c: AttributionStage, *, seed: int):
    """(the explained test images, SHAP's background (B, C, H, W)): n test images drawn seeded across
    the classes; the background the shap_background images after them in the same draw (`test`, the
    authors') or a seeded draw of the training split of `data` (`train`)."""
    extra = c.shap_background if c.background == "test" else 0
    drawn = spread_over_classes(test.labels, c.n + extra, seed=seed)
    explained = test.subset(drawn[: c.n], test.transform)
    if c.background == "test":
        return explained, stack(test.subset(drawn[c.n :], test.transform))[0]
    return explained, choose_background(load_split(data, "train"), c.shap_background, seed=seed)


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
    number, out = paper["numbers"], [_images_section(results[NAME])]
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


def _images_section(result: dict[str, Any]) -> Section:
    """Which test images were explained (grid cell, test index, class, each model's explained class)
    and where SHAP's background came from."""
    images = result.get("images")
    if images is None:  # a result from before the images were recorded
        return Section("Explained images", "Not recorded by this run.", [])
    targets = result["ig"]["targets"]
    rows = [
        [grid_cell(i)[2], index, name, *(images["classes"][targets[model][i]] for model in MODELS)]
        for i, (index, name) in enumerate(zip(images["index"], images["class"]))
    ]
    background = images["background"]
    where = (
        "the test images after the explained ones in the same draw (the authors')"
        if background["split"] == "test"
        else "a seeded draw of the training split"
    )
    return Section(
        "Explained images",
        f"{len(rows)} test images drawn seeded across {len(set(images['class']))} classes; their cells in the "
        f"grids below; each model's explained class (IG). SHAP's background: {background['n']} images, "
        f"{where}.",
        [Table("Explained images", ["cell", "test index", "class", *(f"{m} explains" for m in MODELS)], rows)],
    )


def _interval(m: dict[str, float]) -> str:
    return f"{m['mean']:.4g} [{m['ci_low']:.4g}, {m['ci_high']:.4g}]"
