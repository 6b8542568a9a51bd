"""robint tune: a Ray Tune sweep over the PGD budget (eps, step size, steps) and the learning rate,
each trial a distributed Ray Train run, stopped early by ASHA on mean(val clean, val PGD) accuracy.

    robint tune experiments/sweep_cifar10_l2.yaml --out sweeps/cifar10_l2
    robint tune experiments/sweep_cifar10_l2.yaml --out sweeps/cifar10_l2 --resume   # after an interruption
    robint train sweeps/cifar10_l2/best.yaml --out runs/best                         # the winner, in full

Writes SWEEP_DIR/results.csv (one row per trial), tradeoff.png (clean vs PGD accuracy, Pareto front) and
best.yaml (a training config). Joins the running cluster ($RAY_ADDRESS, or one `ray start` started on
this machine), else starts a local Ray. Where the cluster's autoscaler must first add nodes for one
trial's workers, waits for them up to --wait-timeout seconds (then one line, exit status 1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_wait_argument, output_location


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="sweep YAML (see experiments/sweep_cifar10_l2.yaml)")
    parser.add_argument(
        "--out", required=True, help="sweep folder, a path or a storage URI (must not hold a sweep, unless --resume)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted sweep in --out: finished trials are not run again",
    )
    add_wait_argument(parser)


def run(args: argparse.Namespace) -> int:
    import sys

    from ..sweep import best_row, load_sweep
    from ..tune import SweepInterrupted, run_sweep

    sweep_dir = output_location(args.out)
    try:
        rows = run_sweep(load_sweep(args.config), sweep_dir, resume=args.resume, wait_s=args.wait_timeout)
    except SweepInterrupted as err:
        print(f"robint tune: {err}: robint tune {args.config} --out {args.out} --resume", file=sys.stderr)
        return 1
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    print(
        f"sweep folder {sweep_dir}: {len(rows)} trials ("
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + ")"
    )
    best = best_row(rows)
    params = ", ".join(f"{k}={best[k]:g}" for k in best if "." in k and best[k] is not None)
    print(
        f"best trial {best['trial_id']}: {params}; val clean {best['val_clean_accuracy']:.4f}, "
        f"val PGD {best['val_adversarial_accuracy']:.4f} (best val score {best['best_val_score']:.4f})"
    )
    print(f"train it with: robint train {sweep_dir / 'best.yaml'} --out RUN_DIR")
    return 0
