"""The study's report from recorded stage results: the paper's tables beside ours with the difference,
the training curves as a figure, and the section that says how the run differs from the paper."""

from __future__ import annotations

import json
import re
import shutil
from html import unescape
from pathlib import Path

import torch
from PIL import Image

from robint_ray.config import TrainConfig
from robint_ray.models import build_model
from robint_ray.study import PAPER, ModelSource, Study, StudyConfig
from robint_ray.study.report import describe_training_images, describe_validation_images, training_images

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke"
MODELS = ("standard", "robust")


def png(path: Path) -> str:
    Image.new("RGB", (24, 16), (200, 40, 40)).save(path)
    return str(path)


def recorded_results(folder: Path) -> dict:
    """Stage results of the shape the stages write, with small figures."""
    ci = {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6}
    history = [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "train_accuracy": 0.2 * e,
            "val_clean_accuracy": 0.25 * e,
            "val_adversarial_accuracy": 0.1 * e,
            "best_epoch": 2,
        }
        for e in (1, 2, 3)
    ]
    settings = {"eps": 30.0, "step_size": 0.5, "steps": 60}
    return {
        "train": {name: {"checkpoint": "unused", "epochs": history} for name in MODELS},
        "evaluation": {
            "standard": {
                "pgd": {"n": 200, "clean_accuracy": 0.38, "adversarial_accuracy": 0.195},
                "autoattack": {"n": 50, "adversarial_accuracy": 0.22},
            },
            "robust": {
                "pgd": {"n": 200, "clean_accuracy": 0.30, "adversarial_accuracy": 0.235},
                "autoattack": {"n": 50, "adversarial_accuracy": 0.24},
            },
        },
        "attributions": {
            m: {
                "means": {
                    name: {k: ci for k in ("deletion_auc", "insertion_auc", "gini", "top_mass")} for name in MODELS
                },
                "difference": {
                    k: {**ci, "p_value": 0.01} for k in ("deletion_auc", "insertion_auc", "gini", "top_mass")
                },
                "target": "predicted",
                "figures": [png(folder / f"{m}_overlay.png"), png(folder / f"{m}_grid.png")],
            }
            for m in ("ig", "shap")
        },
        "generation": {
            "fid": {"real (train vs test)": 77.4, "standard": 371.2, "robust": 310.8},
            "n": {"train": 500, "test": 500, "standard": 100, "robust": 100},
            "dims": 2048,
            "resize": "bilinear",
            **{
                name: {
                    "settings": settings,
                    "seed_pool": 4,
                    "figures": [png(folder / f"{name}_classes.png"), png(folder / f"{name}_seeds.png")],
                }
                for name in MODELS
            },
        },
        "inversion": {
            **{f"inv{r}": {"figure": png(folder / f"inv{r}.png")} for r in (1, 2)},
            **{name: {"inception192_inv1": 25.0, "inception192_inv2": 26.0} for name in MODELS},
        },
        "features": {
            name: {
                "features": [[13], [42]],
                "objective_before": [0.1],
                "objective_after": [2.0],
                "figure": png(folder / f"{name}_features.png"),
            }
            for name in MODELS
        },
    }


def report(tmp_path: Path):
    for name in ("cifar10_standard.yaml", "cifar10_robust_l2.yaml"):
        shutil.copy(SMOKE / name, tmp_path / name)
    config = StudyConfig(
        data="sample",
        workers=1,
        standard=ModelSource(train=str(tmp_path / "cifar10_standard.yaml"), set=("epochs=15",)),
        robust=ModelSource(train=str(tmp_path / "cifar10_robust_l2.yaml")),
    )
    study = Study(config, tmp_path / "out")
    study.models = {name: build_model("cifar_resnet8") for name in MODELS}
    figures = tmp_path / "figures"
    figures.mkdir()
    page = study.report(recorded_results(figures), nodes=["node-a"])
    return page.local_path.read_text(), json.loads((tmp_path / "out" / "report.json").read_text())


def table(html: str, caption: str) -> list[list[str]]:
    """The cells of the report table with this caption, row by row (header first)."""
    body = html[html.index(f"<caption>{caption}</caption>") :]
    body = body[: body.index("</table>")]
    return [[unescape(cell) for cell in re.findall(r"<t[hd]>(.*?)</t[hd]>", row)] for row in body.split("<tr>")[1:]]


def test_the_report_says_how_the_run_differs_from_the_paper(tmp_path):
    html, data = report(tmp_path)
    assert "How this run differs from the paper" in html
    rows = {row[0]: row[1:] for row in table(html, "Settings")[1:]}
    paper = PAPER["cifar10"]["settings"]
    assert set(rows) == set(paper)
    # From the models, the training configs, the data and the stages' records, not from the paper:
    assert rows["architecture"] == ["cifar_resnet18", "cifar_resnet8", "differs"]
    # The bundled sample: 1,000 training images, 20 % held out (the smoke configs' val_fraction), so the
    # models trained on 800, and the evaluation used 200 of the 500 test images.
    assert rows["training images"] == [
        "50000",
        "800 (fit part: 800 + 200 held out = the training split's 1000)",
        "differs",
    ]
    assert rows["validation images per epoch"][1:] == ["200 held out, the same each epoch", "differs"]
    assert rows["test images (clean, PGD)"] == ["10000", "200 of 500", "differs"]
    assert rows["epochs"] == ["100", "standard: 15; robust: 3", "differs"]  # the set and the file
    assert rows["robust training PGD"] == ["L2 eps 0.5, step 0.1, 20 steps", "L2 eps 0.5, step 0.1, 5 steps", "differs"]
    assert rows["generation PGD"] == ["L2 eps 30, step 0.5, 60 steps"] * 2 + ["same"]
    assert rows["real-data FID images (train vs test)"] == ["10000 vs 10000", "500 vs 500", "differs"]
    assert rows["explained class"] == ["predicted", "predicted", "same"]
    images = {"split": 1000, "fit": 800, "held_out": 200, "trained_on": 800, "per_epoch": 200}
    assert data["images"] == {"standard": images, "robust": images, "test": {"split": 500, "evaluated": 200}}


def test_the_training_images_are_the_fit_part_and_its_draw():
    """A run trains on the fit part of the training split (or data.train_n of it) and evaluates the
    held-out part (or data.val_n of it) each epoch: the report counts those, not the whole split."""
    cfg = TrainConfig().override(["data.path=sample", "data.train_n=300", "data.val_n=50"])
    images = training_images(cfg)
    assert images == {"split": 1000, "fit": 900, "held_out": 100, "trained_on": 300, "per_epoch": 50}
    assert describe_training_images(images) == "300 of 900 (fit part: 900 + 100 held out = the training split's 1000)"
    assert describe_validation_images(images) == "50 of 100 held out, the same each epoch"


def test_the_papers_tables_stand_beside_ours_with_the_difference(tmp_path):
    html, _ = report(tmp_path)
    accuracy = table(html, "Accuracy (%)")
    assert accuracy[0][:5] == ["model", "n", "clean (ours)", "clean (paper)", "ours - paper"]
    standard = accuracy[1]
    assert standard[:5] == ["standard", "200", "38", "93.2", f"{38 - 93.2:.4g}"]
    assert standard[5:8] == ["19.5", "0.36", f"{19.5 - 0.36:.4g}"]
    fid = {row[0]: row[1:] for row in table(html, "FID (lower is better)")[1:]}
    assert fid["robust model"][:3] == ["310.8", "88.25", f"{310.8 - 88.25:.4g}"]
    inversion = table(html, "Inception-192 distance (lower is closer)")
    assert inversion[0] == [
        "model",
        "Inv. 1 (ours)",
        "Inv. 1 (paper)",
        "ours - paper",
        "Inv. 2 (ours)",
        "Inv. 2 (paper)",
        "ours - paper",
    ]
    assert inversion[2][1:4] == ["25", "20.05", "4.95"]
    for number in (
        "Table 1",
        "Table 2",
        "Table 3",
        "Fig. 2",
        "Fig. 3",
        "Fig. 4",
        "Figs. 5 / 12",
        "Fig. 10",
        "Fig. 11",
        "Fig. 13",
        "Fig. 14",
    ):
        assert number in html, number


def test_the_training_curves_are_a_figure(tmp_path):
    html, _ = report(tmp_path)
    curves = tmp_path / "out" / "report_training_curves.png"
    assert curves.read_bytes()[:4] == b"\x89PNG"
    with Image.open(curves) as image:
        assert image.size[0] > 600  # three panels
    assert "training loss, validation clean and PGD accuracy per epoch" in html
    assert len(table(html, "Training curves")) == 1 + 2 * 3  # the table stays beside the figure


def test_report_models_from_checkpoints_name_their_source(tmp_path):
    config = StudyConfig(
        data="sample",
        workers=1,
        standard=ModelSource(checkpoint="/runs/std/best"),
        robust=ModelSource(checkpoint="/runs/rob/best"),
    )
    study = Study(config, tmp_path / "out")
    torch.manual_seed(0)
    study.models = {name: build_model("cifar_resnet8") for name in MODELS}
    figures = tmp_path / "figures"
    figures.mkdir()
    results = recorded_results(figures)
    for name in MODELS:
        results["train"][name] = {"checkpoint": f"/runs/{name}/best"}  # no history: no curves
    html = study.report(results, nodes=[]).local_path.read_text()
    rows = {row[0]: row[1:] for row in table(html, "Settings")[1:]}
    assert rows["epochs"][1] == "standard: checkpoint (/runs/std/best); robust: checkpoint (/runs/rob/best)"
    assert rows["robust training PGD"][1] == "checkpoint (/runs/rob/best)"
    assert not (tmp_path / "out" / "report_training_curves.png").exists()


def test_compare_reports_finds_a_moved_number_and_ignores_times(tmp_path):
    """experiments/compare_reports.py, the refactor check: a number beyond rtol is listed, a stage time
    or a path is not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_reports", ROOT / "experiments" / "compare_reports.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    before = {"results": {"generation": {"fid": {"robust": 309.86}, "_seconds": 10.0}}, "run_settings": {"epochs": 3}}
    after = json.loads(json.dumps(before))
    after["results"]["generation"]["_seconds"] = 11.0
    paths = [tmp_path / name for name in ("a.json", "b.json")]
    for path, report in zip(paths, (before, after)):
        path.write_text(json.dumps(report))
    assert compare.main([str(p) for p in paths]) == 0
    after["results"]["generation"]["fid"]["robust"] = 309.86 * (1 + 1e-6)
    paths[1].write_text(json.dumps(after))
    assert compare.main([str(p) for p in paths]) == 1
    assert list(compare.differences(before, after, 1e-8)) == [
        f"/results/generation/fid/robust: 309.86 != {309.86 * (1 + 1e-6)!r}"
    ]
