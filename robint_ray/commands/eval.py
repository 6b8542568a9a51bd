"""robint eval: clean and adversarial accuracy of a model on a dataset split.

    robint eval --arch cifar_resnet20 --weights resnet20-12fca82f.th \\
        --data ../shared/data/cifar10/cifar10_exact_subset.npz --split test \\
        --attack pgd --norm l2 --eps 0.5 --step-size 0.1 --steps 20 --json out.json

The PGD defaults are the paper's CIFAR-10 evaluation (L2, eps 0.5, step 0.1, 20 steps, no random
start) and keep the last iterate, as torchattacks does (the paper does not say; its author's code keeps
the iterate of highest batch-mean loss); `--keep best` keeps per example the first iterate that fools
the model, which is never weaker.
"""

from __future__ import annotations

import argparse

from .common import (
    add_model_arguments,
    add_pgd_arguments,
    add_resource_arguments,
    fan_out_tasks,
    load_driver_model,
    output_location,
    pgd_settings,
    write_json,
)


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="dataset: .npz, CIFAR-10 folder, ImageFolder root, or 'sample'")
    parser.add_argument("--split", default="test", help="train, test, fit or val (default: test)")
    parser.add_argument("--n", type=int, default=None, help="evaluate N images, drawn seeded across the classes")
    parser.add_argument("--attack", default="pgd", help="pgd, autoattack or none (default: pgd)")
    add_pgd_arguments(parser, "the paper's CIFAR-10 PGD-20, L2 eps 0.5, step 0.1, 20 steps; AutoAttack: norm, eps")
    parser.add_argument("--random-start", action="store_true", help="PGD from a random point of the ball")
    parser.add_argument("--restarts", type=int, default=1, help="PGD restarts (default: 1)")
    parser.add_argument("--keep", default="last", help="PGD iterate to keep: last (default) or best")
    parser.add_argument("--autoattack-version", default="standard", help="standard (default), rand or custom")
    parser.add_argument(
        "--autoattack-attacks",
        default="",
        help="with --autoattack-version custom: comma-separated, e.g. apgd-ce,apgd-t",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of random starts and AutoAttack")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (default: 128, fits a CPU)")
    parser.add_argument("--json", default=None, help="write the results as JSON here (a path or a storage URI)")
    add_resource_arguments(parser, workers=0)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import PAPER_PGD
    from ..data import draw, load_split
    from ..errors import check
    from ..evaluate import AttackConfig, evaluate

    attack = AttackConfig(
        kind=args.attack,
        pgd=pgd_settings(args, PAPER_PGD),
        random_start=args.random_start,
        restarts=args.restarts,
        keep=args.keep,
        autoattack_version=args.autoattack_version,
        autoattack_attacks=tuple(a for a in args.autoattack_attacks.split(",") if a),
        seed=args.seed,
    )
    check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    json_at = output_location(args.json) if args.json is not None else None
    dataset = draw(load_split(args.data, args.split), args.n, seed=args.seed)
    check(args.workers >= 0, f"--workers must be >= 0, got {args.workers}")
    model, source, wish = load_driver_model(args, fanned=args.workers > 0)  # (before Ray starts)
    check(
        len(dataset.classes) == model.num_classes,
        f"the data has {len(dataset.classes)} classes, the model {model.num_classes}",
    )
    torch.manual_seed(args.seed)
    tasks = fan_out_tasks(args, args.workers, device=wish)
    result = evaluate(model, dataset, attack=attack, batch_size=args.batch_size, tasks=tasks, progress=True)
    result.update(model=source, data=str(args.data), split=args.split, batch_size=args.batch_size)

    adv, budget = result["adversarial_accuracy"], attack.pgd
    print(f"{'images':>22} {result['n']}")
    print(f"{'clean accuracy':>22} {result['clean_accuracy']:.4f}  ({result['clean_correct']}/{result['n']})")
    if adv is not None:
        label = f"{args.attack} accuracy"
        print(
            f"{label:>22} {adv:.4f}  ({result['adversarial_correct']}/{result['n']})"
            f"  [{budget.norm} eps {budget.eps}"
            + (f", step {budget.step_size}, {budget.steps} steps, keep {args.keep}]" if args.attack == "pgd" else "]")
        )
    write_json(json_at, result)
    return 0
