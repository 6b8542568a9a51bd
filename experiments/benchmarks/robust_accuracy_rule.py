"""How much the robust-accuracy rule moves PGD accuracy: ours (an example counts when the model
classifies its clean image and its adversarial image correctly) against the paper's author's (the
adversarial image alone, `trainers/tools/acc_evaluator.py`), on the same adversarial images.

    .venv/bin/python experiments/benchmarks/robust_accuracy_rule.py [--checkpoint RUN/best ...] [--n N]

The two rules differ by the examples the model gets wrong clean and right after the attack. PGD here
is the paper's evaluation attack at CIFAR-10's budget (L2, eps 0.5, step 0.1, 20 steps, no random
start, last iterate) and robint's own step (`evaluate.attack_batch`), so only the rule differs.

Models: the pretrained ResNet-20 of ../shared/models (a standard model) and each --checkpoint (a robint
checkpoint folder). Images: the first --n test images of ../shared/data/cifar10's exact subset (1,017),
or of the bundled sample where ../shared is absent.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
CIFAR_EXACT = SHARED / "data" / "cifar10" / "cifar10_exact_subset.npz"
RESNET20 = SHARED / "models" / "cifar10-resnet-akamaster" / "resnet20-12fca82f.th"


def counts(model, x: torch.Tensor, y: torch.Tensor, attack, batch_size: int) -> dict[str, int]:
    """How many examples the model gets right clean, and how many count as robust under each rule."""
    from robint_ray.evaluate import attack_batch
    from robint_ray.models import in_mode

    clean = adversarial = both = 0
    with in_mode(model), torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            with torch.enable_grad():
                x_adv = attack_batch(model, xb, yb, attack)
            ok, ok_adv = model(xb).argmax(1) == yb, model(x_adv).argmax(1) == yb
            clean += int(ok.sum())
            adversarial += int(ok_adv.sum())
            both += int((ok & ok_adv).sum())
    return {"n": len(x), "clean": clean, "adversarial (author)": adversarial, "clean and adversarial (ours)": both}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", default=[], help="a robint checkpoint folder (repeatable)")
    parser.add_argument("--n", type=int, default=None, help="test images (default: all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from robint_ray.checkpoint import load_checkpoint, load_weights
    from robint_ray.config import PAPER_PGD
    from robint_ray.data import load_split, stack, take
    from robint_ray.evaluate import AttackConfig

    data = str(CIFAR_EXACT) if CIFAR_EXACT.exists() else "sample"
    x, y = stack(take(load_split(data, "test"), args.n))
    attack = AttackConfig(pgd=PAPER_PGD)  # L2 eps 0.5, step 0.1, 20 steps
    models = {}
    if RESNET20.exists():
        models["pretrained ResNet-20 (standard)"] = load_weights("cifar_resnet20", RESNET20)
    for path in args.checkpoint:
        models[path] = load_checkpoint(path)[0]
    result = {"data": data, "attack": attack.pgd.describe(), "models": {}}
    print(f"images: the first {len(x)} test images of {data}; PGD: {result['attack']}, no random start, last iterate")
    for name, model in models.items():
        c = counts(model, x, y, attack, args.batch_size)
        result["models"][name] = c
        n, ours, author = c["n"], c["clean and adversarial (ours)"], c["adversarial (author)"]
        print(
            f"{name}: clean {c['clean'] / n:.4f}; PGD accuracy, ours {ours / n:.4f} ({ours}/{n}), "
            f"author's {author / n:.4f} ({author}/{n}); author - ours {(author - ours) / n:+.4f} "
            f"({author - ours} examples wrong clean and right after the attack)"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
