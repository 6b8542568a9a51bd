"""Training on Ray Train, for real: 2 CPU workers (DDP over gloo), cifar_resnet8, the bundled real
CIFAR-10 sample (800 fit / 200 val images). Each run costs Ray's worker start-up (~20 s here) plus its
epochs, so the runs are module fixtures that several tests read:

- `standard_run`: 3 uninterrupted epochs of standard training;
- `faulty_robust_run`: 3 epochs of adversarial training (PGD-2), a training worker killed by pid after
  epoch 1, max_failures=1;
- `interrupted_s3_run`: the standard run again into an S3 bucket, its driver stopped (Ctrl-C) after
  epoch 1 and the run continued with `robint train --resume`; the stop-and-resume test asks that it
  reproduce `standard_run` epoch for epoch, the S3 test that it lives in the bucket.

The threat here is Linf 8/255 (validated with PGD-5): a larger ball than the paper's L2 0.5, so that 3
epochs on 800 images separate the robust from the standard model clearly (robust accuracy 0.14 against
0.035 with the robust run trained on PGD-2, 0.16 with PGD-5; the test asks for a 0.03 lead).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import pytest
import torch
from conftest import live_actors

from robint_ray.config import TrainConfig, dump_config

pytestmark = pytest.mark.ray


def tiny(**changes) -> TrainConfig:
    cfg = TrainConfig.from_dict(
        dict(
            arch="cifar_resnet8",
            epochs=3,
            batch_size=64,
            test=False,
            max_failures=0,
            log_every=100,
            pgd=dict(norm="linf", eps=8 / 255, step_size=2 / 255, steps=5),
            data=dict(path="sample", val_fraction=0.2),
            optim=dict(lr=0.05, t_max=None),
        )
    )
    return cfg.override(changes)


def read_metrics(run_dir) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl (a local Path or a storage Location), [] before the first."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_epochs(run_dir, n: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while len(read_metrics(run_dir)) < n:
        assert time.monotonic() < deadline, f"no epoch {n} in {run_dir} after {timeout} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def standard_run(ray_local, tmp_path_factory):
    from robint_ray.train import run

    run_dir = tmp_path_factory.mktemp("standard")
    cfg = tiny(test=True, **{"data.test_n": 100})
    final = run(cfg, run_dir, workers=2)
    return run_dir, cfg, final


@pytest.fixture(scope="module")
def faulty_robust_run(ray_local, tmp_path_factory):
    """Adversarial training; after epoch 1 a thread kills training worker rank 1 by its pid."""
    from robint_ray.train import run

    run_dir = tmp_path_factory.mktemp("robust")
    killed = {}

    def kill_rank1_after_epoch1():
        wait_for_epochs(run_dir, 1)
        info = json.loads((run_dir / "workers" / "rank1.json").read_text())
        killed.update(info, epochs_done=len(read_metrics(run_dir)))
        os.kill(info["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_rank1_after_epoch1, daemon=True)
    killer.start()
    # Trained on PGD-2 with twice the step (the same 8/255 ball, half the passes of PGD-5), validated by
    # standard_run's attack (PGD-5, 2/255, from x), so the two runs' robust accuracies compare as before.
    cfg = tiny(
        adversarial=True, max_failures=1, **{"pgd.steps": 2, "pgd.step_size": 4 / 255, "val_pgd": asdict(tiny().pgd)}
    )
    assert cfg.val_pgd == tiny().pgd
    run(cfg, run_dir, workers=2)
    killer.join(timeout=1)
    return run_dir, killed


def test_standard_training_loss_falls_checkpoints_and_best_on_validation(standard_run):
    from robint_ray.checkpoint import load_checkpoint, read_meta

    run_dir, cfg, final = standard_run
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    losses = [r["train_loss"] for r in rows]
    assert losses[2] < 0.95 * losses[0], losses
    for key in ("train_accuracy", "val_clean_accuracy", "val_adversarial_accuracy"):
        assert all(0 <= r[key] <= 1 for r in rows)
    assert all(r["val_adversarial_accuracy"] <= r["val_clean_accuracy"] for r in rows)
    assert {r["val_images"] for r in rows} == {200} and {r["train_images"] for r in rows} == {800}

    # Best = the first epoch of highest val clean accuracy (a standard model, as the authors' standard
    # trainer selects); the test split played no part.
    assert cfg.selection_rule == "clean"
    scores = [r["val_clean_accuracy"] for r in rows]
    assert [r["val_score"] for r in rows] == scores
    best_epoch = scores.index(max(scores)) + 1
    assert rows[-1]["best_epoch"] == best_epoch
    best_meta = read_meta(run_dir / "best")
    assert best_meta["metrics"]["epoch"] == best_epoch
    assert best_meta["config"] == cfg.to_dict()

    # Ray Train kept the latest and the best checkpoint; each is a robint checkpoint holding the config.
    kept = sorted(p.name for p in (run_dir / "ray" / "train").glob("epoch_*"))
    assert kept == sorted({f"epoch_{best_epoch:04d}", "epoch_0003"})
    for name in kept:
        model, meta = load_checkpoint(run_dir / "ray" / "train" / name)
        assert meta["config"] == cfg.to_dict() and meta["arch"] == "cifar_resnet8"
        assert (run_dir / "ray" / "train" / name / "train_state.pt").is_file()
    best, _ = load_checkpoint(run_dir / "best")
    selected, _ = load_checkpoint(run_dir / "ray" / "train" / f"epoch_{best_epoch:04d}")
    for (name, a), b in zip(best.state_dict().items(), selected.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)

    # The final test evaluation of the selected model, TensorBoard files, worker records.
    test = json.loads((run_dir / "test.json").read_text())
    assert test["test_epoch"] == best_epoch and test["test_images"] == 100
    assert test["test_adversarial_accuracy"] <= test["test_clean_accuracy"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert {json.loads(p.read_text())["rank"] for p in (run_dir / "workers").glob("rank*.json")} == {0, 1}
    assert final["epoch"] == 3


def test_a_finished_run_hands_ctrl_c_back_and_leaves_no_controller(standard_run):
    """Ray Train's fit() leaves a SIGINT handler installed that holds its controller actor's handle:
    the controller would outlive the run, and a later Ctrl-C would only ask it to abort. run() puts
    the caller's handler back, and the run's Train actors exit."""
    handler = signal.getsignal(signal.SIGINT)
    assert not (getattr(handler, "__module__", None) or "").startswith("ray"), handler
    deadline = time.monotonic() + 30
    while alive := sorted(live_actors(("TrainController", "DatasetManager")).values()):
        assert time.monotonic() < deadline, f"still alive 30 s after the run: {alive}"
        time.sleep(0.5)


def evaluates(run_cli, checkpoint) -> bool:
    """Whether `robint eval --checkpoint CHECKPOINT` (clean accuracy on 50 sample test images) succeeds."""
    code, out, err = run_cli(
        ["eval", "--checkpoint", checkpoint, "--data", "sample", "--split", "test", "--n", "50", "--attack", "none"]
    )
    assert code == 0, err
    return "clean accuracy" in out


def test_best_checkpoint_works_with_robint_eval(standard_run, run_cli):
    run_dir, _, _ = standard_run
    assert evaluates(run_cli, run_dir / "best")


def test_adversarial_training_is_more_robust_at_equal_epochs(standard_run, faulty_robust_run):
    standard = read_metrics(standard_run[0])[-1]
    robust = read_metrics(faulty_robust_run[0])[-1]
    assert standard["epoch"] == robust["epoch"] == 3
    assert robust["val_adversarial_accuracy"] > standard["val_adversarial_accuracy"] + 0.03, (robust, standard)


def test_killed_worker_resumes_from_the_last_checkpoint(faulty_robust_run):
    run_dir, killed = faulty_robust_run
    assert killed["epochs_done"] >= 1, "the worker was not killed mid-run"
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # every epoch once: nothing lost, nothing redone twice
    first_attempt = [r for r in rows if r["attempt"] == 1]
    second_attempt = [r for r in rows if r["attempt"] == 2]
    assert first_attempt and second_attempt, rows
    resumed_from = second_attempt[0]["resumed_from_epoch"]
    # Resumed from the last checkpoint's epoch (at least the one finished before the kill), not from 0.
    assert resumed_from == first_attempt[-1]["epoch"] >= killed["epochs_done"] >= 1
    assert second_attempt[0]["epoch"] == resumed_from + 1
    survivor = json.loads((run_dir / "workers" / "rank1.json").read_text())
    assert survivor["attempt"] == 2 and survivor["pid"] != killed["pid"]


@pytest.fixture(scope="module")
def interrupted_s3_run(standard_run, s3_server, ray_local, tmp_path_factory):
    """standard_run's config trained again into a bucket: a separate driver process (joined to the
    session's Ray, as `ray job submit` would run it; its cwd an empty folder) is stopped with Ctrl-C
    after epoch 1, then `robint train --resume s3://...` continues the run (in this process, the same
    cwd). One run serves two tests: the stop-and-resume test and the S3 test (each run costs Ray
    Train's start-up, most of its time here). Returns (run Location, cwd, epochs done when stopped,
    driver log)."""
    from robint_ray.cli import main
    from robint_ray.storage import Location

    _, cfg, _ = standard_run
    cwd, logs = tmp_path_factory.mktemp("driver-cwd"), tmp_path_factory.mktemp("driver-log")
    config = cwd / "tiny.yaml"
    config.write_text(dump_config(cfg))
    run_dir = Location(s3_server()) / "runs" / "standard"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    with open(logs / "driver.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "robint_ray", "train", str(config), "--out", run_dir.uri, "--workers", "2"],
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_epochs(run_dir, 1)
            driver.send_signal(signal.SIGINT)
            driver.wait(timeout=60)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    stopped_after = len(read_metrics(run_dir))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        code = main(["train", "--resume", run_dir.uri, "--workers", "2"])
    assert code == 0, (logs / "driver.log").read_text()[-3000:]
    return run_dir, cwd, stopped_after


def test_stop_and_resume_reproduces_the_uninterrupted_run(standard_run, interrupted_s3_run, run_cli):
    """Ctrl-C the driver of a run after its first epoch, then `robint train --resume RUN_DIR`: epoch,
    optimiser, scheduler, random state and best-so-far survive, so the metrics equal standard_run's
    (the same config, uninterrupted, in a local folder)."""
    reference_dir, _, _ = standard_run
    run_dir, cwd, stopped_after = interrupted_s3_run
    assert 1 <= stopped_after < 3, "the run was not stopped mid-run"
    # Never silently restarted or continued over: --out refuses a folder that holds a run.
    code, _, err = run_cli(["train", cwd / "tiny.yaml", "--out", run_dir.uri, "--workers", "2"])
    assert code == 2 and "--resume" in err

    rows, reference = read_metrics(run_dir), read_metrics(reference_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert {r["resumed_from_epoch"] for r in rows[stopped_after:]} == {stopped_after}
    for row, ref in zip(rows, reference):
        for key in (
            "train_loss",
            "train_accuracy",
            "val_clean_accuracy",
            "val_adversarial_accuracy",
            "lr",
            "best_epoch",
            "best_val_score",
        ):
            torch.testing.assert_close(row[key], ref[key], rtol=1e-5, atol=1e-6, msg=f"epoch {row['epoch']} {key}")
    assert (run_dir / "test.json").read_json()["test_epoch"] == reference[-1]["best_epoch"]


def test_resume_refuses_a_changed_config(tmp_path, run_cli):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(tiny()))
    code, _, err = run_cli(["train", "--resume", run_dir, "--set", "optim.lr=0.5"])
    assert code == 2 and "optim.lr (0.05 -> 0.5)" in err


def test_attack_runs_on_the_unwrapped_module_and_ddp_forwards_once_per_batch(tmp_path):
    """In-process DDP (gloo, world size 1): the PGD steps call the module, never the DDP wrapper."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    from robint_ray.models import build_model
    from robint_ray.train import load_data, make_optimizer, train_epoch

    cfg = tiny(adversarial=True, **{"pgd.steps": 3, "data.train_n": 16})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        module = build_model("cifar_resnet8", 10)
        ddp = DistributedDataParallel(module)
        calls = {"ddp": 0, "module": 0}
        ddp.register_forward_pre_hook(lambda *_: calls.__setitem__("ddp", calls["ddp"] + 1))
        module.register_forward_pre_hook(lambda *_: calls.__setitem__("module", calls["module"] + 1))
        loader = DataLoader(load_data(cfg, "fit"), batch_size=8)
        sums = train_epoch(
            ddp,
            loader,
            make_optimizer(ddp.parameters(), cfg.optim),
            attack_model=module,
            pgd_cfg=cfg.pgd,
            device=torch.device("cpu"),
        )
    finally:
        dist.destroy_process_group()
    assert sums["n"] == 16
    assert calls["ddp"] == 2  # one training forward per batch
    assert calls["module"] == 2 * (3 + 1)  # 3 PGD steps + the training forward (inside DDP)


@pytest.mark.parametrize("bn_mode, changes", [("eval", False), ("train", True)])
def test_batch_norm_mode_of_the_training_attack(bn_mode, changes):
    from robint_ray.data import load_split, stack
    from robint_ray.models import build_model
    from robint_ray.train import adversarial_batch

    x, y = stack(load_split("sample", "val", val_fraction=0.2))
    x, y = x[:8], y[:8]
    torch.manual_seed(0)
    model = build_model("cifar_resnet8", 10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = tiny(**{"pgd_bn_mode": bn_mode, "pgd.steps": 2})
    x_adv = adversarial_batch(model, x, y, cfg.pgd, bn_mode=cfg.pgd_bn_mode)
    assert model.training and not torch.equal(x_adv, x)
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert bool(moved) is changes, moved
    assert all("running" in k or "num_batches" in k for k in moved)


@pytest.mark.parametrize("bf16, channels_last", [(False, False), (True, True)])
def test_adversarial_epochs_fit_a_small_batch(device, bf16, channels_last):
    """train_epoch with PGD (no Ray): epochs over 32 sample images drive the training loss down, in fp32
    and in bf16 + channels_last (the GPU configs' path), on the CPU and, where there is one, a GPU."""
    from robint_ray.data import load_split, stack
    from robint_ray.models import build_model
    from robint_ray.train import make_optimizer, train_epoch

    x, y = stack(load_split("sample", "val", val_fraction=0.2))
    batches = [(x[i : i + 16], y[i : i + 16]) for i in (0, 16)]
    torch.manual_seed(0)
    model = build_model("cifar_resnet8", 10).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg = tiny(adversarial=True, **{"pgd.steps": 2})
    optimizer = make_optimizer(model.parameters(), cfg.optim)
    generator = torch.Generator(device=device).manual_seed(0)
    losses = []
    for _ in range(10):
        sums = train_epoch(
            model,
            batches,
            optimizer,
            pgd_cfg=cfg.pgd,
            device=device,
            bf16=bf16,
            channels_last=channels_last,
            generator=generator,
        )
        losses.append(sums["loss_sum"] / sums["n"])
    assert sums["n"] == 32 and all(map(math.isfinite, losses)), losses
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_setting_reaches_cudnn(deterministic):
    """`--set deterministic=true` trades cuDNN's autotuned kernels for deterministic ones on a GPU."""
    from robint_ray.config import load_config
    from robint_ray.train import configure_cudnn

    cfg = load_config(None, [f"deterministic={str(deterministic).lower()}"])
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        configure_cudnn(cfg.deterministic)
        assert torch.backends.cudnn.deterministic is deterministic
        assert torch.backends.cudnn.benchmark is not deterministic
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


def test_a_run_in_s3_trains_resumes_and_evaluates_from_the_bucket(interrupted_s3_run, run_cli):
    """`robint train --out s3://...`, then `--resume s3://...`, then `robint eval --checkpoint
    s3://.../best`: every file of the run is in the bucket and nothing else is written. The drivers
    (interrupted_s3_run's) are joined to the session's Ray, whose workers know the S3 endpoint (conftest).
    (Resuming a finished run with more epochs is test_train_options.py's init test.)"""
    from robint_ray.checkpoint import read_meta

    run, cwd, stopped_after = interrupted_s3_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["resumed_from_epoch"] == stopped_after >= 1
    assert {"config.yaml", "metrics.jsonl", "best", "test.json", "tensorboard", "workers", "ray"} <= set(run.list())
    assert any(name.startswith("events.") for name in (run / "tensorboard").list())
    assert "epoch_0003" in (run / "ray" / "train").list()
    test = (run / "test.json").read_json()
    assert read_meta(run / "best")["metrics"]["epoch"] == test["test_epoch"] == rows[-1]["best_epoch"]
    assert sorted(p.name for p in cwd.iterdir()) == ["tiny.yaml"]  # nothing written locally
    assert evaluates(run_cli, (run / "best").uri)
