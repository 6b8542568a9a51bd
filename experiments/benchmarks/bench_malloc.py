"""Forward + backward speed on CPU by pass size, with glibc's default malloc and with robint's thresholds.

    .venv/bin/python experiments/benchmarks/bench_malloc.py        # CIFAR ResNet18, passes of 48..204 images

Each setting runs in its own fresh process (glibc's thresholds are per process): the same model
(randomly initialised, seeded), the same random inputs, forward to the softmax probability of one class
and backward to the input, as IG does. For each pass size, the passes cover --points images; the best
of --repeats. Prints images/s side by side, their ratio, and each process's peak resident memory.
See robint_ray/allocator.py for why the thresholds matter.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from robint_ray.allocator import tune_allocator  # noqa: E402
from robint_ray.models import build_model  # noqa: E402

GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "ROBINT_TUNE_MALLOC")


def measure(args: argparse.Namespace) -> dict:
    """In this process: images/s of forward + backward per pass size, and the peak memory."""
    tuned = tune_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.arch).eval()
    rates = {}
    for size in args.sizes:
        passes = [torch.rand(size, 3, 32, 32) for _ in range(max(1, args.points // size))]
        target = torch.zeros(size, dtype=torch.long)
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            for x in passes:
                x.requires_grad_(True)
                value = model(x).softmax(1).gather(1, target[:, None]).sum()
                torch.autograd.grad(value, x)
            best = min(best, time.perf_counter() - start)
        rates[size] = len(passes) * size / best
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tuned": tuned, "rates": rates, "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cifar_resnet18")
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[48, 51, 96, 102, 192, 204],
        help="images per pass, comma-separated",
    )
    parser.add_argument("--points", type=int, default=816, help="images per pass size and repeat (default: 816)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    clean = {k: v for k, v in os.environ.items() if k not in GLIBC_VARIABLES}
    results = {}
    for name, env in (("glibc defaults", {"ROBINT_TUNE_MALLOC": "0"}), ("robint thresholds", {})):
        out = subprocess.run(
            [sys.executable, __file__, "--child", *sys.argv[1:]],
            env={**clean, **env},
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(f"{name}: done (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)", flush=True)
    glibc, robint = results["glibc defaults"], results["robint thresholds"]
    assert not glibc["tuned"] and robint["tuned"], "the two processes did not run the two allocator settings"
    print(f"\n{args.arch}, fp32, {args.threads} threads, forward + backward to the input; images/s")
    print(f"{'images per pass':>16} {'glibc defaults':>15} {'robint thresholds':>18} {'ratio':>6}")
    for size in args.sizes:
        a, b = glibc["rates"][str(size)], robint["rates"][str(size)]
        print(f"{size:>16} {a:>15.1f} {b:>18.1f} {b / a:>6.2f}")
    print(f"{'peak memory, MB':>16} {glibc['peak_mb']:>15.0f} {robint['peak_mb']:>18.0f}")


if __name__ == "__main__":
    main()
