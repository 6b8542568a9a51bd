"""PGD adversarial-training throughput: Ray Train (N workers x 1 thread, DDP over gloo) against a plain
single-process loop with N threads, same model, global batch, attack and data.

    .venv/bin/python experiments/benchmarks/bench_train.py                 # cifar_resnet8, batch 64, PGD-5
    .venv/bin/python experiments/benchmarks/bench_train.py --arch cifar_resnet20 --steps 10 --json out.json

Both sides run the library's `train_epoch` (the attack on the unwrapped module, then one forward and
backward); Ray Train runs it through `robint_ray.train.run`, the code path of `robint train`.
Images/s counts training images (each attacked with `--steps` PGD steps) over the time of the training
passes only, after a warm-up epoch; validation is excluded on both sides. The plain loop is measured
before and after the Ray run and averaged, to spread the drift of a shared machine over both.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from robint_ray.allocator import tuned_malloc_label
from robint_ray.config import TrainConfig
from robint_ray.models import build_model
from robint_ray.train import load_data, make_optimizer, run, train_epoch


def config(args) -> TrainConfig:
    return TrainConfig.from_dict(
        dict(
            arch=args.arch,
            epochs=args.epochs,
            batch_size=args.batch_size,
            adversarial=True,
            test=False,
            max_failures=0,
            log_every=1000,
            cpus_per_worker=1,
            pgd=dict(norm="l2", eps=0.5, step_size=0.1, steps=args.steps),
            data=dict(path="sample", val_fraction=0.2, train_n=args.train_n, val_n=args.workers),
            optim=dict(lr=0.05, t_max=None),
        )
    )


def plain_images_per_s(cfg: TrainConfig, threads: int) -> list[float]:
    """One process, `threads` intra-op threads: images/s of each epoch after the first."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch)
    optimizer = make_optimizer(model.parameters(), cfg.optim)
    loader = DataLoader(load_data(cfg, "fit"), batch_size=cfg.batch_size, shuffle=True, drop_last=False)
    rates = []
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        sums = train_epoch(model, loader, optimizer, pgd_cfg=cfg.pgd, device=torch.device("cpu"))
        if epoch > 0:
            rates.append(sums["n"] / (time.perf_counter() - started))
    return rates


def ray_images_per_s(cfg: TrainConfig, workers: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        run(cfg, Path(tmp) / "run", workers=workers)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return [row["train_images_per_s"] for row in rows[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="cifar_resnet8")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (default: 64)")
    parser.add_argument("--steps", type=int, default=5, help="PGD steps per batch (default: 5)")
    parser.add_argument("--train-n", type=int, default=800, help="training images per epoch (default: 800)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs, the first a warm-up (default: 3)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers = plain-loop threads (default: 2)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    malloc = tuned_malloc_label()
    logging.basicConfig(level=logging.WARNING)

    from robint_ray.distributed import init_ray

    cfg = config(args)
    init_ray(num_cpus=args.workers)
    load_before = os.getloadavg()[0]
    plain = plain_images_per_s(cfg, args.workers)
    ray_rates = ray_images_per_s(cfg, args.workers)
    plain += plain_images_per_s(cfg, args.workers)
    load_after = os.getloadavg()[0]
    ray_ips, plain_ips = statistics.mean(ray_rates), statistics.mean(plain)
    result = {
        "arch": args.arch,
        "batch_size": args.batch_size,
        "pgd_steps": args.steps,
        "train_images": args.train_n,
        "workers": args.workers,
        "ray_train_images_per_s": ray_ips,
        "plain_images_per_s": plain_ips,
        "ratio": ray_ips / plain_ips,
        "ray_epochs": ray_rates,
        "plain_epochs": plain,
        "load_average": [load_before, load_after],
        "torch": torch.__version__,
    }
    print(f"{args.arch}, global batch {args.batch_size}, L2 PGD-{args.steps}, {args.train_n} images/epoch, {malloc}")
    print(
        f"  Ray Train, {args.workers} workers x 1 thread (DDP, gloo): {ray_ips:8.1f} img/s  "
        f"(epochs: {', '.join(f'{r:.1f}' for r in ray_rates)})"
    )
    print(
        f"  plain loop, 1 process x {args.workers} threads:        {plain_ips:8.1f} img/s  "
        f"(epochs: {', '.join(f'{r:.1f}' for r in plain)})"
    )
    print(
        f"  ratio Ray / plain: {ray_ips / plain_ips:.3f}   (1-min load average {load_before:.1f} -> {load_after:.1f}, "
        f"{os.cpu_count()} CPUs)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
