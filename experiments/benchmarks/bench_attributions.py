"""Images per second of our attributions against captum, shap and the plain forward+backward limit.

    .venv/bin/python experiments/benchmarks/bench_attributions.py            # CIFAR ResNet18, 16 images
    .venv/bin/python experiments/benchmarks/bench_attributions.py --device cuda --images 64

One run, one model (randomly initialised, seeded: speed does not depend on the weights), the same
images and settings for every row:
- IG, m = 50 intervals (51 points), black baseline, softmax probability: ours vs captum's
  IntegratedGradients(method="riemann_trapezoid", n_steps=51), same points per pass;
- expected gradients, 200 samples, 176 background images, one output (the top logit): ours vs
  shap.GradientExplainer(...).shap_values(nsamples=200, ranked_outputs=1), same batch size;
- the limit: a plain forward + backward (to the input) over the same number of points in batches of
  the same size, inputs prepared beforehand;
- our IG fanned out over Ray with 1 and with 2 workers of one thread each (after a warm-up that
  starts the worker processes).
Each row is the best of --repeats runs, taken round robin, every other round in reverse order.
Ratios: against the limit, and ours over the reference.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from robint_ray import attributions as attr  # noqa: E402
from robint_ray import explain as ex  # noqa: E402
from robint_ray.allocator import tuned_malloc_label  # noqa: E402
from robint_ray.data import load_split, stack  # noqa: E402
from robint_ray.models import build_model  # noqa: E402


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def limit(model, x, target, points_per_image: int, batch_size: int, output: str):
    """A closure running forward+backward on the same number of points, in passes of our sizes."""
    n = len(x)
    batches = []
    for i0, i1, p0, p1 in attr._passes(n, points_per_image, batch_size):
        count = (i1 - i0) * (p1 - p0)
        batches.append((torch.rand((count, *x.shape[1:]), device=x.device), target[i0:i1].repeat_interleave(p1 - p0)))

    def run():
        for points, t in batches:
            points = points.requires_grad_(True)
            values = attr.target_output(model(points), t, output)
            torch.autograd.grad(values.sum(), points)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cifar_resnet18")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--nsamples", type=int, default=200)
    parser.add_argument("--background", type=int, default=176)
    parser.add_argument("--ig-batch", type=int, default=204, help="points per pass for IG (4 images x 51)")
    parser.add_argument("--shap-batch", type=int, default=200, help="points per pass for expected gradients")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-shap", action="store_true")
    args = parser.parse_args()
    malloc = tuned_malloc_label()

    import shap
    from captum.attr import IntegratedGradients

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.arch).eval().to(device)
    x_test, _ = stack(load_split("sample", "test"))
    x = x_test[: args.images].contiguous().to(device)
    with torch.no_grad():
        target = model(x).argmax(1)
    background = ex.choose_background(load_split("sample", "train"), args.background, seed=0).to(device)
    n, m = len(x), args.steps
    print(
        f"# {args.arch}, {n} images, fp32, device {device}, {args.threads} threads in process, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, best of {args.repeats}, {malloc}",
        flush=True,
    )
    cases: list[tuple[str, object, str]] = []  # (name, closure, reference name)

    # --- Integrated Gradients ---
    baselines = torch.zeros((n, 1, *x.shape[1:]), device=device)
    captum_ig = IntegratedGradients(lambda z: model(z).softmax(1))
    cases += [
        ("IG limit: forward+backward", limit(model, x, target, m + 1, args.ig_batch, "probability"), ""),
        (
            "IG ours",
            lambda: attr.integrated_gradients(
                model, x, target, baselines, steps=m, output="probability", batch_size=args.ig_batch
            ),
            "IG captum",
        ),
        (
            "IG captum",
            lambda: captum_ig.attribute(
                x,
                baselines=baselines[:, 0],
                target=target,
                n_steps=m + 1,
                method="riemann_trapezoid",
                internal_batch_size=args.ig_batch,
            ),
            "",
        ),
    ]
    # --- expected gradients ---
    if not args.skip_shap:
        explainer = shap.GradientExplainer(model, background, batch_size=args.shap_batch)
        cases += [
            ("EG limit: forward+backward", limit(model, x, target, args.nsamples, args.shap_batch, "logit"), ""),
            (
                "EG ours",
                lambda: attr.expected_gradients(
                    model, x, target, background, nsamples=args.nsamples, output="logit", batch_size=args.shap_batch
                ),
                "EG shap GradientExplainer",
            ),
            (
                "EG shap GradientExplainer",
                lambda: explainer.shap_values(x, nsamples=args.nsamples, ranked_outputs=1, rseed=0),
                "",
            ),
        ]
    # --- Ray fan-out of our IG, workers of one thread each, one shard per worker ---
    if not args.skip_ray:
        from robint_ray.distributed import Tasks, init_ray

        init_ray(num_cpus=2)
        cpu_model, xc, tc = copy.deepcopy(model).cpu(), x.cpu(), target.cpu()
        ig = ex.IGConfig(steps=m, baseline="black", num_baselines=1, output="probability")

        def fanned(workers: int):
            cfg = ex.ExplainConfig(method="ig", ig=ig, shards_per_worker=1, batch_size=args.ig_batch, metric_steps=1)
            tasks = Tasks(workers, cpus=1, gpus=0)
            return lambda: ex.explain(cpu_model, xc, tc, config=cfg, tasks=tasks, progress=False)

        one, two = "Ray IG, 1 worker x 1 thread", "Ray IG, 2 workers x 1 thread"
        cases += [(one, fanned(1), ""), (two, fanned(2), one)]
        ex.explain(
            cpu_model,
            xc[:4],
            tc[:4],
            config=ex.ExplainConfig(method="ig", ig=ig, shards_per_worker=1, batch_size=args.ig_batch, metric_steps=1),
            tasks=Tasks(2, cpus=1, gpus=0),  # warm-up: start both workers
            progress=False,
        )

    # Round robin: each repeat runs every case once, so a change in the machine's load hits all alike;
    # every other repeat in reverse order, so that no case always runs right after the same one (the
    # allocator and cache state a case leaves behind moves the next one's time by several per cent).
    times = {name: float("inf") for name, _, _ in cases}
    for r in range(args.repeats):
        for name, fn, _ in cases if r % 2 == 0 else cases[::-1]:
            times[name] = min(times[name], best_time(fn, 1))
            print(f"[{r + 1}/{args.repeats}] {name}: {n / times[name]:.2f} img/s", flush=True)
    rows = [(name, n / times[name], ref) for name, _, ref in cases]
    if not args.skip_ray:
        print("# the Ray rows include the Ray overhead and a 2-point deletion/insertion metric per image")

    # --- the table ---
    speed = {name: v for name, v, _ in rows}
    print()
    print(f"{'':34} {'images/s':>9} {'x limit':>8} {'x reference':>12}")
    for name, v, ref in rows:
        group = name.split()[0]
        lim = speed.get(f"{group} limit: forward+backward")
        vs_limit = f"{v / lim:8.2f}" if lim and "limit" not in name and group != "Ray" else f"{'':8}"
        vs_ref = f"{v / speed[ref]:8.2f} ({ref})" if ref else ""
        print(f"{name:34} {v:9.2f} {vs_limit} {vs_ref}")


if __name__ == "__main__":
    main()
