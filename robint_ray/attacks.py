"""The PGD engine: projected gradient ascent on a per-example loss (paper, Algorithm 1 and eq. 2-4).

One engine serves adversarial attacks, adversarial training, representation inversion, class
generation and feature visualisation: each hands `pgd` its own per-example loss. A threat model is
`init` (random start) / `step` (ascent direction times step size) / `project` (back into the ball
and into [0, 1]).

Each example's attack depends on that example alone. The gradient is taken of the per-example losses
*summed* over the batch, and each example's L2 step is its own gradient divided by its own norm, with
no floor. torchattacks' `PGDL2`, MadryLab's `robustness` and the paper's code divide the gradient of the
batch-*mean* loss by (norm + 1e-10): the mean shrinks every gradient by the batch size, on confident
examples it falls below the 1e-10 floor, their step shrinks to nothing, and they count as robust. The
result then depends on the batch size (measured on the pretrained ResNet-20, 1,017 CIFAR-10 test images,
L2 eps 0.5, step 0.1, 20 steps: torchattacks reports 2.5 % robust accuracy at batch 32 and 6.5 % at
1,017; this engine 0 %), which is one reason why PGD figures in papers overstate robustness.

(Exception: with the model in train mode, batch norm mixes the examples of a batch; that is the
caller's explicit choice, `model_mode="train"`.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, check
from .models import in_mode

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (output, target) -> (N,)


def per_example_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example, (N,). The default loss of the attack (paper, eq. 1)."""
    return F.cross_entropy(logits, y, reduction="none")


def misclassified_then_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A score for choosing the best iterate in an evaluation: any misclassified iterate beats every
    correctly classified one, and among equals the higher cross-entropy wins. (N,), float64."""
    wrong = (logits.argmax(dim=1) != y).to(torch.float64)
    return wrong * 1e6 + per_example_ce(logits, y).to(torch.float64).clamp(max=1e5)


def check_ball(norm: str, eps: float, step_size: float) -> None:
    """An Lp ball of radius eps with steps of step_size: norm "l2" or "linf", eps >= 0, step_size > 0."""
    check(norm in ("l2", "linf"), f"unknown norm {norm!r}; use 'l2' or 'linf'")
    check(math.isfinite(eps) and eps >= 0, f"eps must be >= 0, got {eps}")
    check(math.isfinite(step_size) and step_size > 0, f"step size must be > 0, got {step_size}")


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example, shaped (N, 1, ..., 1) to broadcast against t."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


@dataclass(frozen=True)
class Threat:
    """An Lp ball of radius eps around each image, intersected with the image box [0, 1].

    norm: "l2" or "linf". eps: radius, in pixel units of [0, 1] images (the paper's CIFAR-10 L2 eps 0.5
    is about 0.5 / sqrt(3072) = 0.009 per pixel). step_size: length of one ascent step under the norm.
    """

    norm: Literal["l2", "linf"]
    eps: float
    step_size: float

    def __post_init__(self):
        check_ball(self.norm, self.eps, self.step_size)

    def init(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A random point of the ball around x, clipped to [0, 1]. The draws are made on the
        generator's device (a CPU generator gives the same starts for images on any device)."""
        device = generator.device if generator is not None else x.device

        def draw(sample, shape):
            return sample(shape, generator=generator, device=device, dtype=x.dtype).to(x.device)

        if self.norm == "linf":
            delta = (2 * draw(torch.rand, x.shape) - 1) * self.eps
        else:
            # Uniform direction, radius eps * U(0, 1) (as torchattacks' PGDL2 random start).
            direction = draw(torch.randn, x.shape)
            direction = direction / _flat_norm(direction).clamp_min(torch.finfo(x.dtype).tiny)
            radius = draw(torch.rand, (x.shape[0],) + (1,) * (x.dim() - 1))
            delta = direction * radius * self.eps
        return (x + delta).clamp(0, 1)

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        """The ascent step for each example from its own gradient: step_size * sign(g) for Linf,
        step_size * g / ||g|| for L2 (an example whose gradient is exactly zero stays put)."""
        if self.norm == "linf":
            return self.step_size * grad.sign()
        norm = _flat_norm(grad)
        return torch.where(norm > 0, grad / norm.clamp_min(torch.finfo(grad.dtype).tiny), 0.0) * self.step_size

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Into the eps-ball around x, then into [0, 1] (clipping toward the box, where x lies, never
        leaves the ball)."""
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norm = _flat_norm(delta)
            factor = torch.where(norm > self.eps, self.eps / norm.clamp_min(torch.finfo(x.dtype).tiny), 1.0)
            delta = delta * factor
        return (x + delta).clamp(0, 1)


def check_images(x: torch.Tensor) -> None:
    check(x.dim() >= 2 and x.shape[0] > 0, f"expected a batch of images (N, C, H, W), got shape {tuple(x.shape)}")
    check(x.is_floating_point(), f"images must be floating point in [0, 1], got dtype {x.dtype}")
    lo, hi = x.min().item(), x.max().item()
    check(lo >= 0 and hi <= 1, f"images must lie in [0, 1]; got values in [{lo:.4g}, {hi:.4g}]")


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: Threat,
    steps: int,
    loss_fn: LossFn = per_example_ce,
    targeted: bool = False,
    random_start: bool = False,
    restarts: int = 1,
    keep: Literal["last", "best"] = "last",
    score_fn: LossFn | None = None,
    model_mode: Literal["eval", "train"] = "eval",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient ascent on loss_fn(model(x_adv), y) within `threat` around x (eq. 4).

    x: (N, C, H, W) in [0, 1], on the model's device; y: whatever loss_fn takes as its target (labels
    by default). loss_fn returns one loss per example, (N,). targeted=True descends instead (toward y).
    random_start: start from a random point of the ball (else from x). restarts: independent runs, the
    first from x unless random_start, the others from random points; per example the run whose kept
    iterate scores best wins.
    keep: "last" returns the last iterate; "best" the iterate with the highest score_fn(model(x_t), y)
    per example (default: the objective), over every iterate including the start.
    model_mode: the mode the model runs in during the attack ("train" makes batch norm use batch
    statistics, as the author's adversarial trainer did); each module's own mode is restored after.
    Defaults: no random start, as the author's trainer; the last iterate, as torchattacks (the paper
    says neither; the author's code keeps the iterate of highest batch-mean loss).

    Returns x_adv, detached, same shape and dtype as x, with ||x_adv - x|| <= eps under the threat's
    norm and every pixel in [0, 1]. Does not change model.training or any parameter's gradient.
    """
    check(isinstance(steps, int) and steps >= 1, f"steps must be an integer >= 1, got {steps!r}")
    check(isinstance(restarts, int) and restarts >= 1, f"restarts must be an integer >= 1, got {restarts!r}")
    check(keep in ("last", "best"), f"keep must be 'last' or 'best', got {keep!r}")
    check_images(x)
    x = x.detach()
    sign = -1.0 if targeted else 1.0

    def objective(out: torch.Tensor) -> torch.Tensor:
        losses = loss_fn(out, y)
        if losses.shape != (x.shape[0],):
            raise InputError(
                f"loss_fn must return one loss per example, shape ({x.shape[0]},); got {tuple(losses.shape)}"
            )
        return sign * losses

    def score(out: torch.Tensor, objective_value: torch.Tensor) -> torch.Tensor:
        if score_fn is None:
            return objective_value.detach().to(torch.float64)
        return sign * score_fn(out.detach(), y).to(torch.float64)

    best_x, best_score = x.clone(), torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
    with in_mode(model, model_mode), torch.enable_grad():
        for restart in range(restarts):
            x_adv = threat.init(x, generator) if (random_start or restart > 0) else x.clone()
            run_best, run_score = x_adv.clone(), torch.full_like(best_score, -math.inf)
            for step in range(steps + 1):
                if step == steps and keep == "last" and restarts == 1:
                    return x_adv.detach()  # nothing to compare: skip the scoring forward
                x_adv.requires_grad_(True)
                out = model(x_adv)
                value = objective(out)
                if keep == "best" or step == steps:
                    s = score(out, value)
                    better = s > run_score if keep == "best" else torch.ones_like(s, dtype=torch.bool)
                    run_score = torch.where(better, s, run_score)
                    run_best[better] = x_adv.detach()[better]
                if step == steps:
                    break
                # Sum, not mean: each example's gradient is then independent of the batch.
                (grad,) = torch.autograd.grad(value.sum(), x_adv)
                x_adv = threat.project(x_adv.detach() + threat.step(grad), x)
            better = run_score > best_score
            best_score = torch.where(better, run_score, best_score)
            best_x[better] = run_best[better]
    return best_x.detach()
