"""Stage 6, Figs. 5 / 9 (12 / 15): direct feature visualisation of both models, with the test images
that activate each feature most and least."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..generate import dataset_representation, feature_visualisations, save_featvis_figure, to_uint8
from ..report import Section, Table
from ..storage import Location

if TYPE_CHECKING:
    from .core import Study

NAME = "features"
MODELS = ("standard", "robust")


def run(study: Study, folder: Path) -> dict[str, Any]:
    """Per model: the features visualised (the paper's indices folded into R's size), the objective
    before and after, the labels of the most activating test images, and the figure."""
    c, test = study.config.features, study.test_split()
    generator = torch.Generator().manual_seed(study.config.seed)
    out = {}
    for name in MODELS:
        model = study.model(name)
        k = model.representation_dim
        groups = [tuple(i % k for i in z) for z in c.features]
        starts = torch.rand(c.starts, 3, model.input_size, model.input_size, generator=generator)
        result = feature_visualisations(
            model,
            starts,
            groups,
            dataset_representation(model, test),
            settings=c.pgd,
            top=c.top,
            tasks=study.tasks(NAME),
            chunk=1,
        )
        title = f"{name} model: direct feature visualisation"
        path = save_featvis_figure(folder / f"{name}.png", result, _shown_images(test, result), title=title)
        out[name] = {
            "features": [list(z) for z in groups],
            "objective_before": result["before"].tolist(),
            "objective_after": result["after"].tolist(),
            "top_test_labels": test.labels[result["top"].numpy()].tolist(),
            "figure": str(path),
        }
    return out


def _shown_images(test, result: dict[str, Any]) -> np.ndarray:
    """The test split as uint8 (N, H, W, C) for the figure: an array split's own images, or for an
    ImageFolder only the images the figure shows (the rest left black)."""
    if hasattr(test, "images"):
        return test.images
    shown = sorted(set(result["top"].flatten().tolist()) | set(result["bottom"].flatten().tolist()))
    size = test[0][0].shape[-1]
    images = np.zeros((len(test), size, size, 3), np.uint8)
    for i in shown:
        images[i] = to_uint8(test[i][0][None])[0]
    return images


def sections(study: Study, results: dict[str, Any], paper: dict[str, Any]) -> list[Section]:
    """The objective before and after per model, and each model's figure."""
    feat, number = results[NAME], paper["numbers"]["features"]
    objective = {
        name: [float(np.mean(feat[name][f"objective_{when}"])) for when in ("before", "after")] for name in MODELS
    }
    rows = [[name, str(feat[name]["features"]), *objective[name]] for name in MODELS]
    figures = [
        (
            f"{number}: {name} model: visualisations, most and least activating test images",
            Location(feat[name]["figure"]),
        )
        for name in MODELS
    ]
    return [
        Section(
            f"Direct feature visualisation ({number})",
            "",
            [Table("Feature visualisation", ["model", "features", "objective before", "objective after"], rows)],
            figures,
        )
    ]
