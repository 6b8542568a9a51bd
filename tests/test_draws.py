"""Every subset the study draws (explained images, SHAP background, AutoAttack images, inversion sources)
is seeded and spread over the classes: folder datasets are sorted by class, so "the first n images"
would be one class."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_model
from PIL import Image

from robint_ray.config import PAPER_PGD
from robint_ray.data import draw, load_split, spread_over_classes
from robint_ray.generate import plan_inversion_run
from robint_ray.study import AttributionStage, EvalStage, ModelSource, Study, StudyConfig, attributions, evaluation

CLASSES = ("ant", "bee", "cat", "dog", "eel")


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory):
    """An ImageFolder root, train/ and val/, 5 classes of 4 tiny images each: sorted by class."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_a_draw_spans_the_classes_and_is_the_same_for_the_same_seed(sorted_folder):
    labels = load_split(sorted_folder, "test").labels
    assert labels.tolist() == sorted(labels.tolist())  # the first 5 images are all one class
    first = spread_over_classes(labels, 5, seed=0)
    assert len(set(labels[first])) == 5  # as many classes as images
    twelve = spread_over_classes(labels, 12, seed=0)
    assert sorted(np.bincount(labels[twelve]).tolist()) == [2, 2, 2, 3, 3]  # as even as 12 over 5 can be
    assert twelve[:5].tolist() == first.tolist()  # a smaller draw is the start of a larger one
    assert len(set(twelve.tolist())) == 12  # without replacement
    assert spread_over_classes(labels, 12, seed=0).tolist() == twelve.tolist()
    assert spread_over_classes(labels, 12, seed=1).tolist() != twelve.tolist()
    assert sorted(spread_over_classes(labels, None, seed=0).tolist()) == list(range(20))
    assert len(draw(load_split(sorted_folder, "test"), None, seed=0)) == 20


def test_inversion_sources_come_from_distinct_other_classes(sorted_folder):
    labels = load_split(sorted_folder, "test").labels
    for run in (1, 2):
        plan = plan_inversion_run(labels, run=run, seed=0, image_sources=3)
        classes = labels[list(plan.source_indices)].tolist()
        assert len(set(classes)) == 3 and labels[plan.target_index] not in classes


def folder_study(tmp_path, data, **stages) -> Study:
    config = StudyConfig(
        data=str(data),
        paper="folder128",
        workers=1,
        standard=ModelSource(checkpoint="unused"),
        robust=ModelSource(checkpoint="unused"),
        **stages,
    )
    s = Study(config, tmp_path / "out")
    s.models = {"standard": tiny_model(0), "robust": tiny_model(1)}
    return s


@pytest.mark.ray
def test_explained_background_and_autoattack_images_span_the_classes(ray_local, sorted_folder, tmp_path):
    s = folder_study(
        tmp_path,
        sorted_folder,
        attributions=AttributionStage(n=5, overlays=2, ig_steps=2, ig_baselines=1, shap_nsamples=2, shap_background=5),
        # PGD of 1 step, not the paper's 20: this test checks which images each attack sees, not the attack
        # (20 steps: 20 forward and backward passes of 2 models over 20 images of 128 x 128 px).
        evaluation=EvalStage(
            pgd=PAPER_PGD.given(steps=1),
            n=None,
            autoattack_n=10,
            autoattack_version="custom",
            autoattack_attacks=("apgd-ce",),
        ),
    )
    out = attributions.run(s, tmp_path / "attributions")
    images = out["images"]
    assert sorted(images["class"]) == list(CLASSES)  # 5 explained images, 5 classes
    assert images["background"] == {"split": "test", "n": 5}
    test = load_split(sorted_folder, "test")
    drawn = spread_over_classes(test.labels, 10, seed=0)
    assert images["index"] == drawn[:5].tolist()  # the same images for the same seed; background: drawn[5:]
    assert out["ig"]["labels"] == test.labels[drawn[:5]].tolist()

    result = evaluation.run(s, tmp_path / "evaluation")
    assert result["images"]["autoattack"] == {name: 2 for name in CLASSES}
    assert result["images"]["pgd"] == {name: 4 for name in CLASSES}
    assert len(result["robust"]["autoattack"]["per_image"]["adversarial"]) == 10


@pytest.mark.parametrize("background", ["test", "train"])
def test_the_shap_background_comes_from_the_chosen_split_and_never_repeats_an_explained_image(background):
    from robint_ray.data import stack
    from robint_ray.study.attributions import explained_and_background

    test = load_split("sample", "test")
    c = AttributionStage(n=6, shap_background=10, background=background)
    explained, x_background = explained_and_background(test, "sample", c, seed=0)
    drawn = spread_over_classes(test.labels, 16, seed=0)
    assert explained.indices.tolist() == test.indices[drawn[:6]].tolist()  # the same either way
    assert x_background.shape == (10, 3, 32, 32)
    if background == "test":  # the next 10 of the same draw: test images, none of them explained
        assert (x_background == stack(test.subset(drawn[6:]))[0]).all()
    else:  # a seeded draw of the training split
        train = stack(load_split("sample", "train"))[0].flatten(1)
        assert all((train == image.flatten()).all(1).any() for image in x_background)


def test_the_report_names_every_explained_images_class(sorted_folder):
    from robint_ray.study.attributions import _images_section

    labels = load_split(sorted_folder, "test").labels
    drawn = spread_over_classes(labels, 5, seed=0)
    result = {
        "images": {
            "index": drawn.tolist(),
            "class": [CLASSES[k] for k in labels[drawn]],
            "background": {"split": "test", "n": 5},
            "classes": list(CLASSES),
        },
        "ig": {"targets": {"standard": [0] * 5, "robust": [1] * 5}},
    }
    table = _images_section(result).tables[0]
    assert [row[2] for row in table.rows] == [CLASSES[k] for k in labels[drawn]]
    assert [row[0] for row in table.rows] == ["A1", "B1", "C1", "D1", "E1"]  # the grid's cells
    assert {row[3] for row in table.rows} == {"ant"} and {row[4] for row in table.rows} == {"bee"}
