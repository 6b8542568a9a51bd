"""Training options that follow the authors' trainers: gradient clipping, batch norm over the whole
batch on several workers, and training from given weights (`init`)."""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from robint_ray.config import TrainConfig, dump_config


def tiny_cfg(**changes) -> TrainConfig:
    cfg = TrainConfig.from_dict(
        dict(
            arch="cifar_resnet8",
            epochs=1,
            batch_size=16,
            test=False,
            max_failures=0,
            data=dict(path="sample", val_fraction=0.2, train_n=32, val_n=16),
            optim=dict(lr=0.5, t_max=None),  # a large rate, so that clipping changes the step
        )
    )
    return cfg.override(changes)


# --- gradient clipping --------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [None, 0.1])
def test_clipped_update_equals_clip_grad_value_then_the_step(clip):
    from torch.utils.data import DataLoader

    from robint_ray.models import build_model
    from robint_ray.train import load_data, make_optimizer, train_epoch

    cfg = tiny_cfg(grad_clip=clip, **{"data.augment": False})
    torch.manual_seed(0)
    model = build_model(cfg.arch, 10)
    reference = copy.deepcopy(model)
    loader = DataLoader(load_data(cfg, "fit"), batch_size=16)
    train_epoch(
        model, loader, make_optimizer(model.parameters(), cfg.optim), device=torch.device("cpu"), grad_clip=clip
    )

    optimizer = make_optimizer(reference.parameters(), cfg.optim)
    reference.train()
    clipped = []
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        clipped.append(max(p.grad.abs().max().item() for p in reference.parameters()))
        if clip is not None:
            torch.nn.utils.clip_grad_value_(reference.parameters(), clip)
        optimizer.step()
    assert max(clipped) > 0.1  # the clip is active on these batches, so the test can tell the two apart
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)


def test_grad_clip_must_be_positive():
    from robint_ray.errors import InputError

    with pytest.raises(InputError, match="grad_clip must be > 0"):
        tiny_cfg(grad_clip=0)


# --- batch norm over the whole batch ------------------------------------------------------------


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.BatchNorm2d(2)
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=g) * 2 + 1, torch.randn(8, 2, 4, 4, generator=g)


def _one_process(sync: bool):
    """Output, input gradient of a summed loss, parameter gradients and running statistics of the
    whole batch of 8 in one process (plain batch norm, the reference)."""
    from robint_ray.train import sync_batch_norm

    net = _bn_net().train()
    if sync:
        sync_batch_norm(net)  # no process group: must behave as plain batch norm
    x, target = _batch()
    x.requires_grad_(True)
    out = net(x)
    ((out - target) ** 2).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in net.named_parameters()}, dict(net.state_dict())


def _worker(rank: int, world: int, folder: str) -> None:
    """One of two gloo workers, each with its half of the batch: the same step with synchronised batch
    norm, then with plain batch norm (each worker normalising its own half), saved per kind."""
    import torch.distributed as dist

    from robint_ray.train import sync_batch_norm

    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=world)
    try:
        for sync in (True, False):
            net = _bn_net().train()
            if sync:
                sync_batch_norm(net)
            x, target = _batch()
            part = slice(rank * 8 // world, (rank + 1) * 8 // world)  # this worker's half of the batch
            x = x[part].clone().requires_grad_(True)
            out = net(x)
            ((out - target[part]) ** 2).sum().backward()
            grads = {n: p.grad.clone() for n, p in net.named_parameters()}
            for g in grads.values():
                dist.all_reduce(g)  # a summed loss: the whole batch's gradient is the sum of the workers'
            torch.save(
                {"out": out.detach(), "x_grad": x.grad, "grads": grads, "state": dict(net.state_dict())},
                f"{folder}/{'sync' if sync else 'own'}-rank{rank}.pt",
            )
    finally:
        dist.destroy_process_group()


def _two_workers(tmp_path: Path) -> dict[str, tuple]:
    """{"sync": ..., "own": ...}: each the whole batch's output, input gradient, rank 0's parameter
    gradients and both workers' state (one pair of processes for both kinds)."""
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    results = {}
    for kind in ("sync", "own"):
        parts = [torch.load(tmp_path / f"{kind}-rank{r}.pt", weights_only=True) for r in range(2)]
        results[kind] = (
            torch.cat([p["out"] for p in parts]),
            torch.cat([p["x_grad"] for p in parts]),
            parts[0]["grads"],
            [p["state"] for p in parts],
        )
    return results


def test_synchronised_batch_norm_on_two_gloo_workers_equals_one_process(tmp_path):
    out, x_grad, grads, state = _one_process(sync=False)
    same = _one_process(sync=True)
    torch.testing.assert_close(same[0], out, rtol=0, atol=0)  # without a process group: plain batch norm

    workers = _two_workers(tmp_path)
    synced = workers["sync"]
    torch.testing.assert_close(synced[0], out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(synced[1], x_grad, rtol=1e-4, atol=1e-5)  # what the training attack steps on
    for name in grads:
        torch.testing.assert_close(synced[2][name], grads[name], rtol=1e-4, atol=1e-4, msg=name)
    for worker_state in synced[3]:  # each worker's running statistics are the whole batch's
        for name in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var", "4.num_batches_tracked"):
            torch.testing.assert_close(worker_state[name], state[name], rtol=1e-5, atol=1e-6, msg=name)

    # Without it each worker normalises its own 4 images: the statistics differ (the check can fail).
    own = workers["own"]
    assert not torch.allclose(own[0], out, atol=1e-3)


def test_sync_batch_norm_keeps_the_checkpoint_layout():
    from robint_ray.models import build_model
    from robint_ray.train import SyncBatchNorm2d, sync_batch_norm

    plain = build_model("cifar_resnet8", 10)
    synced = sync_batch_norm(copy.deepcopy(plain))
    assert any(isinstance(m, SyncBatchNorm2d) for m in synced.modules())
    assert list(synced.state_dict()) == list(plain.state_dict())
    build_model("cifar_resnet8", 10).load_state_dict(synced.state_dict())


# --- init: training from given weights -----------------------------------------------------------


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture
def bad_inits(tmp_path, resnet20_path):
    (tmp_path / "code.pt").write_bytes(pickle.dumps({"weight": _RunsCode()}))
    return {
        "missing": (tmp_path / "nope.pt", "init weights not found"),
        "wrong architecture": (resnet20_path.parent / "resnet32-d509ac18.th", "does not fit architecture"),
        "code": (tmp_path / "code.pt", "weights_only=True refused it"),
    }


@pytest.mark.parametrize("case", ["missing", "wrong architecture", "code"])
def test_a_bad_init_exits_2_with_one_line_and_starts_nothing(bad_inits, case, tmp_path, run_cli):
    path, message = bad_inits[case]
    config = tmp_path / "cfg.yaml"
    config.write_text(dump_config(tiny_cfg(arch="cifar_resnet20", init=str(path))))
    code, out, err = run_cli(["train", config, "--out", tmp_path / "run"])
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # nothing started: no run folder, no worker


def test_the_model_before_its_first_step_is_the_init_weights(resnet20_path, sample_test, tmp_path):
    """The worker's starting model (`initial_model`) evaluates exactly as `robint eval --weights` does."""
    from robint_ray.checkpoint import load_weights
    from robint_ray.config import load_config
    from robint_ray.train import initial_model

    (tmp_path / "cfg.yaml").write_text(f"arch: cifar_resnet20\ninit: {resnet20_path}\n")
    cfg = load_config(tmp_path / "cfg.yaml")
    x = sample_test[0][:64]
    start = initial_model(cfg, 10).eval()
    with torch.no_grad():
        torch.testing.assert_close(start(x), load_weights("cifar_resnet20", resnet20_path)(x), rtol=0, atol=0)
    # and a checkpoint folder serves as init too, also read relative to the config file
    from robint_ray.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", start)
    (tmp_path / "cfg2.yaml").write_text("arch: cifar_resnet20\ninit: ckpt\n")
    again = initial_model(load_config(tmp_path / "cfg2.yaml"), 10).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), start(x), rtol=0, atol=0)


@pytest.mark.ray
def test_training_from_init_starts_there_and_resume_continues_its_own_run(ray_local, resnet20_path, tmp_path, run_cli):
    """One standard epoch (one step) from the pretrained ResNet-20 on 64 sample images: accuracy on 100
    validation images is the pretrained model's level (about 90 %) at once, where a random start sits
    near 10 % (100 images put 0.7 many standard errors from both). --resume continues the run's own
    checkpoint, and refuses another init. Most of the time is Ray Train's start-up, twice; the images
    are few because the epochs are not what is checked. (The per-epoch validation attack is PGD-1, not
    the default PGD-20: its accuracy is not what is checked here.)"""
    import json

    cfg = tiny_cfg(
        arch="cifar_resnet20",
        init=str(resnet20_path),
        batch_size=64,
        **{"data.train_n": 64, "data.val_n": 100, "optim.lr": 0.001, "pgd.steps": 1},
    )
    config = tmp_path / "cfg.yaml"
    config.write_text(dump_config(cfg))
    run_dir = tmp_path / "run"
    code, _, err = run_cli(["train", config, "--out", run_dir])
    assert code == 0, err
    first = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert first[0]["val_clean_accuracy"] > 0.7, first

    code, _, err = run_cli(["train", "--resume", run_dir, "--set", f"init={tmp_path / 'other.pt'}"])
    assert code == 2 and "init" in err
    code, _, err = run_cli(["train", "--resume", run_dir, "--set", "epochs=2"])
    assert code == 0, err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["resumed_from_epoch"] == 1
