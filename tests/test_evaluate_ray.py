"""Evaluation as Ray tasks sharded per batch of fixed position: the same per-example figures, in
input order, as one process, for PGD and AutoAttack; progress reported from inside the tasks."""

from __future__ import annotations

import pytest
import torch

from robint_ray.config import PGDSettings
from robint_ray.distributed import Tasks
from robint_ray.evaluate import AttackConfig, correctness, evaluate

pytestmark = pytest.mark.ray

BUDGET = PGDSettings(norm="l2", eps=0.1, step_size=0.025, steps=10)  # AutoAttack: its norm and eps
ONE_CPU = dict(cpus=1, gpus=0)  # per Ray task


@pytest.fixture(scope="module")
def images(cifar_exact):
    from robint_ray.data import load_split, take

    return take(load_split(cifar_exact, "test"), 40)


@pytest.mark.parametrize(
    "attack",
    [
        AttackConfig(kind="pgd", pgd=BUDGET),
        AttackConfig(
            kind="autoattack", pgd=BUDGET, autoattack_version="custom", autoattack_attacks=("apgd-ce",), seed=3
        ),
        pytest.param(
            AttackConfig(
                kind="autoattack",
                pgd=BUDGET,
                autoattack_version="custom",
                autoattack_attacks=("apgd-ce", "apgd-t"),
                seed=3,
            ),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["pgd", "autoattack-apgd-ce", "autoattack"],
)  # apgd-t: 2 minutes on 2 cores
def test_sharded_over_two_workers_equals_one_process(ray_local, resnet20, images, attack):
    # PGD: 40 images in 10 batches of 4. AutoAttack (100 APGD steps a batch, run three times here): 8
    # images in 4 batches of 2, the fewest that still leave batches of several images (a shard plan that
    # cut them elsewhere would change what AutoAttack sees), 2 shards for the 2 tasks and an uneven plan
    # (3 + 1 batches) for the single task; on these 8 the attack still fools 4 of the 8 correct answers.
    n, batch_size = (40, 4) if attack.kind == "pgd" else (8, 2)
    subset = torch.utils.data.Subset(images, range(n))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tasks (1 CPU each): the same kernels, the same rounding
    try:
        alone = correctness(resnet20, subset, attack=attack, batch_size=batch_size)
    finally:
        torch.set_num_threads(threads)
    # 2 tasks at a time, shards of 2 batches (5 or 2 shards): the batches are those of the single process.
    # evaluate() runs correctness() so and gives its per-example answers and the figures made of them.
    figures = evaluate(
        resnet20,
        subset,
        attack=attack,
        per_image=True,
        batch_size=batch_size,
        tasks=Tasks(2, **ONE_CPU),
        shard_batches=2,
    )
    sharded = tuple(torch.tensor(figures["per_image"][key], dtype=torch.bool) for key in ("clean", "adversarial"))
    # 1 task at a time, shards of 3 batches (4 or 2 shards, the last one shorter)
    one_worker = correctness(
        resnet20, subset, attack=attack, batch_size=batch_size, tasks=Tasks(1, **ONE_CPU), shard_batches=3
    )
    for got in (sharded, one_worker):
        assert torch.equal(got[0], alone[0]) and torch.equal(got[1], alone[1])
    clean, robust = int(alone[0].sum()), int(alone[1].sum())
    assert 0 < robust < clean, (clean, robust)  # the attack changes some answers, not all
    assert torch.all(alone[1] <= alone[0])  # robust implies clean
    assert (figures["n"], figures["clean_correct"], figures["adversarial_correct"]) == (n, clean, robust)


def test_results_come_back_in_input_order(ray_local, resnet20, images):
    """A shuffled copy of the images gives the shuffled per-example answers."""
    x = torch.stack([images[i][0] for i in range(len(images))])
    y = torch.tensor([images[i][1] for i in range(len(images))])
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    attack = AttackConfig(kind="pgd", pgd=BUDGET.given(steps=5))
    straight = correctness(resnet20, torch.utils.data.TensorDataset(x, y), attack=attack, batch_size=40)
    shuffled = correctness(
        resnet20,
        torch.utils.data.TensorDataset(x[perm], y[perm]),
        attack=attack,
        batch_size=4,
        tasks=Tasks(2, **ONE_CPU),
        shard_batches=1,
    )
    assert torch.equal(shuffled[0], straight[0][perm]) and torch.equal(shuffled[1], straight[1][perm])
