"""How far apart two `robint explain` runs' attributions are, image by image (e.g. GPU against CPU).

    python experiments/benchmarks/compare_attributions.py RUN_A/attributions.npz RUN_B/attributions.npz

Both runs must have explained the same images for the same targets. Prints, over the images, the
median and largest relative L2 difference |a - b| / |a| and the smallest Pearson correlation.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def compare(a_path: str, b_path: str) -> dict[str, float]:
    a, b = np.load(a_path), np.load(b_path)
    for key in ("indices", "targets"):
        if not np.array_equal(a[key], b[key]):
            sys.exit(f"the two runs differ in {key}: not the same explanation task")
    x = a["attributions"].astype(np.float64).reshape(len(a["indices"]), -1)
    y = b["attributions"].astype(np.float64).reshape(len(b["indices"]), -1)
    relative = np.linalg.norm(x - y, axis=1) / np.linalg.norm(x, axis=1)
    correlation = np.array([np.corrcoef(u, v)[0, 1] for u, v in zip(x, y)])
    return {
        "images": len(x),
        "median_relative_l2": float(np.median(relative)),
        "max_relative_l2": float(relative.max()),
        "min_correlation": float(correlation.min()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="attributions.npz of the reference run")
    parser.add_argument("b", help="attributions.npz of the other run")
    args = parser.parse_args()
    r = compare(args.a, args.b)
    print(
        f"{r['images']} images: relative L2 difference median {r['median_relative_l2']:.2e}, "
        f"max {r['max_relative_l2']:.2e}; smallest correlation {r['min_correlation']:.6f}"
    )


if __name__ == "__main__":
    main()
