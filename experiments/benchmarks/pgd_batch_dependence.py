"""How the batch-mean L2 step of torchattacks (and of the paper's code) makes PGD depend on batch size.

Runs torchattacks' PGDL2 and our `pgd` on the pretrained ResNet-20 and the 1,017 exact CIFAR-10 test
images (L2, eps 0.5, step 0.1, 20 steps, no random start, last iterate) at several batch sizes, and
prints the robust accuracy of each. Ours is the same at every batch size; torchattacks' is not.

    python experiments/benchmarks/pgd_batch_dependence.py [--shared ../shared] [--batches 32 100 256 1017]

torchattacks is a test-only dependency (`pip install --no-deps torchattacks==3.5.1`).
"""

import argparse
from pathlib import Path

import torch

from robint_ray.attacks import Threat, pgd
from robint_ray.checkpoint import load_weights
from robint_ray.data import load_split, stack


def robust_accuracy(model, x, y, attack, batch: int) -> tuple[int, float]:
    correct = 0
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        x_adv = attack(xb, yb)
        with torch.no_grad():
            correct += int(((model(xb).argmax(1) == yb) & (model(x_adv).argmax(1) == yb)).sum())
    return correct, correct / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[3] / "shared")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 100, 256, 1017])
    args = parser.parse_args()
    import torchattacks

    model = load_weights("cifar_resnet20", args.shared / "models/cifar10-resnet-akamaster/resnet20-12fca82f.th")
    x, y = stack(load_split(args.shared / "data/cifar10/cifar10_exact_subset.npz", "test"))
    reference = torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=20, random_start=False)
    ours = lambda xb, yb: pgd(model, xb, yb, threat=Threat("l2", 0.5, 0.1), steps=20)  # noqa: E731
    print(f"ResNet-20, {len(x)} exact CIFAR-10 test images, L2 eps 0.5, step 0.1, 20 steps, no random start")
    print(f"{'batch':>6} {'torchattacks PGDL2':>22} {'robint_ray pgd':>18}")
    for batch in args.batches:
        (ta_n, ta), (our_n, our) = (
            robust_accuracy(model, x, y, reference, batch),
            robust_accuracy(model, x, y, ours, batch),
        )
        print(f"{batch:>6} {ta:>14.4f} ({ta_n:>4}) {our:>10.4f} ({our_n:>4})", flush=True)


if __name__ == "__main__":
    main()
