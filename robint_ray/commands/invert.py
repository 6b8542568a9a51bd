"""robint invert: representation inversion (eq. 15), from other-class images and from noise.

    robint invert --arch cifar_resnet20 --weights resnet20-12fca82f.th \\
        --data ../shared/data/cifar10/cifar10_exact_subset.npz --n 8 --out runs/invert --workers 2

Targets: n test images, one per class in turn. Sources: for each target an image of the next class
(`--source image`), uniform noise (`--source noise`) or both (default). PGD defaults are the paper's:
L2 eps 1000, step 1, 10,000 steps (about 40 s per image per CPU thread for a ResNet-20). Writes
OUT/inversions.npz (`images` uint8 (N, H, W, C), `labels` = target classes, `targets`, `sources`,
`source_kind`, `target_index`, `distance_before`, `distance_after`) and OUT/inversions-<kind>.png.
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
    parser.add_argument("--split", default="test", help="split of the target and source images (default: test)")
    parser.add_argument("--n", type=int, default=8, help="target images, one per class in turn (default: 8)")
    parser.add_argument(
        "--source",
        default="both",
        choices=("image", "noise", "both"),
        help="start from an image of another class, from noise, or both (default)",
    )
    parser.add_argument("--out", required=True, help="output folder, a path or a storage URI (s3://...)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise sources")
    add_pgd_arguments(parser, "the paper's: L2 eps 1000, step 1, 10,000 steps")


def per_class_positions(labels, n: int, num_classes: int, offset: int = 0) -> list[int]:
    """n positions, class 0, 1, ... in turn (classes shifted by offset), the r-th image of its class
    in round r."""
    import numpy as np

    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    out = []
    for i in range(n):
        c, r = (i + offset) % num_classes, i // num_classes
        members = by_class[c]
        if len(members):
            out.append(int(members[r % len(members)]))
    return out


def run(args: argparse.Namespace) -> int:
    return in_output_folder(args, _run)


def _run(args: argparse.Namespace, out: Path, where: Location) -> int:
    import numpy as np
    import torch

    from ..data import load_split
    from ..errors import check
    from ..generate import inversions, write_npz
    from ..visualize import INVERSION

    check(args.n >= 1, f"--n must be >= 1, got {args.n}")
    settings = pgd_settings(args, INVERSION)
    model, source, wish = load_driver_model(args, fanned=args.workers != 0)
    model = model.cpu()
    dataset = load_split(args.data, args.split)
    targets_at = per_class_positions(dataset.labels, args.n, model.num_classes)
    sources_at = per_class_positions(dataset.labels, args.n, model.num_classes, offset=1)
    check(len(targets_at) == args.n and len(sources_at) == args.n, "the split lacks images of some classes")
    targets = torch.stack([dataset[i][0] for i in targets_at])  # (n, C, H, W)
    runs, figures = [], []
    tasks = fan_out_tasks(args, args.workers, device=wish)
    for kind in ["image", "noise"] if args.source == "both" else [args.source]:
        if kind == "image":
            sources = torch.stack([dataset[i][0] for i in sources_at])
        else:
            sources = torch.rand(targets.shape, generator=torch.Generator().manual_seed(args.seed))
        result = inversions(model, sources, targets, settings=settings, tasks=tasks)
        runs.append(_arrays(kind, result, targets, sources, dataset.labels, targets_at))
        figures.append(_figure(out / f"inversions-{kind}.png", runs[-1], kind, settings))
    arrays = {key: np.concatenate([run[key] for run in runs]) for key in runs[0]}
    path = write_npz(out / "inversions.npz", **arrays)
    summary = dict(
        model=source,
        data=str(args.data),
        split=args.split,
        settings=asdict(settings),
        path=str(where / path.name),
        figures=[str(where / f.name) for f in figures],
        distance_before=arrays["distance_before"].tolist(),
        distance_after=arrays["distance_after"].tolist(),
    )
    write_json(out / "summary.json", summary)
    print(f"-> {summary['path']}; figures: {', '.join(summary['figures'])}")
    return 0


def _arrays(kind: str, result: dict, targets, sources, labels, targets_at: list[int]) -> dict:
    """One source kind's inversions as the arrays of inversions.npz (uint8 images (n, H, W, C))."""
    import numpy as np

    from ..generate import to_uint8

    n = len(targets_at)
    return {
        "images": to_uint8(result["images"]),
        "labels": labels[targets_at],
        "targets": to_uint8(targets),
        "sources": to_uint8(sources),
        "source_kind": np.array([kind] * n),
        "target_index": np.array(targets_at),
        "distance_before": result["distance_before"].numpy(),
        "distance_after": result["distance_after"].numpy(),
    }


def _figure(path: Path, arrays: dict, kind: str, settings) -> Path:
    """targets | sources | inversions, and the mean normalised distance before and after, printed."""
    from ..generate import save_inversion_figure

    before, after = arrays["distance_before"], arrays["distance_after"]
    print(f"source {kind:>5}: normalised distance {before.mean():.4f} -> {after.mean():.4f} (mean over {len(after)})")
    return save_inversion_figure(
        path,
        arrays["targets"],
        arrays["sources"],
        arrays["images"],
        distance_after=after.tolist(),
        title=f"representation inversion from {kind} ({settings.steps} steps, "
        f"{settings.norm.upper()} eps {settings.eps:g}, step {settings.step_size:g})",
    )
