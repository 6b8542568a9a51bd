"""Stage 5, Tables 3 / 6 and Figs. 4 / 8, 11 / 18: representation inversion (the authors' Inv. 1 and
Inv. 2) and the Inception-192 distance between the originals and their inversions."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import fid, inception
from ..config import flat_record
from ..generate import inversion_run_images, inversions, plan_inversion_run, save_inversion_figure, to_uint8
from ..report import Section, Table, difference
from ..storage import Location

if TYPE_CHECKING:
    from .core import Study

NAME = "inversion"
MODELS = ("standard", "robust")
PAPER_KEYS = {1: "inception192", 2: "inception192_inv2"}  # each run's row of PAPER


def run(study: Study, folder: Path) -> dict[str, Any]:
    """Per run r (1, 2): out[f"inv{r}"] = {"target_index", "source_indices", "noise", "figure"} and per
    model out[name][f"inception192_inv{r}"] (the Inception-192 distance of Tables 3 / 6: the
    Frobenius norm over the run's batch) with out[name][f"inv{r}"] the per-image details. The
    Inception's input is made as generation.fid_preprocess says ("author": the author's truncation to
    uint8 and resize on uint8, as his Inception-192 cell), recorded in out["preprocessing"]."""
    c, test = study.config.inversion, study.test_split()
    settings = c.pgd
    extractor = inception.load_fid_inception()
    preprocessing = study.config.generation.fid_preprocess  # one Inception input for FID and this distance
    out: dict[str, Any] = {
        "settings": asdict(settings),
        "protocol": flat_record(c),
        "preprocessing": preprocessing,
        "resize": inception.PREPROCESSING[preprocessing],
    }
    for r in range(1, c.runs + 1):
        plan = plan_inversion_run(
            test.labels, run=r, seed=study.config.seed, image_sources=c.image_sources, noise=c.noise
        )
        targets, sources = inversion_run_images(test, plan)
        inverted = {}
        for name in ("robust", "standard"):  # the paper's row order
            result = inversions(
                study.model(name), sources, targets, settings=settings, tasks=study.tasks(NAME), chunk=1
            )
            per_image, batch = fid.inception_distance(extractor, targets, result["images"], preprocessing=preprocessing)
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


def sections(study: Study, results: dict[str, Any], paper: dict[str, Any]) -> list[Section]:
    """The Inception-192 distances beside the paper's, and each run's figure."""
    inv, number = results[NAME], paper["numbers"]
    runs = [r for r in PAPER_KEYS if f"inv{r}" in inv]
    header, rows = ["model"], [[name] for name in MODELS]
    for r in runs:
        header += [f"Inv. {r} (ours)", f"Inv. {r} (paper)", "ours - paper"]
        for row, name in zip(rows, MODELS):
            ours, theirs = inv[name][f"inception192_inv{r}"], paper[PAPER_KEYS[r]][name]
            row += [ours, theirs, difference(ours, theirs)]
    figures = [
        (f"Inv. {r} ({number[f'inv{r}']}): target | source | robust | standard", Location(inv[f"inv{r}"]["figure"]))
        for r in runs
    ]
    preprocessing = inv.get("preprocessing", "robint")  # results from before it was recorded: robint's
    return [
        Section(
            f"Representation inversion ({number['inversion']}, {number['inv1']}, {number['inv2']})",
            "Each run inverts one test image from two test images of other classes and one grey-noise image "
            "(0.5 + U/20), as the authors' notebooks; Inv. 2 is a second draw. Inception-192 distance between "
            "the original and the inverted images: the Frobenius norm over the run's batch of 3, as the "
            f"authors computed it; Inception input: {preprocessing} "
            "(generation.fid_preprocess).",
            [Table("Inception-192 distance (lower is closer)", header, rows)],
            figures,
        )
    ]
