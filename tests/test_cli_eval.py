"""`robint eval`: the paper's PGD-20 figures on the exact CIFAR-10 test images, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from robint_ray.checkpoint import save_checkpoint
from robint_ray.models import build_model


def eval_args(weights, data, *extra):
    return [
        "eval",
        "--arch",
        "cifar_resnet20",
        "--weights",
        str(weights),
        "--data",
        str(data),
        "--split",
        "test",
        *extra,
    ]


def test_eval_writes_json(resnet20_path, tmp_path, run_cli):
    out_json = tmp_path / "r" / "out.json"
    code, out, _ = run_cli(
        eval_args(resnet20_path, "sample", "--n", "64", "--eps", "0.1", "--step-size", "0.02", "--json", str(out_json))
    )
    assert code == 0 and "clean accuracy" in out
    result = json.loads(out_json.read_text())
    assert result["n"] == 64
    assert 0 <= result["adversarial_accuracy"] <= result["clean_accuracy"] <= 1
    assert result["attack"] == {
        **result["attack"],
        "kind": "pgd",
        "norm": "l2",
        "eps": 0.1,
        "step_size": 0.02,
        "steps": 20,
        "keep": "last",
        "random_start": False,
    }


def test_eval_is_independent_of_batch_size(resnet20_path, tmp_path, run_cli):
    figures = []
    for batch in (7, 64):
        run_cli(
            eval_args(
                resnet20_path,
                "sample",
                "--n",
                "64",
                "--eps",
                "0.1",
                "--step-size",
                "0.02",
                "--steps",
                "5",
                "--batch-size",
                str(batch),
                "--json",
                str(tmp_path / f"{batch}.json"),
            )
        )
        figures.append(json.loads((tmp_path / f"{batch}.json").read_text())["adversarial_correct"])
    assert figures[0] == figures[1]


@pytest.mark.ray
def test_eval_on_ray_workers_gives_the_figures_of_one_process(ray_local, resnet20_path, tmp_path, run_cli):
    """--workers 2: Ray tasks of whole batches, on their own device (--gpus-per-task 0 here)."""
    figures = []
    for extra in ([], ["--workers", "2", "--gpus-per-task", "0", "--cpus-per-task", "1"]):
        path = tmp_path / f"{len(extra)}.json"
        code, _, _ = run_cli(
            eval_args(
                resnet20_path,
                "sample",
                "--n",
                "24",
                "--eps",
                "0.1",
                "--step-size",
                "0.02",
                "--steps",
                "3",
                "--batch-size",
                "8",
                "--json",
                str(path),
                *extra,
            )
        )
        assert code == 0
        result = json.loads(path.read_text())
        figures.append((result["n"], result["clean_correct"], result["adversarial_correct"]))
    assert figures[0] == figures[1]


def test_eval_our_checkpoint(tmp_path, run_cli):
    save_checkpoint(tmp_path / "ck", build_model("cifar_resnet8"))
    code, out, _ = run_cli(
        ["eval", "--checkpoint", str(tmp_path / "ck"), "--data", "sample", "--n", "8", "--attack", "none"]
    )
    assert code == 0 and out.split()[:2] == ["images", "8"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--eps", "-0.5"], "eps must be >= 0"),
        (["--norm", "l3"], "unknown norm"),
        (["--steps", "0"], "steps must be an integer >= 1"),
        (["--attack", "fgsm"], "unknown attack"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--split", "validation"], "unknown split"),
    ],
)
def test_bad_settings_exit_2_with_one_line(resnet20_path, run_cli, extra, message):
    code, out, err = run_cli(eval_args(resnet20_path, "sample", "--n", "4", *extra))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_models_and_data_exit_2(resnet20_path, tmp_path, run_cli):
    save_checkpoint(tmp_path / "c8", build_model("cifar_resnet8", 100))
    x = np.zeros((2, 32, 32, 3), np.uint8)
    np.savez(
        tmp_path / "bad_labels.npz",
        x_train=x,
        y_train=np.array([0, 12]),
        x_test=x,
        y_test=np.array([0, 12]),
        classes=np.array([str(i) for i in range(13)]),
    )
    truncated = tmp_path / "trunc.th"
    truncated.write_bytes(resnet20_path.read_bytes()[:4096])
    cases = [
        (eval_args(resnet20_path, tmp_path / "missing.npz"), "data path not found"),
        (
            ["eval", "--arch", "cifar_resnet32", "--weights", str(resnet20_path), "--data", "sample"],
            "does not fit architecture",
        ),
        (eval_args(truncated, "sample"), "corrupt, truncated"),
        (eval_args(resnet20_path, tmp_path / "bad_labels.npz"), "the data has 13 classes, the model 10"),
        (["eval", "--checkpoint", str(tmp_path / "c8"), "--data", "sample"], "the data has 10 classes, the model 100"),
        (["eval", "--data", "sample"], "a model is needed"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert message is None or message in err, err


def test_the_console_script_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "robint_ray",
            "eval",
            "--arch",
            "cifar_resnet20",
            "--weights",
            str(tmp_path / "none.th"),
            "--data",
            "sample",
            "--eps",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "eps must be >= 0" in proc.stderr


@pytest.mark.ray
@pytest.mark.skipif(torch.cuda.is_available(), reason="the bad input is a GPU this machine lacks")
def test_a_command_that_started_ray_says_its_error_in_one_line(resnet20_path):
    """A local Ray started (--workers 1), then an error only the cluster can tell (a GPU per task on a
    machine without one): stderr is that one line. Ray's own warning that token authentication is on
    came first before robint_ray stated the setting (its __init__, RAY_AUTH_MODE)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    argv = eval_args(resnet20_path, "sample", "--n", "4", "--steps", "1", "--workers", "1", "--gpus-per-task", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "robint_ray", *argv], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.splitlines() == [
        "robint eval: error: each task asks for 1 GPU, but the Ray cluster has no GPU and no node type with one: "
        "use --gpus-per-task 0 (or --device cpu)"
    ]


# --- the acceptance figures on all 1,017 exact test images (minutes on 2 cores) -------------------


@pytest.mark.slow
@pytest.mark.parametrize("batch", [32, 128, 1017])
def test_paper_pgd_small_eps_figure(resnet20_path, cifar_exact, tmp_path, run_cli, batch):
    code, _, _ = run_cli(
        eval_args(
            resnet20_path,
            cifar_exact,
            "--eps",
            "0.1",
            "--step-size",
            "0.02",
            "--batch-size",
            str(batch),
            "--json",
            str(tmp_path / "o.json"),
        )
    )
    result = json.loads((tmp_path / "o.json").read_text())
    assert code == 0 and result["n"] == 1017
    assert result["clean_accuracy"] == pytest.approx(0.9164, abs=1e-3)
    assert result["adversarial_accuracy"] == pytest.approx(0.3766, abs=3e-3)


@pytest.mark.slow
def test_paper_pgd_figure_and_best_iterate(resnet20_path, cifar_exact, tmp_path, run_cli):
    figures = {}
    for keep in ("last", "best"):
        run_cli(eval_args(resnet20_path, cifar_exact, "--keep", keep, "--json", str(tmp_path / f"{keep}.json")))
        figures[keep] = json.loads((tmp_path / f"{keep}.json").read_text())["adversarial_accuracy"]
    assert figures["last"] <= 0.002 and figures["best"] <= figures["last"]


@pytest.mark.slow
def test_autoattack_figure(resnet20_path, cifar_exact, tmp_path, run_cli):
    code, _, _ = run_cli(
        eval_args(
            resnet20_path,
            cifar_exact,
            "--attack",
            "autoattack",
            "--batch-size",
            "256",
            "--json",
            str(tmp_path / "aa.json"),
        )
    )
    result = json.loads((tmp_path / "aa.json").read_text())
    assert code == 0 and result["n"] == 1017 and result["adversarial_accuracy"] <= 0.005
