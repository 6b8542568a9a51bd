"""Classifiers that take images in [0, 1]: normalisation is their first layer.

Every model is a `Classifier`: `normalize -> body -> head`. `body` ends in global average pooling, so
`model.representation(x)` is the penultimate representation R(x) of the paper (section 2.3.2), shape
(N, k), and `model(x) = model.head(model.representation(x))` are the logits.

Architectures (`ARCHS`):
- `cifar_resnet18`: the paper's CIFAR-10 ResNet18 (3x3 stem, no max-pool, k = 512).
- `cifar_resnetD` for D = 6n + 2 (8, 14, 20, 32, 44, 56, ...): He et al.'s CIFAR ResNets with option-A
  shortcuts, the architecture of the pretrained models in `shared/models/cifar10-resnet-akamaster`
  (k = 64). `cifar_resnet8` is the tiny model of the tests and smoke runs.
- `resnet50`: torchvision's ResNet50 for the paper's 128 x 128 Small ImageNet 150 (k = 2048).
- `resnet18`: torchvision's ResNet18 at 128 px, a cheaper stand-in for smoke runs.
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, check

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@contextlib.contextmanager
def in_mode(model: nn.Module, mode: Literal["eval", "train"] = "eval") -> Iterator[nn.Module]:
    """Every submodule of `model` in eval (batch norm with running statistics) or train mode for the
    block; on exit, also after an exception, each submodule gets back its own mode (a model with some
    submodules in train mode and others in eval mode comes back exactly as it was)."""
    check(mode in ("eval", "train"), f"model_mode must be 'eval' or 'train', got {mode!r}")
    saved = [(m, m.training) for m in model.modules()]
    model.train(mode == "train")
    try:
        yield model
    finally:
        for module, training in saved:
            module.training = training


def on_cpu(model: nn.Module) -> nn.Module:
    """The model as it travels to Ray tasks: itself where its parameters are on the CPU, else a CPU copy
    (the caller's model stays where it is; each task moves its copy to its own device)."""
    if next(model.parameters()).device.type == "cpu":
        return model
    return copy.deepcopy(model).cpu()


class Normalize(nn.Module):
    """(x - mean) / std per channel; x in [0, 1]. Buffers, so they follow the model's device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class Classifier(nn.Module):
    """normalize -> body -> head. Inputs are images in [0, 1], (N, C, H, W)."""

    def __init__(self, body: nn.Module, head: nn.Linear, *, arch: str, mean, std, input_size: int):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body
        self.head = head
        self.arch = arch
        self.input_size = input_size

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def representation_dim(self) -> int:
        return self.head.in_features

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """R(x): the penultimate representation, (N, k), before the linear head."""
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.representation(x))


class Representation(nn.Module):
    """A view of a classifier whose forward is R(x), for the optimisers that work on it
    (representation inversion, feature visualisation). Shares the classifier's parameters."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.representation(x)


# --- CIFAR ResNet18 (3x3 stem, no max-pool) ------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.option_a = False
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                # He et al. option A: subsample by 2 and zero-pad planes/4 channels on each side.
                self.option_a = True
                self.pad = planes // 4
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.option_a:
            skip = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        else:
            skip = self.shortcut(x)
        return F.relu(out + skip)


class CifarResNetBody(nn.Module):
    """3x3 stem (no max-pool), stages of BasicBlocks, global average pooling -> (N, widths[-1])."""

    def __init__(self, blocks: list[int], widths: list[int], shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for i, (n, planes) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            layer = []
            for j in range(n):
                layer.append(BasicBlock(in_planes, planes, stride if j == 0 else 1, shortcut))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.num_stages = len(blocks)
        self.out_dim = in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        return out.mean(dim=(2, 3))


class TorchvisionBody(nn.Module):
    """A torchvision ResNet without its fc layer: ends in global average pooling."""

    def __init__(self, net: nn.Module):
        super().__init__()
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class ArchSpec:
    build_body: Callable[[], nn.Module]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int
    default_classes: int


def _akamaster(depth: int) -> ArchSpec:
    n = (depth - 2) // 6
    return ArchSpec(
        lambda: CifarResNetBody([n, n, n], [16, 32, 64], shortcut="A"),
        IMAGENET_MEAN,
        IMAGENET_STD,
        32,
        10,  # the pretrained models were trained with these
    )


def _torchvision(name: str) -> ArchSpec:
    def build() -> nn.Module:
        import torchvision  # imported here: only the 128-px models need it

        return TorchvisionBody(getattr(torchvision.models, name)(weights=None))

    return ArchSpec(build, IMAGENET_MEAN, IMAGENET_STD, 128, 150)


ARCHS: dict[str, ArchSpec] = {
    "cifar_resnet18": ArchSpec(
        lambda: CifarResNetBody([2, 2, 2, 2], [64, 128, 256, 512], shortcut="B"),
        CIFAR10_MEAN,
        CIFAR10_STD,
        32,
        10,
    ),
    "resnet50": _torchvision("resnet50"),
    "resnet18": _torchvision("resnet18"),
}


def arch_spec(arch: str) -> ArchSpec:
    if arch in ARCHS:
        return ARCHS[arch]
    match = re.fullmatch(r"cifar_resnet(\d+)", arch)
    if match and (int(match.group(1)) - 2) % 6 == 0 and int(match.group(1)) >= 8:
        return _akamaster(int(match.group(1)))
    known = ", ".join(sorted(ARCHS) + ["cifar_resnet{8,14,20,32,44,56,...}"])
    raise InputError(f"unknown architecture {arch!r}; known: {known}")


def build_model(arch: str, num_classes: int | None = None) -> Classifier:
    """A freshly initialised classifier (random weights; nothing is downloaded)."""
    spec = arch_spec(arch)
    num_classes = spec.default_classes if num_classes is None else num_classes
    if num_classes < 2:
        raise InputError(f"num_classes must be at least 2, got {num_classes}")
    body = spec.build_body()
    with torch.no_grad():
        dim = body(torch.zeros(1, 3, spec.input_size, spec.input_size)).shape[1]
    return Classifier(
        body,
        nn.Linear(dim, num_classes),
        arch=arch,
        mean=spec.mean,
        std=spec.std,
        input_size=spec.input_size,
    )


def to_our_keys(model: Classifier, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the keys of a foreign state dict onto `model`'s.

    Handles the akamaster CIFAR ResNets (`module.conv1.weight`, ..., `module.linear.*`), plain
    torchvision ResNets (`conv1.weight`, ..., `fc.*`) and our own keys (returned unchanged). The
    normalisation buffers are the architecture's own unless the state dict brings them.
    """
    if any(k.startswith(("body.", "head.")) for k in state):
        out = dict(state)
    else:
        body_prefix = "body.net." if isinstance(model.body, TorchvisionBody) else "body."
        out = {}
        for key, value in state.items():
            key = key.removeprefix("module.")
            if key.startswith(("linear.", "fc.")):
                out["head." + key.split(".", 1)[1]] = value
            else:
                out[body_prefix + key] = value
    for name, buffer in model.normalize.named_buffers():
        out.setdefault("normalize." + name, buffer)
    return out
