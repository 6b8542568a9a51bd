"""Training throughput on one GPU: standard and PGD-20 adversarial training, fp32 eager against bf16
autocast + channels_last, each also under torch.compile.

    python experiments/benchmarks/bench_train_gpu.py                       # CIFAR ResNet18, batch 128
    python experiments/benchmarks/bench_train_gpu.py --arch resnet50 --size 128 --classes 150 --batch-size 200
    python experiments/benchmarks/bench_train_gpu.py --variants eager --deterministic   # deterministic cuDNN

Every row runs the library's `train_epoch` (the code path of `robint train` on one worker, cuDNN
autotuning on as there, or deterministic kernels with --deterministic, the `deterministic: true` setting:
the attack on the module, then one forward and backward; the paper's attack:
L2, eps 0.5, step 0.1, 20 steps, no random start, batch norm in train mode) on batches of random
images already resident on the GPU, so that the figure is the model's and the attack's, not the data
loader's. Each row: `--warmup` batches (compilation included), then `--batches` timed batches between
two synchronisations. Prints images/s and the implied seconds per 50,000-image epoch (CIFAR-10's
training set).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from robint_ray.config import PGDSettings  # noqa: E402
from robint_ray.models import build_model  # noqa: E402
from robint_ray.train import configure_cudnn, train_epoch  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_s(args, *, adversarial: bool, bf16: bool, channels_last: bool, compiled: bool) -> float:
    device = torch.device(args.device)
    torch.manual_seed(0)
    module = build_model(args.arch, num_classes=args.classes).to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    model = torch.compile(module) if compiled else module
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    pgd = PGDSettings(norm="l2", eps=args.eps, step_size=args.eps / 5, steps=args.steps) if adversarial else None
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [
        (
            torch.rand(args.batch_size, 3, args.size, args.size, device=device, generator=generator),
            torch.randint(0, args.classes, (args.batch_size,), device=device, generator=generator),
        )
        for _ in range(4)
    ]

    def epoch(n: int) -> None:
        loader = [batches[i % len(batches)] for i in range(n)]
        train_epoch(model, loader, optimizer, pgd_cfg=pgd, device=device, bf16=bf16, channels_last=channels_last)

    epoch(args.warmup)
    synchronize(device)
    start = time.perf_counter()
    epoch(args.batches)
    synchronize(device)
    return args.batches * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="cifar_resnet18")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default: 32)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eps", type=float, default=0.5, help="L2 eps; the step is eps / 5 (default: 0.5)")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps (default: 20)")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per row (default: 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first (default: 5)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=("eager", "compiled"),
        default=["eager", "compiled"],
        help="eager rows, torch.compile rows, or both (default: both)",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="cuDNN's deterministic kernels instead of autotuning (training's `deterministic: true`)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "bench_train_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); --device cpu runs it on the CPU"
        )
    configure_cudnn(args.deterministic)

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"# {args.arch}, {args.size} px, batch {args.batch_size}, L2 PGD-{args.steps} eps {args.eps}; "
        f"{name}, torch {torch.__version__}, cuDNN {'deterministic' if args.deterministic else 'autotuned'}",
        flush=True,
    )
    rows = []
    for compiled in [variant == "compiled" for variant in args.variants]:
        for bf16 in (False, True):
            for adversarial in (False, True):
                label = (
                    f"{'PGD-%d adversarial' % args.steps if adversarial else 'standard':<20} "
                    f"{'bf16 + channels_last' if bf16 else 'fp32':<21} {'compiled' if compiled else 'eager'}"
                )
                started = time.perf_counter()
                ips = images_per_s(args, adversarial=adversarial, bf16=bf16, channels_last=bf16, compiled=compiled)
                rows.append(
                    dict(
                        adversarial=adversarial,
                        bf16_channels_last=bf16,
                        compiled=compiled,
                        images_per_s=ips,
                        seconds_per_50k_epoch=50_000 / ips,
                    )
                )
                print(
                    f"{label}  {ips:9.1f} img/s  {50_000 / ips:8.1f} s per 50k-image epoch  "
                    f"(row took {time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                dict(
                    arch=args.arch,
                    size=args.size,
                    batch_size=args.batch_size,
                    pgd_steps=args.steps,
                    eps=args.eps,
                    device=name,
                    deterministic=args.deterministic,
                    torch=torch.__version__,
                    rows=rows,
                ),
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
