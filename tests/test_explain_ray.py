"""The attribution fan-out for real on Ray: 2 workers give exactly the single-process result, a task
whose worker dies is retried, and `robint explain` writes its files."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model

from robint_ray import explain as ex
from robint_ray.distributed import Tasks
from robint_ray.errors import InputError
from robint_ray.models import build_model

pytestmark = pytest.mark.ray

TWO = Tasks(2, cpus=1, gpus=0)  # two Ray tasks at a time, one CPU each


@pytest.fixture(scope="module")
def few(sample_test):
    x, y = sample_test
    return x[:7], y[:7], np.arange(100, 107)


def config(method="ig", **kwargs):
    return ex.ExplainConfig(
        method=method,
        shards_per_worker=2,
        batch_size=40,
        metric_steps=8,
        ig=ex.IGConfig(steps=8, baseline="uniform", num_baselines=2),
        shap=ex.ShapConfig(nsamples=16, background=10),
        **kwargs,
    )


def assert_same(a: ex.Explanation, b: ex.Explanation):
    np.testing.assert_array_equal(a.attributions, b.attributions)
    np.testing.assert_array_equal(a.targets, b.targets)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.metrics.keys() == b.metrics.keys()
    for name in a.metrics:
        np.testing.assert_array_equal(a.metrics[name], b.metrics[name], err_msg=name)


def test_shards_are_aligned_to_whole_passes():
    cfg = config()  # 2 x 9 = 18 points per image: 2 images per pass of 40; metrics 2 x 9 = 18 -> 2
    assert ex.alignment(cfg, 40) == 2
    shards = ex.plan_shards(7, cfg, 40, 2)
    assert shards[0].start == 0 and shards[-1].stop == 7
    assert all(s.start % 2 == 0 for s in shards)
    assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))


def test_metric_passes_do_not_widen_the_shards():
    """51 IG points per image (4 images per pass of 204) and 4 metric points (51 images per pass):
    shards must not start at the least common multiple, 204 images, which would leave one shard of
    16 images for 2 workers."""
    cfg = ex.ExplainConfig(
        method="ig",
        shards_per_worker=1,
        batch_size=204,
        metric_steps=1,
        ig=ex.IGConfig(steps=50, baseline="black", num_baselines=1),
    )
    assert ex.alignment(cfg, 204) == 4
    assert ex.metric_batch_size(cfg, 204) == 4 * 4  # 4 images of 2 x 2 points: a divisor of 4 images
    assert [(s.start, s.stop) for s in ex.plan_shards(16, cfg, 204, 2)] == [(0, 8), (8, 16)]
    # Metric points beyond the batch: one image per pass, whatever the alignment.
    assert ex.metric_batch_size(dataclasses.replace(cfg, metric_steps=200), 204) == 204


@pytest.mark.parametrize("method", ["ig", "shap"])
def test_two_workers_equal_one_process(ray_local, tiny, few, sample_test, method):
    x, y, indices = few
    background = sample_test[0][200:210] if method == "shap" else None
    local = ex.explain(tiny, x, y, config=config(method), indices=indices, background=background)
    fanned = ex.explain(
        tiny, x, y, config=config(method), indices=indices, background=background, tasks=TWO, progress=False
    )
    assert len(ex.plan_shards(len(x), config(method), 40, TWO.workers)) > 2  # several tasks, not one
    assert fanned.attributions.shape == x.shape
    assert_same(local, fanned)
    if method == "ig":
        assert np.isfinite(fanned.metrics["completeness_gap"]).all()


def test_a_task_whose_worker_dies_is_retried(ray_local, tiny, few, tmp_path):
    x, y, indices = few
    marker = str(tmp_path / "killed-once")

    def die_once(shard, **shared):
        # the first attempt of the shard starting at image 2 kills its worker process outright
        if shard.start == 2 and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)
        return ex.explain_shard(shard, **shared)

    local = ex.explain(tiny, x, y, config=config(), indices=indices)
    fanned = ex.explain(tiny, x, y, config=config(), indices=indices, tasks=TWO, progress=False, shard_fn=die_once)
    assert os.path.exists(marker)  # the kill happened, and the task ran again
    assert_same(local, fanned)


def test_config_round_trip_and_unknown_keys():
    cfg = config()
    assert ex.ExplainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InputError, match="stpes"):
        ex.ExplainConfig.from_dict({"ig": {"stpes": 3}})
    with pytest.raises(InputError, match="wokers"):
        ex.ExplainConfig.from_dict({"wokers": 3})
    with pytest.raises(InputError, match="black baseline"):
        ex.IGConfig(baseline="black", num_baselines=10)


def test_cli_explain_writes_files(ray_local, tmp_path, run_cli):
    from robint_ray.checkpoint import save_checkpoint
    from robint_ray.data import load_split, spread_over_classes

    torch.manual_seed(1)
    save_checkpoint(tmp_path / "a", build_model("cifar_resnet8"))
    save_checkpoint(tmp_path / "b", build_model("cifar_resnet8"))
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        [
            "explain",
            "--method",
            "shap",
            "--checkpoint",
            str(tmp_path / "a"),
            "--compare-checkpoint",
            str(tmp_path / "b"),
            "--data",
            "sample",
            "--split",
            "test",
            "--n",
            "5",
            "--out",
            str(out),
            "--workers",
            "2",
            "--nsamples",
            "8",
            "--background",
            "6",
            "--metric-steps",
            "4",
        ]
    )
    assert code == 0, err
    with np.load(out / "attributions.npz") as f:
        assert f["attributions"].shape == (5, 3, 32, 32)
        assert f["robust_attributions"].shape == (5, 3, 32, 32)
        test = load_split("sample", "test")
        assert f["indices"].tolist() == test.indices[spread_over_classes(test.labels, 5, seed=0)].tolist()
        assert len(set(f["labels"].tolist())) == 5 and f["targets"].shape == (5,)  # five images, five classes
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"standard", "robust"}
    assert len(metrics["models"]["standard"]["per_image"]["gini"]) == 5
    assert "mean" in metrics["difference"]["gini"]
    for png in ("grid.png", "overlay.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "standard:" in stdout


def test_cli_explain_rejects_bad_input(tmp_path, run_cli):
    def explain(n):
        weights, out = tmp_path / "none.th", tmp_path / "o"
        return run_cli(
            ["explain", "--method", "ig", "--arch", "cifar_resnet8", "--weights", weights]
            + ["--data", "sample", "--n", n, "--out", out, "--workers", "0"]
        )

    code, _, err = explain(2)  # no such weights file
    assert code == 2
    assert "error" in err
    code, _, _ = explain(0)
    assert code == 2


@pytest.mark.parametrize("target", ["predicted", "label"])
def test_cli_explain_target_is_honoured_and_recorded(tmp_path, target, run_cli):
    """`--target predicted` (the default, the authors') explains the model's own argmax; `--target label`
    the true label; the kind and the classes explained are in attributions.npz and metrics.json."""
    from robint_ray.checkpoint import save_checkpoint
    from robint_ray.data import draw, load_split, stack

    model = tiny_model(2)
    save_checkpoint(tmp_path / "m", model)
    out = tmp_path / "out"
    code, _, err = run_cli(
        [
            "explain",
            "--method",
            "ig",
            "--checkpoint",
            str(tmp_path / "m"),
            "--data",
            "sample",
            "--n",
            "4",
            "--out",
            str(out),
            "--workers",
            "0",
            "--steps",
            "2",
            "--baselines",
            "1",
            "--metric-steps",
            "2",
            "--target",
            target,
        ]
    )
    assert code == 0, err
    x, y = stack(draw(load_split("sample", "test"), 4, seed=0))  # --n: a draw across the classes (--seed 0)
    expected = ex.predict(model, x) if target == "predicted" else y
    assert target == "label" or not torch.equal(expected, y)  # the two kinds differ on these images
    with np.load(out / "attributions.npz") as f:
        assert f["targets"].tolist() == expected.tolist() and f["labels"].tolist() == y.tolist()
        assert str(f["target_kind"]) == target
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["target"] == target and metrics["config"]["target"] == target
