"""`robint` command line: one subcommand per module in `robint_ray/commands/`.

Each command module has `configure(parser)` and `run(args) -> int`, and imports its heavy
dependencies inside `run`, so that `robint --help` stays fast. Bad input (an `InputError`) becomes one
line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from .allocator import tune_allocator
from .errors import InputError

COMMANDS = {
    "eval": "clean, PGD or AutoAttack accuracy of a model",
    "fid": "Frechet Inception Distance between two sets of images, on Ray",
    "train": "standard or PGD adversarial training on Ray Train (resumable)",
    "tune": "Ray Tune sweep of the PGD budget (eps, step size, steps) and learning rate, ASHA-stopped",
    "generate": "class-specific image generation (eq. 16), sharded over Ray, for FID",
    "invert": "representation inversion (eq. 15) from images of another class and from noise",
    "featvis": "direct feature visualisation (eq. 13-14) and the most/least activating test images",
    "explain": "Integrated Gradients or SHAP attributions with metrics and figures, on Ray",
    "study": "the paper end to end as one job: train, evaluate, explain, generate + FID, invert, report",
    "doctor": "on a Ray cluster's head: its nodes, which shipped config fits, CUDA on each GPU node, shared --out",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


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
    from .distributed import default_gpus_per_task, task_resources

    gpus = args.gpus_per_task
    if gpus is None and device is not None:
        gpus = 1.0 if str(device).startswith("cuda") else 0.0
    return task_resources(gpus_per_task=default_gpus_per_task(gpus), cpus_per_task=args.cpus_per_task)


def resolve_device(name: str | None):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_model(args: argparse.Namespace):
    """The model named by --checkpoint or --arch/--weights, in eval mode, and a description of it."""
    from .checkpoint import load_checkpoint, load_weights

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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robint", description="Robust vs standard models, interpreted at scale on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"robint_ray.commands.{name}")
        module.configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    module = importlib.import_module(f"robint_ray.commands.{args.command}")
    tune_allocator()  # CPU forward + backward passes up to 1.5x faster (experiments/benchmarks/bench_malloc.py)
    try:
        return module.run(args) or 0
    except InputError as err:
        print(f"robint {args.command}: error: {err}", file=sys.stderr)
        return 2
