"""robint generate: class-specific images (eq. 16) for every class, sharded over Ray.

    robint generate --arch cifar_resnet20 --weights resnet20-12fca82f.th \\
        --data ../shared/data/cifar10/cifar10_exact_subset.npz --per-class 1000 --out runs/gen --workers 2

Seeds come from each class's multivariate normal, fitted on the --split images (the paper: the test
set) average-pooled to 8 x 8. PGD defaults are the paper's: L2 eps 30, step 0.5, 60 steps at 32 px;
eps 40, step 1, 60 steps at 128 px. Writes OUT/generated.npz (`images` uint8 (N, H, W, C), `labels`,
`seeds`, `classes`), OUT/shards/, OUT/classes.png, OUT/seeds.png and OUT/summary.json; OUT is a local
path or a storage URI (s3://bucket/gen: each shard is written there by the task that made it). Rerunning
with the same options skips the shards already written.
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--data", required=True, help="dataset: .npz, CIFAR-10 folder, ImageFolder root, or 'sample'")
    parser.add_argument(
        "--split", default="test", help="split the class seeds are fitted on (default: test, as the paper)"
    )
    parser.add_argument("--per-class", type=int, default=1000, help="images per class (default: 1000)")
    parser.add_argument("--out", required=True, help="output folder, a path or a storage URI (s3://...)")
    parser.add_argument("--seed", type=int, default=0, help="seed; with the shard index it fixes every image")
    parser.add_argument("--shard-size", type=int, default=100, help="images per Ray task and file (default: 100)")
    parser.add_argument("--batch-size", type=int, default=100, help="images optimised at once (default: 100)")
    parser.add_argument(
        "--no-merge",
        action="store_true",
        help="leave the images in OUT/shards/ (no OUT/generated.npz); the figures read a few",
    )
    add_pgd_arguments(parser, "the paper's: L2 eps 30, step 0.5, 60 steps at 32 px; eps 40, step 1 at 128 px")
    add_resource_arguments(parser, workers=None)


def run(args: argparse.Namespace) -> int:
    return in_output_folder(args, _run)


def _run(args: argparse.Namespace, out: Path, where: Location) -> int:
    """Shards straight to --out (`where`), so that a rerun finds them; figures and summary.json into the
    local folder `out`, which ends up there too."""
    from ..data import load_split
    from ..errors import check
    from ..generate import GenerationConfig, fit_seeds, generate, sample_images, save_generation_figures
    from ..visualize import generation_settings

    check(args.workers is None or args.workers >= 0, f"--workers must be >= 0, got {args.workers}")
    # With Ray the driver's copy stays on the CPU (it may sit on a CPU-only head); each Ray task moves the
    # model to its own device, a GPU where --device cuda or --gpus-per-task asks for one.
    model, source, wish = load_driver_model(args, fanned=args.workers != 0)
    dataset = load_split(args.data, args.split)
    seeds = fit_seeds(dataset, num_classes=model.num_classes)
    names = source["classes"] or list(dataset.classes)
    config = GenerationConfig(
        per_class=args.per_class,
        classes=tuple(range(model.num_classes)),
        seed=args.seed,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        settings=pgd_settings(args, generation_settings(model.input_size)),
    )
    tasks = fan_out_tasks(args, args.workers, device=wish)
    summary = generate(
        model, seeds, config=config, out_dir=where, tasks=tasks, class_names=names, merge=not args.no_merge
    )
    summary.pop("stats")
    images, labels, starts = sample_images(where, config, per_class=8)
    figures = save_generation_figures(
        out,
        images,
        labels,
        starts,
        names,
        title=f"class-specific generation: {source.get('checkpoint') or source['arch']}",
    )
    summary.update(
        model=source,
        data=str(args.data),
        split=args.split,
        seed_pool=seeds.pool,
        figures=[(where / p.name).uri for p in figures],
        config=config.plan(),
    )
    write_json(out / "summary.json", summary)
    print(
        f"{summary['images']} images ({summary['computed']} of {summary['shards']} shards computed now) -> "
        f"{summary['path'] or where / 'shards'}"
    )
    print("figures: " + ", ".join(summary["figures"]))
    return 0
