"""Generation + FID as one streamed step: the driver's memory and the wall time at 1,000, 10,000 and
100,000 generated 32-px images.

    python experiments/benchmarks/bench_stream_fid.py --out experiments/benchmarks/results/DATE_MACHINE_COMMIT

Each size runs in a fresh Python process (its own local Ray instance, `--workers` CPUs), so that one
size's allocations do not raise the next one's baseline. In that process: a tiny classifier
(cifar_resnet8, random weights: the images' quality does not matter here), class seeds fitted on the
bundled sample, and one PGD step per image (`generate.generate` with `fid=...`, `merge=False`: each
shard writes its images and returns only its 2048-d statistics, which the driver adds up as they
come). The 2048-d features come from a cheap stand-in for the FID Inception (a fixed random
projection of the 4x4-pooled image, then ReLU), so that 100,000 images run on 2 CPU cores; the
statistics (n, sum x, sum x x^T at d = 2048: 32 MiB) have the real size, and they are what the driver
holds. After a warm-up run (Ray's workers started, every module imported) the driver's resident
memory is the baseline; a thread samples it every 5 ms during the run; the table gives the peak above
the baseline. Prints a Markdown table and writes it, with the raw figures (JSON), to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

from robint_ray.generate import FIDFeatures

ROOT = Path(__file__).resolve().parents[2]


def rss_bytes() -> int:
    """This process's resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler(threading.Thread):
    """Samples the RSS every `interval` seconds until stopped; `peak` is the largest seen."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.peak, self._done = interval, rss_bytes(), threading.Event()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, rss_bytes())
        return self.peak


class StandInExtractor(nn.Module):
    """2048-d features of a 32-px image: ReLU of a fixed random projection of its 4x4 average pool. A
    stand-in for the FID Inception (whose 299-px forward would take hours on 2 CPU cores at 100,000
    images); the statistics it yields have the real size."""

    weights_info = {"sha256": "stand-in", "source": "bench_stream_fid.py"}

    def __init__(self, dims: int = 2048):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.project = nn.Linear(3 * 4 * 4, dims)
        with torch.no_grad():
            self.project.weight.copy_(torch.randn(dims, 48, generator=generator) / 48**0.5)
            self.project.bias.zero_()


class StandInFeatures(FIDFeatures):
    """FIDFeatures whose features skip the Inception's 299-px resize (defined in __main__: Ray ships it
    by value to the workers)."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        x = images.to(device).float() / 255  # (n, 3, 32, 32)
        with torch.no_grad():
            return torch.relu(self.model.project(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)))


def one_size(total: int, *, workers: int, shard_size: int, batch_size: int) -> dict:
    import warnings

    import numpy as np

    from robint_ray.data import load_split
    from robint_ray.distributed import Tasks, init_ray
    from robint_ray.fid import FeatureStats, fid_from_stats
    from robint_ray.generate import GenerationConfig, fit_seeds, generate
    from robint_ray.models import build_model
    from robint_ray.visualize import PGDSettings

    warnings.filterwarnings("ignore", message=".*rank-deficient.*")  # 500 real images < 2048 dims: a stand-in FID
    torch.set_num_threads(1)
    init_ray("local", num_cpus=workers)
    torch.manual_seed(0)
    model = build_model("cifar_resnet8").eval()
    seeds = fit_seeds(load_split("sample", "test"), num_classes=10)
    features = StandInFeatures(StandInExtractor(), dims=2048, batch_size=batch_size)
    test = load_split("sample", "test")
    real = FeatureStats.of(features.features(torch.from_numpy(np.ascontiguousarray(test.images)).permute(0, 3, 1, 2)))
    settings = PGDSettings(eps=30.0, step_size=0.5, steps=1)

    def config(n: int) -> GenerationConfig:
        return GenerationConfig(
            per_class=n // 10,
            classes=tuple(range(10)),
            seed=0,
            shard_size=shard_size,
            batch_size=batch_size,
            settings=settings,
        )

    with tempfile.TemporaryDirectory(prefix="bench-stream-fid-") as tmp:
        warm = generate(
            model,
            seeds,
            config=config(2 * shard_size),
            out_dir=Path(tmp) / "warm",
            tasks=Tasks(workers, cpus=1, gpus=0),
            progress=False,
            merge=False,
            fid=features,
        )
        fid_from_stats(warm["stats"], real)
        del warm
        import gc

        gc.collect()
        baseline = rss_bytes()
        sampler = PeakSampler()
        sampler.start()
        start = time.perf_counter()
        made = generate(
            model,
            seeds,
            config=config(total),
            out_dir=Path(tmp) / "run",
            tasks=Tasks(workers, cpus=1, gpus=0),
            progress=False,
            merge=False,
            fid=features,
        )
        value = fid_from_stats(made["stats"], real)
        seconds = time.perf_counter() - start
        peak = sampler.stop()
    return {
        "images": made["images"],
        "shards": made["shards"],
        "shard_size": shard_size,
        "workers": workers,
        "seconds": round(seconds, 1),
        "images_per_s": round(made["images"] / seconds, 1),
        "baseline_rss_mib": round(baseline / 2**20, 1),
        "peak_rss_mib": round(peak / 2**20, 1),
        "extra_rss_mib": round((peak - baseline) / 2**20, 1),
        "fid_stand_in": round(value, 4),
        "stats_mib": round(8 * 2048 * 2049 / 2**20, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=1000, help="images per generation task")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", type=Path, default=None, help="write results.json and table.md here")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child process: one size
    args = parser.parse_args()
    if args.one is not None:
        print(
            "RESULT "
            + json.dumps(
                one_size(args.one, workers=args.workers, shard_size=args.shard_size, batch_size=args.batch_size)
            ),
            flush=True,
        )
        return 0
    rows = []
    for size in args.sizes:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                str(size),
                "--workers",
                str(args.workers),
                "--shard-size",
                str(args.shard_size),
                "--batch-size",
                str(args.batch_size),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            return proc.returncode
        rows.append(json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:]))
        print(json.dumps(rows[-1]), flush=True)
    first = rows[0]["extra_rss_mib"]
    lines = [
        "| generated images | shards | wall time (s) | images/s | driver RSS above baseline (MiB) | vs. 1,000 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["extra_rss_mib"] / first if first > 0 else float("nan")
        lines.append(
            f"| {r['images']:,} | {r['shards']} | {r['seconds']} | {r['images_per_s']} | "
            f"{r['extra_rss_mib']} | {ratio:.2f}x |"
        )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    table = "\n".join(lines)
    note = (
        f"{os.cpu_count()}-core CPU ({platform.machine()}), {os.getloadavg()[0]:.1f} load average at the end, "
        f"{args.workers} Ray workers, shards of {args.shard_size} images, 1 PGD step (cifar_resnet8), "
        f"2048-d stand-in features (not the Inception), commit {commit}"
    )
    print(table)
    print(note)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "stream_fid.json").write_text(json.dumps({"rows": rows, "note": note}, indent=2) + "\n")
        (args.out / "stream_fid.md").write_text(table + "\n\n" + note + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
