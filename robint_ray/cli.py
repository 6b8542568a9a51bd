"""`robint` command line: one subcommand per module in `robint_ray/commands/`.

Each command module has `configure(parser)` and `run(args) -> int`, and imports its heavy
dependencies inside `run`, so that `robint --help` stays fast. Bad input (an `InputError`) becomes one
line on stderr and exit status 2, a cluster that cannot run the job (a `ClusterError`) one line and exit
status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .allocator import tune_allocator
from .errors import ClusterError, InputError

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
    except ClusterError as err:
        print(f"robint {args.command}: {err}", file=sys.stderr)
        return 1
