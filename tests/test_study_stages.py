"""The study's attribution, inversion and real-data FID stages follow the authors' protocol: each model
explains its own prediction, inversion runs Inv. 1 and Inv. 2 (one target, two image sources, one
grey-noise source), and the real-data FID takes a per-class sample of the training images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model

from robint_ray import explain as ex
from robint_ray.config import PGDSettings
from robint_ray.data import load_split, spread_over_classes, stack
from robint_ray.generate import grey_noise, inversion_run_images, per_class_sample, plan_inversion_run
from robint_ray.study import (
    AttributionStage,
    GenerationStage,
    InversionStage,
    ModelSource,
    Study,
    StudyConfig,
    attributions,
    generation,
    inversion,
)


def tiny_models():
    return {"standard": tiny_model(0), "robust": tiny_model(1)}


def study(tmp_path, **stages) -> Study:
    config = StudyConfig(
        data="sample",
        workers=1,
        standard=ModelSource(checkpoint="unused"),
        robust=ModelSource(checkpoint="unused"),
        **stages,
    )
    s = Study(config, tmp_path / "out")
    s.models = tiny_models()  # the stages take their models from here
    return s


@pytest.mark.ray
@pytest.mark.parametrize("target", ["predicted", "label"])
def test_attributions_explain_each_models_prediction_or_the_label(ray_local, tmp_path, target):
    s = study(
        tmp_path,
        attributions=AttributionStage(
            n=6, overlays=2, ig_steps=3, ig_baselines=1, shap_nsamples=4, shap_background=4, target=target
        ),
    )
    folder = tmp_path / "attributions"
    out = attributions.run(s, folder)
    test = load_split("sample", "test")  # the explained images: a draw spread over the classes (test_draws)
    x, y = stack(test.subset(spread_over_classes(test.labels, 6, seed=0)))
    assert out["images"]["index"] == test.indices[spread_over_classes(test.labels, 6, seed=0)].tolist()
    for method in ("ig", "shap"):
        assert out[method]["target"] == target and out[method]["labels"] == y.tolist()
        with np.load(folder / method / "attributions.npz") as f:
            assert str(f["target_kind"]) == target
            for name, model in s.models.items():
                expected = ex.predict(model, x) if target == "predicted" else y
                assert out[method]["targets"][name] == expected.tolist()
                assert f[f"{name}_targets"].tolist() == expected.tolist()
        metrics = json.loads((folder / method / "metrics.json").read_text())
        assert metrics["target"] == target and metrics["models"]["robust"]["per_image"]["label"] == y.tolist()
    # Untrained models predict other classes than the labels: the two kinds differ here.
    predicted = {name: ex.predict(m, x).tolist() for name, m in s.models.items()}
    assert all(p != y.tolist() for p in predicted.values())


def test_inversion_runs_follow_the_authors_protocol():
    labels = load_split("sample", "test").labels
    one, two = (plan_inversion_run(labels, run=r, seed=0) for r in (1, 2))
    assert one == plan_inversion_run(labels, run=1, seed=0)  # seeded
    assert one.target_index != two.target_index  # Inv. 2 is another draw
    for plan in (one, two):
        assert len(plan.source_indices) == 2 and plan.noise == 1 and plan.size == 3
        assert all(labels[i] != labels[plan.target_index] for i in plan.source_indices)
    targets, sources = inversion_run_images(load_split("sample", "test"), one)
    test = load_split("sample", "test")
    assert targets.shape == (3, 3, 32, 32) and torch.equal(targets[0], targets[2])
    assert torch.equal(targets[0], test[one.target_index][0])
    assert torch.equal(sources[1], test[one.source_indices[1]][0])
    assert sources[2].min() >= 0.5 and sources[2].max() < 0.55 and sources[2].std() > 0.01  # 0.5 + U/20
    noise = grey_noise((2000,), generator=torch.Generator().manual_seed(0))
    assert abs(float(noise.mean()) - 0.525) < 0.002


@pytest.mark.ray
@pytest.mark.parametrize("preprocessing", ["robint", "author"])
def test_inversion_stage_reports_inv1_and_inv2(ray_local, tmp_path, monkeypatch, preprocessing):
    """Both runs, both models: Inception-192 distances under the keys the report reads, and a figure
    per run. The Inception is a stand-in here (its weights are tested in test_fid.py): the images'
    own difference, so the distance must come from the run's own targets and inversions. The
    distance's Inception input is generation.fid_preprocess's, as FID's."""
    import robint_ray.fid as fid
    import robint_ray.inception as inception

    calls = []

    def distance(model, originals, inverted, **kwargs):
        calls.append((originals.clone(), inverted.clone(), kwargs))
        diff = (originals - inverted).flatten(1).double()
        return diff.norm(dim=1), float(diff.norm())

    monkeypatch.setattr(inception, "load_fid_inception", lambda *a, **k: None)
    monkeypatch.setattr(fid, "inception_distance", distance)
    s = study(
        tmp_path,
        inversion=InversionStage(pgd=PGDSettings(eps=1000, step_size=0.5, steps=3)),
        generation=GenerationStage(fid_preprocess=preprocessing),
    )
    out = inversion.run(s, tmp_path / "inversion")
    test = load_split("sample", "test")
    assert len(calls) == 4  # 2 runs x 2 models
    assert [kwargs["preprocessing"] for *_, kwargs in calls] == [preprocessing] * 4
    assert out["preprocessing"] == preprocessing and out["resize"] == inception.PREPROCESSING[preprocessing]
    for r in (1, 2):
        run = out[f"inv{r}"]
        assert len(run["source_indices"]) == 2 and run["noise"] == 1
        assert (tmp_path / "inversion" / f"inv{r}.png").read_bytes()[:4] == b"\x89PNG"
        for name in ("standard", "robust"):
            assert np.isfinite(out[name][f"inception192_inv{r}"]) and out[name][f"inception192_inv{r}"] > 0
            after = out[name][f"inv{r}"]["representation_distance_after"]
            before = out[name][f"inv{r}"]["representation_distance_before"]
            assert len(after) == 3 and np.mean(after) < np.mean(before)
    originals, _, _ = calls[0]
    assert torch.equal(originals[0], test[out["inv1"]["target_index"]][0])
    assert torch.equal(calls[2][0][0], test[out["inv2"]["target_index"]][0])


def test_real_data_fid_takes_a_per_class_sample(tmp_path):
    labels = np.array([0] * 7 + [1] * 3 + [2] * 5)
    picks = per_class_sample(labels, 4, seed=0)
    assert np.bincount(labels[picks]).tolist() == [4, 3, 4]  # class 1 has only 3: all of them
    assert len(set(picks.tolist())) == len(picks) and not np.array_equal(picks, per_class_sample(labels, 4, seed=1))
    from robint_ray.fid import make_shards, read_images

    s = study(tmp_path, generation=GenerationStage(real_per_class=20))
    source = generation.real_images(s)
    train = load_split("sample", "train")
    picks = per_class_sample(train.labels, 20, seed=0)
    assert source.kind == "split" and source.count == len(picks) and list(source.indices) == picks.tolist()
    counts = np.bincount(train.labels[list(source.indices)], minlength=10)
    assert counts.tolist() == np.minimum(np.bincount(train.labels, minlength=10), 20).tolist()
    images = read_images(source, 0, source.count)  # uint8 (n, C, H, W), in the selection's order
    assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), train.images[picks])
    # FID shards carry only their own indices, and read the same images.
    shards = make_shards([source], shard_size=64)
    assert sum(len(piece.indices) for _, piece, _ in shards) == source.count
    pieces = [read_images(piece, shard.start, shard.stop) for _, piece, shard in shards]
    assert np.array_equal(np.concatenate([p.numpy() for p in pieces]), images.numpy())


def test_attribution_grid_is_eight_rows_by_three_columns():
    labels = [ex.grid_cell(i)[2] for i in range(24)]
    assert labels[:8] == [f"{letter}1" for letter in "ABCDEFGH"] and labels[-1] == "H3"
    assert ex.grid_cell(15) == (7, 1, "H2")  # the paper's "H2": last row, second column
