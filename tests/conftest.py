"""Shared fixtures: paths to ../shared (skipped with a reason where absent), the pretrained
ResNet-20, tiny models, and one local Ray instance for the whole test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import robint_ray  # noqa: F401  (first: it keeps a local Ray instance on 127.0.0.1, see its __init__)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR_EXACT = SHARED / "data" / "cifar10" / "cifar10_exact_subset.npz"
IMAGENETTE = SHARED / "data" / "imagenette-128"
RESNET20 = SHARED / "models" / "cifar10-resnet-akamaster" / "resnet20-12fca82f.th"

torch.set_num_threads(min(2, os.cpu_count() or 1))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device (run on a GPU machine)"))]


@pytest.fixture(params=DEVICES)
def device(request):
    """A test taking `device` runs on the CPU and, where there is one, again on a CUDA GPU, with TF32
    off and cuDNN's deterministic algorithms there, so that comparisons with references hold to fp32
    precision as on the CPU. With cuDNN's defaults, reruns of the same PGD differed on an H100
    (experiments/benchmarks/cudnn_determinism.py), and our PGD and torchattacks' once ended 8e-5 apart."""
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark
    cudnn.allow_tf32 = matmul.allow_tf32 = cudnn.benchmark = False
    cudnn.deterministic = True
    try:
        yield torch.device("cuda")
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is not beside this clone)")
    return path


@pytest.fixture(scope="session")
def cifar_exact() -> Path:
    """The 5,438 + 1,017 exact CIFAR-10 images of ../shared."""
    return _need(CIFAR_EXACT)


@pytest.fixture(scope="session")
def imagenette() -> Path:
    return _need(IMAGENETTE)


@pytest.fixture(scope="session")
def resnet20_path() -> Path:
    return _need(RESNET20)


@pytest.fixture(scope="session")
def resnet20(resnet20_path):
    """The pretrained CIFAR-10 ResNet-20 (91.6 % on the 1,017 exact test images), eval mode."""
    from robint_ray.checkpoint import load_weights

    return load_weights("cifar_resnet20", resnet20_path)


@pytest.fixture(scope="session")
def sample_test():
    """The bundled real CIFAR-10 sample's test split as tensors (500 images)."""
    from robint_ray.data import load_split, stack

    return stack(load_split("sample", "test"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs, loopback only) for every Ray test of the session."""
    import ray

    from robint_ray.distributed import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
