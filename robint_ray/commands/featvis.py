"""robint featvis: direct feature visualisation (eq. 13-14) and the test images that activate the
visualised coordinates of R(x) most and least.

    robint featvis --arch cifar_resnet20 --weights resnet20-12fca82f.th \\
        --data ../shared/data/cifar10/cifar10_exact_subset.npz --features 13 42 3,7 --out runs/featvis

Each --features item is one coordinate of R(x) or several joined by commas (their mean is maximised,
eq. 14); without --features, --random-features coordinates are drawn with --seed (the paper picks
them at random). Each is maximised from --starts noise images (or test images, --start image). PGD
defaults are the paper's: L2 eps 1000, step 1, 400 steps. Writes OUT/featvis.npz (`images` uint8
(G*P, H, W, C), `labels` = feature group of each image, `features` (G, max |z|) padded with -1,
`top` / `bottom` positions in the split, their activations, `before` / `after` objective values)
and OUT/featvis.png.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from ..storage import Location
from .common import (
    add_model_arguments,
    add_pgd_arguments,
    add_resource_arguments,
    fan_out_tasks,
    in_output_folder,
    load_driver_model,
    pgd_settings,
    write_json,
)


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_resource_arguments(parser, workers=0)
    parser.add_argument("--data", required=True, help="dataset: .npz, CIFAR-10 folder, ImageFolder root, or 'sample'")
    parser.add_argument(
        "--split", default="test", help="split searched for the most/least activating images (default: test)"
    )
    parser.add_argument(
        "--features",
        nargs="+",
        default=None,
        help="coordinates of R(x): '130' or '3,7' (mean of several); one visualisation each",
    )
    parser.add_argument(
        "--random-features", type=int, default=4, help="without --features: how many to draw (default: 4)"
    )
    parser.add_argument(
        "--start", default="noise", choices=("noise", "image"), help="start from noise (default) or test images"
    )
    parser.add_argument("--starts", type=int, default=4, help="start images per feature (default: 4)")
    parser.add_argument("--top", type=int, default=8, help="most and least activating images to show (default: 8)")
    parser.add_argument("--out", required=True, help="output folder, a path or a storage URI (s3://...)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise starts and of random features")
    add_pgd_arguments(parser, "the paper's: L2 eps 1000, step 1, 400 steps")


def parse_features(items: list[str] | None, k: int, n_random: int, seed: int) -> list[list[int]]:
    import torch

    from ..errors import InputError, check

    if not items:
        check(1 <= n_random <= k, f"--random-features must lie in 1..{k}, got {n_random}")
        chosen = torch.randperm(k, generator=torch.Generator().manual_seed(seed))[:n_random]
        return [[int(i)] for i in chosen]
    groups = []
    for item in items:
        try:
            group = [int(part) for part in item.split(",") if part.strip()]
        except ValueError:
            raise InputError(f"--features: {item!r} is not a coordinate or a comma-separated list of them") from None
        check(group and all(0 <= i < k for i in group), f"--features: {item!r} needs coordinates in 0..{k - 1}")
        groups.append(group)
    return groups


def run(args: argparse.Namespace) -> int:
    return in_output_folder(args, _run)


def _run(args: argparse.Namespace, out: Path, where: Location) -> int:
    import torch

    from ..data import load_split
    from ..errors import check
    from ..generate import dataset_representation, feature_visualisations, save_featvis_figure
    from ..visualize import FEATURE_VIS

    check(args.starts >= 1 and args.top >= 1, "--starts and --top must be >= 1")
    settings = pgd_settings(args, FEATURE_VIS)
    model, source, wish = load_driver_model(args, fanned=args.workers != 0)
    model = model.cpu()
    groups = parse_features(args.features, model.representation_dim, args.random_features, args.seed)
    dataset = load_split(args.data, args.split)
    test_rep = dataset_representation(model, dataset)  # (N, k)
    if args.start == "noise":
        shape = dataset[0][0].shape
        starts = torch.rand((args.starts, *shape), generator=torch.Generator().manual_seed(args.seed))
    else:
        starts = torch.stack([dataset[i][0] for i in range(min(args.starts, len(dataset)))])
    tasks = fan_out_tasks(args, args.workers, device=wish)
    result = feature_visualisations(model, starts, groups, test_rep, settings=settings, top=args.top, tasks=tasks)
    figure = save_featvis_figure(
        out / "featvis.png",
        result,
        _shown_images(dataset, result),
        title=f"direct feature visualisation ({settings.steps} steps, {settings.norm.upper()} eps {settings.eps:g})",
    )
    path = _write_arrays(out / "featvis.npz", result, starts, dataset.labels)
    for g, z in enumerate(groups):
        mask = result["group"] == g
        top_labels = dataset.labels[result["top"][g].numpy()].tolist()
        print(
            f"R_{'+'.join(map(str, z))}: activation {result['before'][mask].mean():.3f} -> "
            f"{result['after'][mask].mean():.3f}; most active test images' labels {top_labels}"
        )
    summary = dict(
        model=source,
        data=str(args.data),
        split=args.split,
        settings=asdict(settings),
        features=groups,
        path=str(where / path.name),
        figure=str(where / figure.name),
    )
    write_json(out / "summary.json", summary)
    print(f"-> {summary['path']}; figure: {summary['figure']}")
    return 0


def _shown_images(dataset, result: dict):
    """The split as uint8 (N, H, W, C) for the figure, holding only the images it shows (others black)."""
    import numpy as np
    import torch

    from ..generate import to_uint8

    shape = dataset[0][0].shape
    shown = sorted(set(result["top"].flatten().tolist()) | set(result["bottom"].flatten().tolist()))
    images = np.zeros((len(dataset), shape[1], shape[2], shape[0]), dtype=np.uint8)
    images[shown] = to_uint8(torch.stack([dataset[i][0] for i in shown]))
    return images


def _write_arrays(path: Path, result: dict, starts, labels) -> Path:
    """featvis.npz: the visualisations, their starts, the most and least activating test images."""
    from ..generate import to_uint8, write_npz

    return write_npz(
        path,
        images=to_uint8(result["images"]),
        labels=result["group"].numpy(),
        features=result["features"].numpy(),
        starts=to_uint8(starts),
        top=result["top"].numpy(),
        bottom=result["bottom"].numpy(),
        top_values=result["top_values"].numpy(),
        bottom_values=result["bottom_values"].numpy(),
        top_labels=labels[result["top"].numpy()],
        before=result["before"].numpy(),
        after=result["after"].numpy(),
    )
