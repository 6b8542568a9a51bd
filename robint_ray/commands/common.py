"""What several `robint` commands share: the model arguments and how they load a model, the Ray task
resources arguments. The commands import this module, never robint_ray.cli (which imports them)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (one of --checkpoint or --arch with --weights)")
    group.add_argument(
        "--checkpoint",
        help="a robint checkpoint folder, a path or a storage URI (e.g. RUN_DIR/best, s3://bucket/run/best)",
    )
    group.add_argument("--arch", help="architecture, e.g. cifar_resnet20, cifar_resnet18, resnet50")
    group.add_argument("--weights", type=Path, help="weights file for --arch (.th/.pt/.pth state dict or .safetensors)")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def add_resource_arguments(parser: argparse.ArgumentParser) -> None:
    """--gpus-per-task / --cpus-per-task: the resources of each Ray task the command runs."""
    group = parser.add_argument_group("Ray task resources")
    group.add_argument(
        "--gpus-per-task",
        type=float,
        default=None,
        help="GPUs per Ray task, fractions allowed (e.g. 0.25: four tasks share a GPU; default: 1 "
        "on a cluster with GPUs, else 0)",
    )
    group.add_argument(
        "--cpus-per-task",
        type=float,
        default=None,
        help="CPUs per Ray task; torch in the task uses that many threads (default: 1)",
    )


def task_resources_of(args: argparse.Namespace, *, device: str | None = None):
    """A `distributed.task_resources` block with the command's --gpus-per-task / --cpus-per-task: its Ray
    tasks ask for these and run on their own device. Without --gpus-per-task: 1 where `device` (the
    user's --device) names cuda, 0 where it names cpu, else 1 on a cluster with GPUs (Ray's resource
    table, not this process's CUDA: the driver may sit on a CPU-only head)."""
    from ..distributed import default_gpus_per_task, task_resources

    gpus = args.gpus_per_task
    if gpus is None and device is not None:
        gpus = 1.0 if str(device).startswith("cuda") else 0.0
    return task_resources(gpus_per_task=default_gpus_per_task(gpus), cpus_per_task=args.cpus_per_task)


def resolve_device(name: str | None):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_model(args: argparse.Namespace):
    """The model named by --checkpoint or --arch/--weights, in eval mode, and a description of it."""
    from ..checkpoint import load_checkpoint, load_weights

    device = resolve_device(args.device)
    if args.checkpoint is not None:
        if args.arch is not None or args.weights is not None:
            raise InputError("give either --checkpoint or --arch with --weights, not both")
        model, meta = load_checkpoint(args.checkpoint, device=device)
        return model, {"checkpoint": str(args.checkpoint), "arch": meta["arch"], "classes": meta["classes"]}
    if args.arch is None or args.weights is None:
        raise InputError("a model is needed: --checkpoint DIR, or --arch A with --weights W")
    model = load_weights(args.arch, args.weights, device=device)
    return model, {"arch": args.arch, "weights": str(args.weights), "classes": None}
