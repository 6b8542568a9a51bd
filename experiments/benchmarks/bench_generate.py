"""Benchmark: class-specific generation over Ray, 1 vs 2 workers, against the forward+backward limit.

    .venv/bin/python experiments/benchmarks/bench_generate.py [--per-class 8] [--steps 60] [--json out.json]

Generates per_class images of each CIFAR-10 class with the paper's PGD (L2 eps 30, step 0.5, 60
steps) on a ResNet-20 (the pretrained one of ../shared when present; the timing does not depend on
the weights) through `robint_ray.generate.generate`, with 1 and then 2 Ray workers of one thread each,
after a warm-up that starts both worker processes. Prints images/s for each, the speed-up (target
>= 1.6x), and each run's images/s as a fraction of the limit set by the plain forward + backward
passes of the same batches on one thread (target >= 0.85; with 2 workers the limit is twice that).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from robint_ray.allocator import tuned_malloc_label  # noqa: E402
from robint_ray.data import load_split  # noqa: E402
from robint_ray.distributed import Tasks, init_ray  # noqa: E402
from robint_ray.generate import GenerationConfig, fit_seeds, generate  # noqa: E402
from robint_ray.models import build_model  # noqa: E402
from robint_ray.visualize import GENERATION, PGDSettings, class_logit, sample_class_seeds  # noqa: E402

RESNET20 = ROOT.parent / "shared" / "models" / "cifar10-resnet-akamaster" / "resnet20-12fca82f.th"


def forward_backward_seconds(model, x, classes, repeats: int) -> float:
    """Median seconds of one forward + backward (gradient with respect to the input) on batch x."""
    model.eval()
    times = []
    for _ in range(repeats + 2):
        xr = x.clone().requires_grad_(True)
        start = time.perf_counter()
        (grad,) = torch.autograd.grad(class_logit(model(xr), classes).sum(), xr)
        times.append(time.perf_counter() - start)
    times = sorted(times[2:])  # the first two warm up
    return times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--steps", type=int, default=GENERATION[32].steps)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    malloc = tuned_malloc_label()

    if RESNET20.exists():
        from robint_ray.checkpoint import load_weights

        model, which = load_weights("cifar_resnet20", RESNET20), "pretrained ResNet-20"
    else:
        torch.manual_seed(0)
        model, which = build_model("cifar_resnet20").eval(), "ResNet-20 (random weights)"
    seeds = fit_seeds(load_split("sample", "test"), num_classes=10)
    settings = PGDSettings(eps=GENERATION[32].eps, step_size=GENERATION[32].step_size, steps=args.steps)
    config = GenerationConfig(
        per_class=args.per_class,
        classes=tuple(range(10)),
        seed=0,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        settings=settings,
    )

    # The limit: every PGD step is one forward + backward of a batch; one thread, in process.
    torch.set_num_threads(1)
    classes = torch.arange(args.batch_size) % 10
    x = sample_class_seeds(seeds, classes, generator=torch.Generator().manual_seed(0))
    t_before = forward_backward_seconds(model, x, classes, repeats=15)

    init_ray(num_cpus=2)
    with tempfile.TemporaryDirectory() as tmp:
        warm = GenerationConfig(
            **{
                **config.__dict__,
                "per_class": 1,
                "shard_size": 5,
                "settings": PGDSettings(eps=30.0, step_size=0.5, steps=1),
            }
        )
        generate(model, seeds, config=warm, out_dir=Path(tmp) / "warm", tasks=Tasks(2, cpus=1, gpus=0), progress=False)
        rates = {}
        for workers in (1, 2):
            start = time.perf_counter()
            out = Path(tmp) / f"w{workers}"
            summary = generate(
                model, seeds, config=config, out_dir=out, tasks=Tasks(workers, cpus=1, gpus=0), progress=False
            )
            seconds = time.perf_counter() - start
            rates[workers] = summary["images"] / seconds
            print(f"{workers} worker(s): {summary['images']} images in {seconds:.1f} s")
    # Measured again after the runs: on a shared machine the load drifts; the limit is the mean.
    t_after = forward_backward_seconds(model, x, classes, repeats=15)
    t_step = (t_before + t_after) / 2
    limit = args.batch_size / (settings.steps * t_step)  # images/s on one thread
    for workers, rate in rates.items():
        print(
            f"{workers} worker(s): {rate:.2f} images/s = {rate / (workers * limit):.3f} of the forward+backward "
            f"limit ({workers * limit:.2f} images/s)"
        )
    speedup = rates[2] / rates[1]
    print(
        f"model {which}; {config.total} images, {settings.steps} PGD steps, batches of {args.batch_size}, "
        f"shards of {args.shard_size}; forward+backward {t_step * 1e3:.1f} ms per batch on one thread "
        f"(before {t_before * 1e3:.1f}, after {t_after * 1e3:.1f}); {malloc}"
    )
    print(f"speed-up 2 vs 1 worker: {speedup:.2f}x (target >= 1.6)")
    print(f"1 worker vs limit: {rates[1] / limit:.3f} (target >= 0.85)")
    if args.json:
        args.json.write_text(
            json.dumps(
                dict(
                    model=which,
                    images=config.total,
                    steps=settings.steps,
                    batch_size=args.batch_size,
                    shard_size=args.shard_size,
                    fwd_bwd_seconds=t_step,
                    fwd_bwd_seconds_before=t_before,
                    fwd_bwd_seconds_after=t_after,
                    limit_images_per_s=limit,
                    images_per_s={str(k): v for k, v in rates.items()},
                    speedup=speedup,
                    efficiency_1=rates[1] / limit,
                    efficiency_2=rates[2] / (2 * limit),
                ),
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
