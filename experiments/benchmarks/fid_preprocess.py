"""How much the FID preprocessing moves FID: ours (pytorch-fid's) against the paper's author's, on the same images.

    .venv/bin/python experiments/benchmarks/fid_preprocess.py [--per-class 50] [--real-n 1000] [--json OUT]

The two pipelines (`robint_ray.inception.preprocess`, `PREPROCESSING`):
- robint: generations rounded to uint8 when stored; uint8 -> [0, 1] -> bilinear 299 x 299 on floats -> 2x - 1;
- author: generations truncated to uint8 (`(x * 255).type(torch.uint8)`); bilinear 299 x 299 on the uint8
  levels, rounded back to uint8 (torchvision's Resize); (x - 128) / 128 (torchmetrics / torch-fidelity).
Real uint8 images go through both unchanged by the quantisation (float32(u / 255) * 255 truncates back to u
for every level u, checked below), so for them only the resize and the scaling differ.

Images: the exact CIFAR-10 images of ../shared/data/cifar10 (the first `--real-n` training images and the
1,017 test images; the bundled sample's 1,000 / 500 where ../shared is absent), and class generations of the
pretrained ResNet-20 of ../shared/models (the paper's eq. 16 at its CIFAR settings: eps 30, step 0.5, 60 steps,
from class seeds fitted on the test images), kept in float so that both roundings apply to the same images.
FID at 2048 dimensions against the test images; four FIDs of the generations separate the two causes
(rounding x resize/scaling). Also the Inception-192 distance (the paper's Tables 3 / 6 metric) between each
generation and its seed, per image and over the first batch of 3 (the authors' batch figure).

At these sizes (n < 2048) every FID is biased far upwards; what matters here is the difference between the
pipelines on the same images, which the paper's run-to-run noise (about 2 FID) puts in scale.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from robint_ray.allocator import tuned_malloc_label

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
CIFAR_EXACT = SHARED / "data" / "cifar10" / "cifar10_exact_subset.npz"
RESNET20 = SHARED / "models" / "cifar10-resnet-akamaster" / "resnet20-12fca82f.th"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=50, help="generated images per class (default: 50)")
    parser.add_argument("--real-n", type=int, default=1000, help="training images in the real-data FID (default: 1000)")
    parser.add_argument("--test-n", type=int, default=None, help="test images, the FID reference (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    malloc = tuned_malloc_label()  # before the first large allocation
    torch.set_num_threads(args.threads)

    from robint_ray.checkpoint import load_weights
    from robint_ray.data import load_split
    from robint_ray.fid import FeatureStats, fid_from_stats
    from robint_ray.generate import fit_seeds
    from robint_ray.inception import PREPROCESSING, inception_features, load_fid_inception, quantize
    from robint_ray.visualize import GENERATION, generate_classes, sample_class_seeds

    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(((levels.float() / 255) * 255).to(torch.uint8), levels), "uint8 -> float -> trunc is not exact"

    data = str(CIFAR_EXACT) if CIFAR_EXACT.exists() else "sample"
    train, test = load_split(data, "train"), load_split(data, "test")
    real = {
        "train": torch.from_numpy(train.images[: args.real_n]).permute(0, 3, 1, 2).contiguous(),
        "test": torch.from_numpy(test.images[: args.test_n]).permute(0, 3, 1, 2).contiguous(),
    }
    inception = load_fid_inception()
    started = time.perf_counter()
    timings = {}

    def stats(images: torch.Tensor, preprocessing: str) -> FeatureStats:
        return FeatureStats.of(
            inception_features(inception, images, dims=2048, batch_size=50, preprocessing=preprocessing)
        )

    # Real data: train vs test under each pipeline.
    real_stats = {(name, p): stats(images, p) for name, images in real.items() for p in PREPROCESSING}
    timings["real features"] = time.perf_counter() - started
    result: dict = {
        "data": data,
        "n_train": len(real["train"]),
        "n_test": len(real["test"]),
        "preprocessing": PREPROCESSING,
        "malloc": malloc,
        "threads": args.threads,
        "fid_real": {p: fid_from_stats(real_stats[("train", p)], real_stats[("test", p)]) for p in PREPROCESSING},
    }

    if RESNET20.exists():
        model = load_weights("cifar_resnet20", RESNET20)
        seeds = fit_seeds(test, num_classes=10)  # on every test image, as the study does
        classes = torch.arange(10).repeat_interleave(args.per_class)
        starts = sample_class_seeds(seeds, classes, generator=torch.Generator().manual_seed(0))  # (n, 3, 32, 32)
        t0 = time.perf_counter()
        generated = torch.cat(
            [
                generate_classes(model, starts[i : i + 50], classes[i : i + 50], settings=GENERATION[32])
                for i in range(0, len(starts), 50)
            ]
        )  # float in [0, 1]
        timings["generation"] = time.perf_counter() - t0
        with torch.no_grad():
            hits = float((model(generated).argmax(1) == classes).float().mean())
        rounded, truncated = quantize(generated, rounding="round"), quantize(generated, rounding="truncate")
        t0 = time.perf_counter()
        fids = {}
        for rounding, images in (("round", rounded), ("truncate", truncated)):
            for p in PREPROCESSING:
                fids[f"{rounding} + {p} resize/scaling"] = fid_from_stats(stats(images, p), real_stats[("test", p)])
        timings["generated features"] = time.perf_counter() - t0
        seed_levels = quantize(starts, rounding="round")
        distance = {}
        for name, (images, p) in {"robint": (rounded, "robint"), "author": (generated, "author")}.items():
            # the author's inputs: float generations and float seeds, each truncated inside `preprocess`
            originals = seed_levels if p == "robint" else starts
            a = inception_features(inception, originals, dims=192, batch_size=50, preprocessing=p).double()
            b = inception_features(inception, images, dims=192, batch_size=50, preprocessing=p).double()
            per_image = (a - b).norm(dim=1)
            distance[p] = {"mean_per_image": float(per_image.mean()), "batch_of_3": float((a[:3] - b[:3]).norm())}
        result.update(
            n_generated=len(generated),
            generated_as_target_class=hits,
            fid_generated=fids,
            fid_generated_robint=fids["round + robint resize/scaling"],
            fid_generated_author=fids["truncate + author resize/scaling"],
            inception192_seed_to_generation=distance,
        )
    else:
        result["fid_generated"] = f"skipped: {RESNET20} is absent"
    result["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    result["seconds"]["total"] = round(time.perf_counter() - started, 1)

    print(f"images: {data}; {result['n_train']} train vs {result['n_test']} test; {result['malloc']}")
    print(
        "real data FID (train vs test): "
        + ", ".join(f"{p} {v:.3f}" for p, v in result["fid_real"].items())
        + f"; author - robint {result['fid_real']['author'] - result['fid_real']['robint']:+.3f}"
    )
    if isinstance(result["fid_generated"], dict):
        print(
            f"{result['n_generated']} ResNet-20 generations ({100 * result['generated_as_target_class']:.1f} % "
            "classified as their target) vs the test images:"
        )
        for name, value in result["fid_generated"].items():
            print(f"  {name:36s} {value:9.3f}")
        print(
            f"  author - robint (the two pipelines)  "
            f"{result['fid_generated_author'] - result['fid_generated_robint']:+9.3f}"
        )
        for p, d in result["inception192_seed_to_generation"].items():
            print(
                f"Inception-192 seed -> generation, {p}: mean per image {d['mean_per_image']:.4f}, "
                f"first batch of 3 {d['batch_of_3']:.4f}"
            )
    else:
        print(result["fid_generated"])
    print(f"seconds: {result['seconds']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
