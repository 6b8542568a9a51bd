"""distributed.fan_out on a real local Ray instance: a bounded window of tasks in flight, results in
shard order (fan_out) or as they finish (fan_out_iter), progress reported from inside a task."""

from __future__ import annotations

import time

import pytest

from robint_ray.distributed import fan_out, fan_out_iter, report_progress

pytestmark = pytest.mark.ray


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


def test_at_most_max_in_flight_tasks_run_at_once_and_results_keep_shard_order(ray_local, spans):
    results = fan_out(spans, list(range(6)), shared={"pause": 0.4}, max_in_flight=1, sizes=[2] * 6, progress=True)
    assert [r[0] for r in results] == list(range(6))
    spans = sorted((start, end) for _, start, end in results)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:]))  # one at a time


def test_fan_out_iter_yields_every_shard_once(ray_local, spans):
    seen = [
        i
        for i, (shard, _, _) in fan_out_iter(
            spans, list(range(5)), shared={"pause": 0.05}, max_in_flight=2, progress=False
        )
        if i == shard
    ]
    assert sorted(seen) == list(range(5))


def test_report_progress_outside_a_task_does_nothing():
    report_progress(3)


def test_asking_for_a_gpu_on_a_cluster_without_one_fails_at_once(ray_local, spans):
    from robint_ray.errors import InputError

    with pytest.raises(InputError, match="no GPU"):
        fan_out(spans, [0], shared={"pause": 0.0}, num_gpus=0.5, progress=False)


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
    results = fan_out(spans, list(range(4)), shared={"pause": 0.2}, max_in_flight=2, sizes=[2] * 4, progress=True)
    assert [r[0] for r in results] == list(range(4)) and len(made) == 1
    assert "progress counter lost" in caplog.text
