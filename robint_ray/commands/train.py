"""robint train: standard or PGD adversarial training on Ray Train, data-parallel over workers.

    robint train experiments/cifar10_robust_l2.yaml --out runs/robust --workers 2
    robint train experiments/smoke/cifar10_robust_l2.yaml --set epochs=3 --set optim.lr=0.05 --out RUN
    robint train --resume runs/robust                       # continue a stopped run
    robint train --resume runs/robust --set epochs=150      # ... or train it for longer
    ray job submit --working-dir . -- robint train experiments/cifar10_robust_l2.yaml \\
        --set data.path=/abs/path/cifar10.npz --out /shared/runs/robust --workers 4 --gpus-per-worker 1

Writes RUN_DIR/config.yaml, metrics.jsonl, best/ (for `robint eval --checkpoint RUN_DIR/best`),
test.json, tensorboard/ and Ray Train's checkpoints under RUN_DIR/ray/. RUN_DIR is a local path or a
storage URI (--out s3://bucket/runs/robust); every node must be able to write it (checked first).
Joins the running cluster ($RAY_ADDRESS as under `ray job submit`, or one `ray start` started on this
machine), else starts a local Ray on 127.0.0.1. Where the cluster's autoscaler must first add nodes for
the workers, waits for them up to --wait-timeout seconds (then one line, exit status 1; nothing of the run
is lost: --resume goes on).
"""

from __future__ import annotations

import argparse
import sys

from .common import add_wait_argument, output_location

# Settings that may change when a run is resumed; any other difference is refused.
RESUMABLE_CHANGES = {
    "epochs",
    "max_failures",
    "log_every",
    "cpus_per_worker",
    "eval_batch_size",
    "test",
    "data.loader_workers",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="experiment YAML, a path or a storage URI (optional with --resume)")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted, e.g. optim.lr=0.05; value read as YAML); repeatable",
    )
    parser.add_argument("--out", help="run folder to create, a path or a storage URI (must not hold a run yet)")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (a path or URI) from its latest checkpoint"
    )
    parser.add_argument("--workers", type=int, default=1, help="training workers (default: 1)")
    parser.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per worker (default: 0, CPU training)")
    add_wait_argument(parser)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..errors import check
    from ..train import resolve_paths
    from ..train import run as train_run

    if args.resume is not None:
        check(
            args.out is None or output_location(args.out) == output_location(args.resume),
            "--out and --resume name different folders; give only --resume RUN_DIR",
        )
        run_dir = output_location(args.resume)
        stored_path = run_dir / "config.yaml"
        check(stored_path.is_file(), f"{run_dir}: no run to resume (no config.yaml)")
        stored = load_config(str(stored_path))
        cfg = resolve_paths(load_config(args.config, args.sets) if args.config else stored.override(args.sets))
        old, new = _flat(stored.to_dict()), _flat(cfg.to_dict())
        changed = sorted(k for k in old if old[k] != new[k])
        refused = [k for k in changed if k not in RESUMABLE_CHANGES]
        check(
            not refused,
            f"cannot resume {run_dir} with a different "
            + ", ".join(f"{k} ({old[k]!r} -> {new[k]!r})" for k in refused),
        )
    else:
        check(args.config is not None, "give an experiment CONFIG (or --resume RUN_DIR)")
        check(args.out is not None, "give --out RUN_DIR")
        run_dir, cfg = output_location(args.out), load_config(args.config, args.sets)

    from ray.train import TrainingFailedError

    try:
        metrics = train_run(
            cfg,
            run_dir,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            resume=args.resume is not None,
            wait_s=args.wait_timeout,
        )
    except TrainingFailedError as err:  # not bad input: report it, keep the run resumable
        print(
            f"robint train: training failed ({err}); continue it with: robint train --resume {run_dir}", file=sys.stderr
        )
        return 1
    print(f"run folder {run_dir}")
    if metrics:
        print(
            f"epochs {metrics.get('epoch')}, best epoch {metrics.get('best_epoch')} "
            f"(val score {metrics.get('best_val_score', float('nan')):.4f})"
        )
    if (run_dir / "test.json").is_file():
        test = (run_dir / "test.json").read_json()
        print(
            f"test (best epoch {test['test_epoch']}): clean accuracy {test['test_clean_accuracy']:.4f}, "
            f"PGD accuracy {test['test_adversarial_accuracy']:.4f} ({test['test_images']} images)"
        )
    print(f"evaluate with: robint eval --checkpoint {run_dir / 'best'}")
    return 0
