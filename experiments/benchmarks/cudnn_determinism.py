"""Does our PGD give the same images twice on this GPU? Six runs of L2 PGD-10 on the same inputs, with
cuDNN's default algorithms and with `torch.backends.cudnn.deterministic = True` (TF32 off in both).

    python experiments/benchmarks/cudnn_determinism.py      # needs a CUDA GPU
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from robint_ray.attacks import Threat, pgd  # noqa: E402
from robint_ray.models import build_model  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this checks a GPU's cuDNN")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = build_model("cifar_resnet8").cuda().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 3, 32, 32, generator=g).cuda(), torch.randint(0, 10, (16,), generator=g).cuda()
    for deterministic in (False, True):
        torch.backends.cudnn.deterministic = deterministic
        runs = [pgd(model, x, y, threat=Threat("l2", 0.5, 0.1), steps=10, random_start=False) for _ in range(6)]
        diffs = ", ".join(f"{(r - runs[0]).abs().max().item():.1e}" for r in runs[1:])
        print(f"cudnn.deterministic={deterministic}: max |run_k - run_0| over 5 reruns: {diffs}")


if __name__ == "__main__":
    main()
