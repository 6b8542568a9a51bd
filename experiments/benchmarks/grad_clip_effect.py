"""The measured effect of the authors' gradient clipping (every gradient value to +-0.1 before each
step) on a short run: the CPU study's robust recipe (experiments/cpu/resnet20_robust_l2.yaml: the
pretrained ResNet-20 adversarially fine-tuned with L2 PGD-20, eps 0.5) on the first --train-n images
of the exact CIFAR-10 subset for --epochs epochs, once with and once without clipping, then clean and
PGD-20 accuracy of each on the subset's 1,017 test images. Writes OUT/grad_clip_effect.json and
prints a table.

    python experiments/benchmarks/grad_clip_effect.py --out experiments/benchmarks/results/DATE_MACHINE_COMMIT
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments" / "cpu" / "resnet20_robust_l2.yaml"
DATA = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10_exact_subset.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-n", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    from robint_ray.checkpoint import load_checkpoint
    from robint_ray.config import PAPER_PGD, load_config
    from robint_ray.data import load_split
    from robint_ray.distributed import init_ray
    from robint_ray.evaluate import AttackConfig, evaluate
    from robint_ray.train import run

    init_ray("local", num_cpus=2)
    test = load_split(DATA, "test")
    attack = AttackConfig(kind="pgd", pgd=PAPER_PGD)  # L2 eps 0.5, step 0.1, 20 steps
    rows = []
    for clip in (0.1, None):
        cfg = load_config(
            CONFIG,
            {
                "data.path": str(DATA),
                "data.train_n": args.train_n,
                "data.val_n": 256,
                "epochs": args.epochs,
                "optim.t_max": 2 * args.epochs,
                "grad_clip": clip,
            },
        )
        with tempfile.TemporaryDirectory() as tmp:
            run(cfg, Path(tmp) / "run", workers=1)
            model, meta = load_checkpoint(Path(tmp) / "run" / "best")
        result = evaluate(model, test, attack=attack, batch_size=128)
        rows.append(
            {
                "grad_clip": clip,
                "clean_accuracy": result["clean_accuracy"],
                "pgd20_accuracy": result["adversarial_accuracy"],
                "best_epoch": meta["metrics"]["epoch"],
                "train_loss_last_epoch": meta["metrics"]["train_loss"],
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"config": str(CONFIG.relative_to(ROOT)), "train_n": args.train_n, "epochs": args.epochs, "rows": rows}
    (args.out / "grad_clip_effect.json").write_text(json.dumps(record, indent=2))
    print(f"{'grad_clip':>10} {'clean %':>8} {'PGD-20 %':>9}  ({args.epochs} epochs on {args.train_n} images)")
    for r in rows:
        print(f"{r['grad_clip']!s:>10} {100 * r['clean_accuracy']:8.2f} {100 * r['pgd20_accuracy']:9.2f}")


if __name__ == "__main__":
    main()
