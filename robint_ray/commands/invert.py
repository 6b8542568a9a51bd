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
import contextlib
import json
from pathlib import Path

from ..storage import Location
from .common import add_model_arguments, add_resource_arguments, load_model, task_resources_of
from .generate import add_pgd_arguments, pgd_settings


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_resource_arguments(parser)
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
    parser.add_argument("--workers", type=int, default=None, help="Ray tasks at a time (default: in process)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise sources")
    add_pgd_arguments(parser, "1000; step 1, 10,000 steps")


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
    """Writes into a local folder whose files end up at --out (a local path, or a storage URI: uploaded
    when the command has finished)."""
    with Location(args.out).local_dir() as out:
        return _run(args, out, Location(args.out))


def _run(args: argparse.Namespace, out: Path, where: Location) -> int:
    import numpy as np
    import torch

    from ..data import load_split
    from ..distributed import init_ray
    from ..errors import check
    from ..generate import inversions, save_inversion_figure, to_uint8, write_npz
    from ..visualize import INVERSION

    check(args.n >= 1, f"--n must be >= 1, got {args.n}")
    settings = pgd_settings(args, INVERSION)
    fanned = bool(args.workers and args.workers > 1)
    # Fanned out, the driver's copy stays on the CPU and each Ray task moves it to its own device.
    wish, args.device = args.device, ("cpu" if fanned else args.device)
    model, source = load_model(args)
    model = model.cpu()
    dataset = load_split(args.data, args.split)
    targets_at = per_class_positions(dataset.labels, args.n, model.num_classes)
    sources_at = per_class_positions(dataset.labels, args.n, model.num_classes, offset=1)
    check(len(targets_at) == args.n and len(sources_at) == args.n, "the split lacks images of some classes")
    targets = torch.stack([dataset[i][0] for i in targets_at])  # (n, C, H, W)
    kinds = ["image", "noise"] if args.source == "both" else [args.source]
    if fanned:
        init_ray(num_cpus=args.workers)
    arrays: dict[str, list] = {
        k: []
        for k in (
            "images",
            "labels",
            "targets",
            "sources",
            "source_kind",
            "target_index",
            "distance_before",
            "distance_after",
        )
    }
    figures = []
    for kind in kinds:
        if kind == "image":
            sources = torch.stack([dataset[i][0] for i in sources_at])
        else:
            sources = torch.rand(targets.shape, generator=torch.Generator().manual_seed(args.seed))
        with task_resources_of(args, device=wish) if fanned else contextlib.nullcontext():
            result = inversions(model, sources, targets, settings=settings, workers=args.workers)
        images, t8, s8 = to_uint8(result["images"]), to_uint8(targets), to_uint8(sources)
        for key, value in (
            ("images", images),
            ("targets", t8),
            ("sources", s8),
            ("labels", dataset.labels[targets_at]),
            ("target_index", np.array(targets_at)),
            ("source_kind", np.array([kind] * args.n)),
            ("distance_before", result["distance_before"].numpy()),
            ("distance_after", result["distance_after"].numpy()),
        ):
            arrays[key].append(value)
        figures.append(
            save_inversion_figure(
                out / f"inversions-{kind}.png",
                t8,
                s8,
                images,
                distance_after=result["distance_after"].tolist(),
                title=f"representation inversion from {kind} ({settings.steps} steps, "
                f"L2 eps {settings.eps:g}, step {settings.step_size:g})",
            )
        )
        print(
            f"source {kind:>5}: normalised distance {result['distance_before'].mean():.4f} -> "
            f"{result['distance_after'].mean():.4f} (mean over {args.n})"
        )
    path = write_npz(out / "inversions.npz", **{k: np.concatenate(v) for k, v in arrays.items()})
    summary = dict(
        model=source,
        data=str(args.data),
        split=args.split,
        settings=settings.__dict__,
        path=str(where / path.name),
        figures=[str(where / f.name) for f in figures],
        distance_before=np.concatenate(arrays["distance_before"]).tolist(),
        distance_after=np.concatenate(arrays["distance_after"]).tolist(),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"-> {summary['path']}; figures: {', '.join(summary['figures'])}")
    return 0
