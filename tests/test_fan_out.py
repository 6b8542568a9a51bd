"""distributed.fan_out, the one switch between this process and Ray tasks: the same results either way,
the resources a caller gives reach the Ray tasks, a bounded window of tasks in flight, results in shard
order (fan_out) or as they finish (fan_out_iter), progress reported from inside a shard."""

from __future__ import annotations

import time

import pytest
import torch

from robint_ray.distributed import IN_PROCESS, Tasks, fan_out, fan_out_iter, report_progress
from robint_ray.errors import InputError

pytestmark = pytest.mark.ray

ONE_CPU = dict(cpus=1, gpus=0)


@pytest.fixture(scope="module")
def spans():
    """A task function (defined here, so that Ray ships it by value): (shard, start, end) of a task
    that takes `pause` seconds and reports its progress in two steps."""

    def spans(shard, *, pause):
        start = time.time()
        time.sleep(pause / 2)
        report_progress(1)
        time.sleep(pause / 2)
        report_progress(1)
        return shard, start, time.time()

    return spans


@pytest.fixture(scope="module")
def mix():
    """A pure function of its shard and shared values (shipped by value, as `spans`): a seeded draw per
    shard and a matrix product."""

    def mix(shard: torch.Tensor, *, weight: torch.Tensor, seed: int) -> torch.Tensor:
        noise = torch.rand(shard.shape, generator=torch.Generator().manual_seed(seed + int(shard[0, 0])))
        report_progress(len(shard))
        return torch.tanh((shard + noise) @ weight)

    return mix


@pytest.fixture(scope="module")
def assigned():
    """What Ray gave the task running a shard, the threads torch uses there, and its GPU ids."""

    def assigned(shard):
        import ray

        return ray.get_runtime_context().get_assigned_resources(), torch.get_num_threads(), ray.get_gpu_ids()

    return assigned


def test_in_process_and_ray_give_the_same_results_in_shard_order(ray_local, mix):
    generator = torch.Generator().manual_seed(0)
    shards = [i + torch.rand(n, 2, generator=generator) for i, n in enumerate([2, 3, 1, 4, 2, 3])]  # (n, 2) each
    shared = {"weight": torch.rand(2, 5, generator=generator), "seed": 7}
    here = fan_out(mix, shards, tasks=IN_PROCESS, shared=shared, sizes=[len(s) for s in shards], progress=True)
    on_ray = fan_out(mix, shards, tasks=Tasks(2, **ONE_CPU), shared=shared, sizes=[len(s) for s in shards])
    alone = [mix(shard, **shared) for shard in shards]
    assert len(here) == len(on_ray) == len(shards)
    for a, b, c in zip(here, on_ray, alone):
        assert torch.equal(a, c) and torch.equal(b, c)
    # fan_out_iter in this process: every shard once, in shard order.
    assert [i for i, _ in fan_out_iter(mix, shards, tasks=IN_PROCESS, shared=shared, progress=False)] == list(
        range(len(shards))
    )


@pytest.mark.parametrize("cpus, threads", [(2, 2), (0.5, 1)])
def test_the_resources_asked_for_reach_the_ray_tasks(ray_local, assigned, cpus, threads):
    """Each task is given what its caller asked for (Ray's own record of the task), and torch there uses
    that many threads; no GPU was asked for, so none is given (test_gpu_stages.py: GPUs)."""
    results = fan_out(assigned, [0, 1, 2], tasks=Tasks(2, cpus=cpus, gpus=0), progress=False)
    for resources, used, gpus in results:
        assert resources == {"CPU": cpus} and used == threads and gpus == []


def test_ray_tasks_need_their_resources_stated():
    with pytest.raises(InputError, match="need their resources"):
        Tasks(2)
    with pytest.raises(InputError, match="need their resources"):
        Tasks(1, cpus=1)
    with pytest.raises(InputError, match="workers must be >= 0"):
        Tasks(-1)
    assert not IN_PROCESS.on_ray and Tasks(1, **ONE_CPU).on_ray


def test_at_most_workers_tasks_run_at_once_and_results_keep_shard_order(ray_local, spans):
    results = fan_out(spans, list(range(6)), tasks=Tasks(1, **ONE_CPU), shared={"pause": 0.4}, sizes=[2] * 6)
    assert [r[0] for r in results] == list(range(6))
    spans = sorted((start, end) for _, start, end in results)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:]))  # one at a time


def test_fan_out_iter_yields_every_shard_once(ray_local, spans):
    seen = [
        i
        for i, (shard, _, _) in fan_out_iter(
            spans, list(range(5)), tasks=Tasks(2, **ONE_CPU), shared={"pause": 0.05}, progress=False
        )
        if i == shard
    ]
    assert sorted(seen) == list(range(5))


def test_report_progress_outside_a_fan_out_does_nothing():
    report_progress(3)


def test_asking_for_a_gpu_on_a_cluster_without_one_fails_at_once(ray_local, spans):
    with pytest.raises(InputError, match="no GPU"):
        fan_out(spans, [0], tasks=Tasks(1, cpus=1, gpus=0.5), shared={"pause": 0.0}, progress=False)


def test_a_lost_progress_counter_never_fails_the_fan_out(ray_local, spans, monkeypatch, caplog):
    """Progress from inside tasks is best effort: with its counter actor killed (as when a node dies),
    every shard still comes back, in order. The counter lives on the driver's node (here, the only one)."""
    import ray

    from robint_ray import distributed

    made = []

    def killed_counter():
        counter = made_counter()
        made.append(counter)
        ray.kill(counter)
        return counter

    made_counter = distributed._progress_counter
    monkeypatch.setattr(distributed, "_progress_counter", killed_counter)
    results = fan_out(spans, list(range(4)), tasks=Tasks(2, **ONE_CPU), shared={"pause": 0.2}, sizes=[2] * 4)
    assert [r[0] for r in results] == list(range(4)) and len(made) == 1
    assert "progress counter lost" in caplog.text
