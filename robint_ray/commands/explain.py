"""robint explain: Integrated Gradients or SHAP expected gradients of N images, fanned out over Ray.

    robint explain --method ig --arch cifar_resnet20 --weights resnet20-12fca82f.th \\
        --data ../shared/data/cifar10/cifar10_exact_subset.npz --split test --n 24 --out DIR --workers 2

Writes DIR/attributions.npz (`attributions` (N, C, H, W), `indices`, `targets`, `labels`, `target_kind`),
DIR/metrics.json (per-image and mean metrics with 95 % intervals; for IG the completeness gaps),
DIR/grid.png (the 24-image grid of Figs. 10 / 13) and DIR/overlay.png (image | attributions, Figs. 2 / 6).
With a second model (--compare-checkpoint, or --compare-arch with --compare-weights) both models'
attributions are drawn side by side (first model first, e.g. standard | robust) and metrics.json
holds the paired differences (second - first).

Defaults are the authors': IG with 10 uniform-noise baselines x 50 intervals on the softmax
probability; SHAP with 176 background images (from the training split), 200 samples, the logit.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..storage import Location
from .common import add_model_arguments, add_resource_arguments, fan_out_tasks, in_output_folder, load_driver_model

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=("ig", "shap"), help="ig or shap (expected gradients)")
    add_model_arguments(parser)
    group = parser.add_argument_group("second model, drawn beside the first (e.g. the robust one)")
    group.add_argument("--compare-checkpoint", help="a robint checkpoint folder, a path or a storage URI")
    group.add_argument("--compare-arch", help="architecture of the second model")
    group.add_argument("--compare-weights", help="weights file for --compare-arch, a path or a storage URI")
    parser.add_argument(
        "--names",
        default=None,
        help="comma-separated names of the models in figures and files (default: model, "
        "or standard,robust with a second model)",
    )
    parser.add_argument("--data", required=True, help="dataset: .npz, CIFAR-10 folder, ImageFolder root, or 'sample'")
    parser.add_argument("--split", default="test", help="split of the explained images (default: test)")
    parser.add_argument(
        "--n",
        type=int,
        default=24,
        help="explain N images drawn seeded across the classes (default: 24)",
    )
    parser.add_argument("--out", required=True, help="output folder, a path or a storage URI (s3://...)")
    parser.add_argument(
        "--target",
        default="predicted",
        choices=("predicted", "label"),
        help="class to explain (default: the predicted one)",
    )
    parser.add_argument(
        "--output",
        default=None,
        choices=("probability", "logit"),
        help="F: softmax probability or logit (default: probability for ig, logit for shap)",
    )
    parser.add_argument("--steps", type=int, default=50, help="IG: intervals m, m + 1 points (default 50)")
    parser.add_argument(
        "--baseline", default="uniform", choices=("black", "uniform"), help="IG baseline (default uniform)"
    )
    parser.add_argument(
        "--baselines",
        type=int,
        default=None,
        help="IG: number of baselines averaged (default 10 for uniform, 1 for black)",
    )
    parser.add_argument("--nsamples", type=int, default=200, help="SHAP: draws per image (default 200)")
    parser.add_argument("--background", type=int, default=176, help="SHAP: background images (default 176)")
    parser.add_argument("--background-split", default="train", help="SHAP: split the background comes from")
    parser.add_argument("--local-smoothing", type=float, default=0.0, help="SHAP: noise std added to x (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of baselines, draws and the background")
    parser.add_argument("--batch-size", type=int, default=128, help="model evaluations per pass (default 128)")
    parser.add_argument("--memory-mb", type=float, default=None, help="lower the batch to fit about this memory")
    parser.add_argument("--metric-steps", type=int, default=32, help="deletion/insertion curve steps (default 32)")
    add_resource_arguments(parser, workers=2)


def run(args: argparse.Namespace) -> int:
    return in_output_folder(args, _run)


def _run(args: argparse.Namespace, out: Path, where: Location) -> int:
    import numpy as np

    from .. import explain as ex
    from ..data import draw, load_split, stack
    from ..errors import check

    check(args.n >= 1, f"--n must be >= 1, got {args.n}")
    check(args.workers >= 0, f"--workers must be >= 0, got {args.workers}")
    compare = any(v is not None for v in (args.compare_checkpoint, args.compare_arch, args.compare_weights))
    names = args.names.split(",") if args.names else (["standard", "robust"] if compare else ["model"])
    check(
        len(names) == 1 + compare and len(set(names)) == len(names) and all(names),
        f"--names needs {1 + compare} distinct names, got {args.names!r}",
    )
    dataset = draw(load_split(args.data, args.split), args.n, seed=args.seed)
    images, labels = stack(dataset)
    # With Ray the models stay on the CPU here: each task moves its copy to a GPU when it has one.
    models = [load_driver_model(args, fanned=args.workers > 0, prefix=p)[:2] for p in ("", "compare_")[: 1 + compare]]
    for model, source in models:
        _check_fits(model, source, images, labels)
    config = _explain_config(args)
    tasks = fan_out_tasks(args, args.workers, device=args.device)
    background = None
    if args.method == "shap":
        background = ex.choose_background(load_split(args.data, args.background_split), args.background, seed=args.seed)
    results, timing, indices = {}, {}, np.asarray(dataset.indices)
    for name, (model, _source) in zip(names, models):
        start = time.perf_counter()  # explain() picks the targets: config.target, the argmax or the labels
        results[name] = ex.explain(
            model, images, labels, config=config, indices=indices, background=background, tasks=tasks
        )
        timing[name] = time.perf_counter() - start
        log.info("%s: %d images in %.1f s (%.2f images/s)", name, len(images), timing[name], len(images) / timing[name])

    classes = list(getattr(dataset, "classes", [])) or [str(i) for i in range(models[0][0].num_classes)]
    extra = {
        "sources": {name: source for name, (_m, source) in zip(names, models)},
        "data": str(args.data),
        "split": args.split,
        "classes": classes,
        "labels": labels.tolist(),
        "seconds": timing,
    }
    metrics = ex.save(out, results, labels=labels.numpy(), extra=extra)
    _figures(out, images, labels, results, classes, f"{METHODS[args.method]} ({config.ig.output})")
    _print_metrics(args, metrics, names, config)
    print(
        f"wrote {where / 'attributions.npz'}, {where / 'metrics.json'}, {where / 'grid.png'}, {where / 'overlay.png'}"
    )
    return 0


METHODS = {"ig": "Integrated Gradients", "shap": "SHAP expected gradients"}


def _check_fits(model, source: dict, images, labels) -> None:
    """The images' labels and size suit the model: one line naming the mismatch otherwise."""
    from ..errors import check

    check(
        int(labels.max()) < model.num_classes,
        f"the data has labels up to {int(labels.max())}, {source.get('arch')} only {model.num_classes} classes",
    )
    check(
        tuple(images.shape[2:]) == (model.input_size, model.input_size),
        f"images are {tuple(images.shape[2:])}, {source.get('arch')} takes {model.input_size} px",
    )


def _explain_config(args: argparse.Namespace):
    """The ExplainConfig of the command line, checked before any Ray starts."""
    from .. import explain as ex

    output = args.output or ("probability" if args.method == "ig" else "logit")
    k = args.baselines if args.baselines is not None else (10 if args.baseline == "uniform" else 1)
    return ex.ExplainConfig(
        method=args.method,
        target=args.target,
        batch_size=args.batch_size,
        memory_mb=args.memory_mb,
        metric_steps=args.metric_steps,
        ig=ex.IGConfig(steps=args.steps, baseline=args.baseline, num_baselines=k, output=output, seed=args.seed),
        shap=ex.ShapConfig(
            nsamples=args.nsamples,
            background=args.background,
            local_smoothing=args.local_smoothing,
            output=output,
            seed=args.seed,
        ),
    )


def _figures(out: Path, images, labels, results: dict, classes: list[str], title: str) -> None:
    """grid.png (the first 24 images) and overlay.png (the first 3), captioned with each label and, where
    the first model explained another class, that class."""
    from .. import explain as ex

    first = next(iter(results.values()))
    captions = [
        f"{classes[int(y)]}" + ("" if int(t) == int(y) else f" (as {classes[int(t)]})")
        for y, t in zip(labels, first.targets)
    ]
    maps = {name: r.attributions for name, r in results.items()}
    ex.plot_grid(
        images[:24], {k: v[:24] for k, v in maps.items()}, out / "grid.png", captions=captions[:24], title=title
    )
    ex.plot_overlays(images[:3], {k: v[:3] for k, v in maps.items()}, out / "overlay.png", captions=captions[:3])


def _print_metrics(args: argparse.Namespace, metrics: dict, names: list[str], config) -> None:
    """Per model: the mean metrics with their 95 % intervals, and for IG the completeness gap."""
    for name in names:
        mean = metrics["models"][name]["mean"]
        line = "  ".join(
            f"{key} {mean[key]['mean']:.4f} [{mean[key]['ci_low']:.4f}, {mean[key]['ci_high']:.4f}]"
            for key in ("deletion_auc", "insertion_auc", "gini", "top_mass")
        )
        print(f"{name}: {line}")
        if args.method == "ig":
            ig, gap = config.ig, mean["relative_completeness_gap"]
            print(
                f"{name}: mean relative completeness gap {gap['mean']:.4f} "
                f"(m = {ig.steps}, {ig.output}, {ig.baseline} x {ig.num_baselines})"
            )
