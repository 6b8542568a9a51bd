"""What several `robint` commands share: the model arguments and how they load a model, the PGD budget
arguments and the budget they make, the Ray task resources arguments and where the fan-outs run (the
one Ray block of every command, `fan_out_tasks`), the output folder and the --json file. The commands
import this module, never robint_ray.cli (which imports them)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

from ..errors import InputError, check
from ..storage import Location


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (one of --checkpoint or --arch with --weights)")
    group.add_argument(
        "--checkpoint",
        help="a robint checkpoint folder, a path or a storage URI (e.g. RUN_DIR/best, s3://bucket/run/best)",
    )
    group.add_argument("--arch", help="architecture, e.g. cifar_resnet20, cifar_resnet18, resnet50")
    group.add_argument(
        "--weights", help="weights file for --arch (.th/.pt/.pth state dict or .safetensors), a path or a storage URI"
    )
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def add_resource_arguments(parser: argparse.ArgumentParser, workers: int | None) -> None:
    """--workers / --gpus-per-task / --cpus-per-task: where the command's fan-outs run and the resources
    of each Ray task (read by `fan_out_tasks`); `workers` is the command's default for --workers."""
    group = parser.add_argument_group("where the work runs: Ray tasks and their resources")
    default = {None: "twice the cluster's CPUs", 0: "0, in this process"}.get(workers, str(workers))
    group.add_argument(
        "--workers",
        type=int,
        default=workers,
        help=f"Ray tasks at a time; 0 runs in this process (default: {default})",
    )
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


def add_pgd_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """--norm / --eps / --step-size / --steps: the command's PGD budget, each where given in place of the
    command's default budget (described by `default`); `pgd_settings` makes the budget."""
    group = parser.add_argument_group(f"PGD budget (default: {default})")
    group.add_argument("--norm", default=None, help="l2 or linf")
    group.add_argument("--eps", type=float, default=None, help="radius of the ball, in pixels of [0, 1] images")
    group.add_argument("--step-size", type=float, default=None, help="length of one ascent step")
    group.add_argument("--steps", type=int, default=None, help="ascent steps")


def pgd_settings(args: argparse.Namespace, default):
    """The command's PGD budget (a `config.PGDSettings`, checked): `default` with --norm / --eps /
    --step-size / --steps where given."""
    return default.given(norm=args.norm, eps=args.eps, step_size=args.step_size, steps=args.steps)


def fan_out_tasks(args: argparse.Namespace, workers: int | None, *, device: str | None = None):
    """Where the command's fan-outs run (a `distributed.Tasks`): workers 0 in this process; else Ray
    tasks, at most `workers` at a time (None: `distributed.default_window()`), on the running cluster or
    a local Ray instance with room for them, each asking for --cpus-per-task CPUs (default 1) and
    --gpus-per-task GPUs. Without --gpus-per-task: 1 where `device` (the user's --device) names cuda, 0
    where it names cpu, else 1 on a cluster with GPUs (Ray's resource table, not this process's CUDA:
    the driver may sit on a CPU-only head)."""
    from ..distributed import IN_PROCESS, Tasks, default_gpus_per_task, default_window, init_ray

    check(workers is None or workers >= 0, f"--workers must be >= 0, got {workers}")
    if workers == 0:
        return IN_PROCESS
    cpus = 1.0 if args.cpus_per_task is None else args.cpus_per_task
    check(cpus > 0, f"--cpus-per-task must be > 0, got {cpus}")
    init_ray(num_cpus=None if workers is None else max(1, math.ceil(workers * cpus)))
    gpus = args.gpus_per_task
    if gpus is None and device is not None:
        gpus = 1.0 if str(device).startswith("cuda") else 0.0
    return Tasks(workers or default_window(), cpus=cpus, gpus=default_gpus_per_task(gpus))


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


def load_driver_model(args: argparse.Namespace, *, fanned: bool, prefix: str = ""):
    """(model, its description, the --device asked for): the model named by the --{prefix}checkpoint or
    --{prefix}arch / --{prefix}weights arguments. Where the command fans out to Ray tasks (`fanned`) it
    is loaded on the CPU (the driver may sit on a CPU-only head; each task moves its copy to its own
    device), else on --device."""
    names = argparse.Namespace(
        checkpoint=getattr(args, f"{prefix}checkpoint"),
        arch=getattr(args, f"{prefix}arch"),
        weights=getattr(args, f"{prefix}weights"),
        device="cpu" if fanned else args.device,
    )
    model, source = load_model(names)
    return model, source, args.device


def add_wait_argument(parser: argparse.ArgumentParser) -> None:
    """--wait-timeout: how long a job waits for the cluster's room (robint_ray.cluster.wait_for_room)."""
    parser.add_argument(
        "--wait-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to wait for the room the job needs where an autoscaler may add nodes, before giving "
        "up in one line with exit status 1, what was done kept (default: $ROBINT_WAIT_TIMEOUT, else 1800)",
    )


def output_location(out: str) -> Location:
    """--out (or --json) as a Location, checked at once: a URI robint cannot use, or a store that does not
    answer, is an InputError of one line before any work or Ray starts."""
    return Location(out).reachable()


def in_output_folder(args: argparse.Namespace, run: Callable[[argparse.Namespace, Path, Location], int]) -> int:
    """run(args, a local folder, --out as a Location): the files written into the folder end up at --out
    (a local path, or a storage URI: uploaded when run has returned)."""
    where = output_location(args.out)
    with where.local_dir() as out:
        return run(args, out, where)


def write_json(where: Location | Path | None, result: dict) -> None:
    """--json, or a command's summary.json: its result as JSON at `where`, a Location or a local path
    (nothing where None: the option was not given)."""
    if where is not None:
        Location(where).write_json(result)
