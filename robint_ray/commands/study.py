"""robint study: the whole paper as one job (train, evaluate, explain, generate + FID, invert,
visualise features), then one HTML report and one JSON.

    robint study experiments/paper/cifar10.yaml --out runs/paper-cifar10
    ray job submit --working-dir . -- robint study experiments/paper/cifar10.yaml --out s3://bucket/paper-cifar10

--out is a local path or a storage URI (s3://bucket/prefix; or a folder that every node mounts at the
same path, e.g. NFS); before any work every node of the cluster is checked to write and read there.
A rerun with the same --out skips every finished stage (and every generated shard), so a failed or
killed job resumes where it stopped. Where the cluster's autoscaler must first add nodes for a stage
(training's workers, or one Ray task of a later stage), the stage waits for them up to --wait-timeout
seconds, then stops in one line, exit status 1: the stages done are kept, and a rerun goes on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_wait_argument, output_location


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="study config (YAML), e.g. experiments/smoke/paper_cifar10.yaml")
    parser.add_argument(
        "--out",
        required=True,
        help="output folder, a path or a storage URI (s3://bucket/prefix; "
        "on a multi-node cluster a URI or shared storage)",
    )
    parser.add_argument("--workers", type=int, default=None, help="override the config's workers")
    parser.add_argument(
        "--gpus-per-task",
        type=float,
        default=None,
        help="GPUs per Ray task of every stage after training, fractions allowed (default: the "
        "config's gpus_per_task, else on a cluster with GPUs 1 per evaluation, attribution and "
        "generation task and 1/4 per inversion and feature task; 0 without GPUs)",
    )
    parser.add_argument(
        "--cpus-per-task",
        type=float,
        default=None,
        help="CPUs per Ray task of those stages (default: the config's cpus_per_task, 1)",
    )
    add_wait_argument(parser)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..errors import check
    from ..study import Study, load_study

    out = output_location(args.out)
    config = load_study(args.config)
    if args.workers is not None:
        check(args.workers >= 1, f"--workers must be >= 1, got {args.workers}")
        config = dataclasses.replace(config, workers=args.workers)
    for key in ("gpus_per_task", "cpus_per_task"):
        if getattr(args, key) is not None:  # StudyConfig checks the values
            config = dataclasses.replace(config, **{key: getattr(args, key)})
    study = Study(config, out, wait_s=args.wait_timeout)
    for name in ("standard", "robust"):  # a bad training config is one line before Ray starts
        if getattr(config, name).train is not None:
            study.train_config(name)
    page = study.run()
    print(f"report: {page}")
    print(f"numbers: {page.parent / 'report.json'}")
    return 0
