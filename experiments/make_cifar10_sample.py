"""Rebuild robint_ray/assets/cifar10_sample.npz from shared/data/cifar10 (exact pixels).

The sample: the first 100 training images of each class (in official order) and the first 500 test
images, with their official indices, so that anyone can check them against the official batches.

    python experiments/make_cifar10_sample.py ../shared/data/cifar10/cifar10_exact_subset.npz
"""

import sys
from pathlib import Path

import numpy as np

PER_CLASS_TRAIN, N_TEST = 100, 500


def main(source: str) -> None:
    with np.load(source, allow_pickle=False) as f:
        order = np.argsort(f["idx_train"], kind="stable")
        y = f["y_train"][order]
        keep = np.sort(np.concatenate([order[y == c][:PER_CLASS_TRAIN] for c in range(10)]))
        keep = keep[np.argsort(f["idx_train"][keep], kind="stable")]
        test_order = np.argsort(f["idx_test"], kind="stable")[:N_TEST]
        out = Path(__file__).resolve().parents[1] / "robint_ray" / "assets" / "cifar10_sample.npz"
        np.savez_compressed(
            out,
            x_train=f["x_train"][keep],
            y_train=f["y_train"][keep],
            idx_train=f["idx_train"][keep],
            x_test=f["x_test"][test_order],
            y_test=f["y_test"][test_order],
            idx_test=f["idx_test"][test_order],
            classes=f["classes"],
        )
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/cifar10/cifar10_exact_subset.npz")
