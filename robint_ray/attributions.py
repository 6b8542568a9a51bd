"""Attributions, the pure math: Integrated Gradients, expected gradients (SHAP's gradient explainer),
and the metrics that compare two models' attributions.

Everything here takes tensors and returns tensors; nothing knows about Ray (see `explain.py`).

Integrated Gradients (Sundararajan et al. 2017; the paper's eq. 6-12), for a target output F, an
image x and a baseline x':

    IG(x) = (x - x') * integral_0^1 dF(x' + a (x - x')) / dx  da

approximated with the trapezoid rule on m + 1 points a_j = j / m, j = 0..m, 1/m apart, with weights
1/(2m), 1/m, ..., 1/m, 1/(2m) that sum to 1. Then completeness holds up to the quadrature error:
sum(IG) = F(x) - F(x'). The paper's eq. 9 prints a step of 1/(m + 1) on the same m + 1 points; its
weights would sum to m/(m + 1), and so would the attributions, as a share of the output change. The
authors' code uses 1/m, as we do.

Relation to captum: `IntegratedGradients.attribute(..., n_steps=n, method="riemann_trapezoid")` uses
the same n = m + 1 points (linspace(0, 1, n), spacing 1/(n - 1)) but weights 1/n (halved at both
ends), which sum to (n - 1)/n. So, point for point,

    ours(m) = captum(n_steps=m + 1) * (m + 1) / m,

and captum's trapezoid attributions sum to m/(m + 1) of F(x) - F(x') (2 % short at n_steps = 50).

Expected gradients (Erion et al. 2020; the paper's eq. 18), what `shap.GradientExplainer` computes:

    phi(x) = E_{x' ~ background, a ~ U(0, 1)} [ (x - x') * dF(x' + a (x - x')) / dx ],

estimated from `nsamples` draws of (background image, a) per explained image. With local smoothing s,
x is replaced in each draw by x + s * N(0, 1) noise (in the difference too), as shap does.

Targets F: "probability" (the softmax probability of the class, the paper's choice for IG) or "logit"
(what `shap.GradientExplainer` explains on a model that outputs logits, the authors' setting).

Memory: every method evaluates the model on images x steps x baselines (or x samples) points; these are
processed in passes of at most `batch_size` points (the memory cap), each pass holding whole images or a
slice of one image's points, so a pass never mixes a varying set of images and the result for an
image does not depend on which other images it was computed with (see `images_per_pass`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import torch
from torch import nn

from .errors import check
from .models import in_mode
from .seeds import seeded_generator

Output = Literal["probability", "logit"]
OUTPUTS = ("probability", "logit")
BASELINES = ("black", "uniform")


# --- shared pieces ----------------------------------------------------------------------------------


def target_output(logits: torch.Tensor, target: torch.Tensor, output: Output) -> torch.Tensor:
    """F for each row: the target class's logit or softmax probability. logits (B, K), target (B,) -> (B,)."""
    if output == "probability":
        logits = logits.softmax(dim=1)
    return logits.gather(1, target[:, None]).squeeze(1)


def output_gradients(
    model: nn.Module, points: torch.Tensor, target: torch.Tensor, output: Output
) -> tuple[torch.Tensor, torch.Tensor]:
    """dF/dpoint and F at each point: points (B, C, H, W), target (B,) -> ((B, C, H, W), (B,)).

    One forward and one backward (to the input only, no parameter gradients). Each row's gradient is its
    own: F is summed over rows, which are independent in eval mode."""
    # contiguous: the convolution kernels (and so the last bits of the result) follow the memory
    # format, which must not depend on how the caller's images happen to be laid out
    points = points.detach().contiguous().requires_grad_(True)
    with torch.enable_grad():
        values = target_output(model(points), target, output)
        (grads,) = torch.autograd.grad(values.sum(), points)
    return grads, values.detach()


def images_per_pass(points_per_image: int, batch_size: int) -> int:
    """How many whole images one pass holds (1 when an image's points alone exceed batch_size, and
    then its points are split over several passes). A shard of images that starts at a multiple of
    this number is computed in exactly the same passes as inside the full run."""
    check(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
    return max(1, batch_size // points_per_image)


def _passes(n_images: int, points_per_image: int, batch_size: int) -> Iterator[tuple[int, int, int, int]]:
    """(image_start, image_stop, point_start, point_stop) for each pass of at most batch_size points."""
    per = images_per_pass(points_per_image, batch_size)
    if per > 1 or points_per_image <= batch_size:
        for start in range(0, n_images, per):
            yield start, min(start + per, n_images), 0, points_per_image
    else:
        for i in range(n_images):
            for p in range(0, points_per_image, batch_size):
                yield i, i + 1, p, min(p + batch_size, points_per_image)


def image_generator(seed: int, index: int) -> torch.Generator:
    """A torch generator for one image, seeded by (seed, the image's index in its dataset): random
    baselines and draws do not depend on how the images are batched or sharded."""
    return seeded_generator(seed, index, layout="w0w1")


def estimate_batch_size(
    model: nn.Module, image_shape: tuple[int, ...], memory_bytes: float, *, device: torch.device | str = "cpu"
) -> int:
    """Points per pass that fit in about memory_bytes: forward activations of one image (every
    module's output, measured with hooks), counted three times (kept for backward, their gradients,
    workspace). A rough cap, meant to keep a large model or image off the memory limit."""
    sizes: list[int] = []

    def hook(_module, _inputs, out):
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad(), in_mode(model):
            model(torch.zeros((1, *image_shape), device=device))
    finally:
        for h in handles:
            h.remove()
    per_point = 3 * (sum(sizes) + 4 * math.prod(image_shape))
    return max(1, int(memory_bytes // per_point))


# --- Integrated Gradients -------------------------------------------------------------------------


def trapezoid(
    steps: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas, weights), each (steps + 1,): alphas j/steps, weights 1/steps halved at both ends (sum 1)."""
    check(isinstance(steps, int) and steps >= 1, f"steps must be an integer >= 1, got {steps!r}")
    alphas = torch.arange(steps + 1, device=device, dtype=torch.float64) / steps
    weights = torch.full((steps + 1,), 1.0 / steps, device=device, dtype=torch.float64)
    weights[0] /= 2
    weights[-1] /= 2
    return alphas.to(dtype), weights.to(dtype)


def make_baselines(
    x: torch.Tensor,
    *,
    kind: str = "uniform",
    k: int = 10,
    seed: int = 0,
    indices: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Baselines for IG, (N, k, C, H, W): "black" (zeros, k must be 1) or "uniform" (k images of
    U(0, 1) noise per image, drawn from the image's own generator, see `image_generator`; the authors
    average IG over k = 10 of them). indices: each image's index in its dataset (default 0..N-1)."""
    check(kind in BASELINES, f"unknown baseline {kind!r}; use one of {', '.join(BASELINES)}")
    check(isinstance(k, int) and k >= 1, f"the number of baselines must be an integer >= 1, got {k!r}")
    if kind == "black":
        check(k == 1, f"a black baseline is one image; got {k} baselines")
        return torch.zeros_like(x)[:, None]
    indices = np.arange(len(x)) if indices is None else np.asarray(indices)
    out = torch.empty((len(x), k, *x.shape[1:]), dtype=x.dtype, device=x.device)
    for i, index in enumerate(indices):  # one generator per image; the draws themselves are batched
        out[i] = torch.rand(out.shape[1:], generator=image_generator(seed, index), dtype=x.dtype).to(x.device)
    return out


@dataclass(frozen=True)
class IGResult:
    """attributions (N, C, H, W); output (N,) F(x); baseline_output (N,) F(x') averaged over the
    baselines; gap (N,) sum(attributions) - (F(x) - F(x')), the completeness error."""

    attributions: torch.Tensor
    output: torch.Tensor
    baseline_output: torch.Tensor
    gap: torch.Tensor

    @property
    def relative_gap(self) -> torch.Tensor:
        """|gap| / |F(x) - F(x')| per image (inf where the output does not change)."""
        return self.gap.abs() / (self.output - self.baseline_output).abs()


def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    baselines: torch.Tensor,
    *,
    steps: int = 50,
    output: Output = "probability",
    batch_size: int = 128,
) -> IGResult:
    """Integrated Gradients of F = `output` of class `target`, trapezoid rule on steps + 1 points.

    x: (N, C, H, W) in [0, 1]; target: (N,) class indices; baselines: (N, K, C, H, W) (see
    `make_baselines`), attributions averaged over the K baselines, so sum(attributions) ~ F(x) -
    mean_k F(x'_k). batch_size: interpolated images per forward/backward pass (the memory cap).
    Gradients are summed in float64. The model runs in eval mode; model.training is restored.
    """
    check(output in OUTPUTS, f"unknown output {output!r}; use one of {', '.join(OUTPUTS)}")
    check(
        x.dim() == 4
        and baselines.dim() == 5
        and baselines.shape[0] == x.shape[0]
        and baselines.shape[2:] == x.shape[1:],
        f"baselines must be (N, K, C, H, W) for images {tuple(x.shape)}, got {tuple(baselines.shape)}",
    )
    check(target.shape == (len(x),), f"target must be (N,) = ({len(x)},), got {tuple(target.shape)}")
    alphas, weights = trapezoid(steps, device=x.device, dtype=x.dtype)
    n, k = baselines.shape[:2]
    points_per_image = k * (steps + 1)
    sums = torch.zeros((n, k, *x.shape[1:]), dtype=torch.float64, device=x.device)  # sum_j w_j grad_j
    ends = torch.zeros((n, k, 2), dtype=torch.float64, device=x.device)  # F(x'_k), F(x) per baseline
    with in_mode(model):
        for i0, i1, p0, p1 in _passes(n, points_per_image, batch_size):
            p = torch.arange(p0, p1, device=x.device)
            which, j = p // (steps + 1), p % (steps + 1)  # baseline and step of each point
            start = baselines[i0:i1, which]  # (n, P, C, H, W)
            points = start + alphas[j].view(1, -1, 1, 1, 1) * (x[i0:i1, None] - start)
            grads, values = output_gradients(
                model, points.flatten(0, 1), target[i0:i1].repeat_interleave(len(p)), output
            )
            grads = grads.view(points.shape).double() * weights[j].double().view(1, -1, 1, 1, 1)
            sums[i0:i1].index_add_(1, which, grads)
            values = values.view(i1 - i0, len(p)).double()
            for end, step in ((0, 0), (1, steps)):
                hit = j == step
                ends[i0:i1, which[hit], end] = values[:, hit]
    delta = (x[:, None] - baselines).double()  # (N, K, C, H, W)
    attributions = (delta * sums).mean(dim=1)
    output_x, output_base = ends[:, 0, 1], ends[:, :, 0].mean(dim=1)
    gap = attributions.flatten(1).sum(1) - (output_x - output_base)
    return IGResult(attributions.to(x.dtype), output_x.to(x.dtype), output_base.to(x.dtype), gap.to(x.dtype))


# --- expected gradients (SHAP GradientExplainer) ----------------------------------------------------


@dataclass(frozen=True)
class Draws:
    """The random draws of expected gradients for N images: background_index (N, S) into the
    background set, alpha (N, S) in [0, 1] (kept in float64 where given so), noise (N, S, C, H, W) standard
    normal or None (only used
    with local smoothing)."""

    background_index: torch.Tensor
    alpha: torch.Tensor
    noise: torch.Tensor | None = None


def draw(
    indices: torch.Tensor | np.ndarray,
    *,
    nsamples: int,
    n_background: int,
    seed: int = 0,
    image_shape: tuple[int, ...] | None = None,
) -> Draws:
    """Seeded draws for the images with these dataset indices: per image, from its own generator
    (`image_generator`), nsamples background indices, then nsamples alphas, then (when image_shape
    is given) nsamples standard-normal noise images."""
    check(nsamples >= 1, f"nsamples must be >= 1, got {nsamples}")
    check(n_background >= 1, "the background set is empty")
    rows_index, rows_alpha, rows_noise = [], [], []
    for index in np.asarray(indices):
        g = image_generator(seed, index)
        rows_index.append(torch.randint(n_background, (nsamples,), generator=g))
        rows_alpha.append(torch.rand(nsamples, generator=g))
        if image_shape is not None:
            rows_noise.append(torch.randn((nsamples, *image_shape), generator=g))
    if not rows_index:
        empty = torch.zeros((0, nsamples))
        return Draws(empty.long(), empty, None if image_shape is None else torch.zeros((0, nsamples, *image_shape)))
    return Draws(torch.stack(rows_index), torch.stack(rows_alpha), torch.stack(rows_noise) if rows_noise else None)


def expected_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    background: torch.Tensor,
    *,
    nsamples: int = 200,
    output: Output = "logit",
    local_smoothing: float = 0.0,
    seed: int = 0,
    indices: torch.Tensor | np.ndarray | None = None,
    draws: Draws | None = None,
    batch_size: int = 200,
) -> torch.Tensor:
    """Expected gradients, what shap.GradientExplainer(model, background).shap_values(x) computes
    for one output: (N, C, H, W) attributions of F = `output` of class `target`.

    x: (N, C, H, W) in [0, 1]; target (N,); background (B, C, H, W). Draw s of image i takes
    background[draws.background_index[i, s]] = x', alpha a = draws.alpha[i, s] and, with local
    smoothing, x~ = x + local_smoothing * draws.noise[i, s]; it contributes (x~ - x') * dF/dx at
    a x~ + (1 - a) x' (shap's formula). draws default to `draw(indices, seed=seed, ...)`, indices to
    0..N-1. batch_size: points per forward/backward pass (the memory cap). No per-sample Python loop:
    each pass gathers its backgrounds and builds its points in one tensor operation.
    """
    check(output in OUTPUTS, f"unknown output {output!r}; use one of {', '.join(OUTPUTS)}")
    check(local_smoothing >= 0, f"local_smoothing must be >= 0, got {local_smoothing}")
    check(
        background.dim() == 4 and background.shape[1:] == x.shape[1:],
        f"background must be (B, {', '.join(map(str, x.shape[1:]))}), got {tuple(background.shape)}",
    )
    check(target.shape == (len(x),), f"target must be (N,) = ({len(x)},), got {tuple(target.shape)}")
    if draws is None:
        draws = draw(
            np.arange(len(x)) if indices is None else indices,
            nsamples=nsamples,
            n_background=len(background),
            seed=seed,
            image_shape=tuple(x.shape[1:]) if local_smoothing > 0 else None,
        )
    nsamples = draws.alpha.shape[1]
    check(
        draws.alpha.shape == (len(x), nsamples) and draws.background_index.shape == (len(x), nsamples),
        "draws must hold (N, nsamples) background indices and alphas",
    )
    check(local_smoothing == 0 or draws.noise is not None, "local smoothing needs noise in the draws")
    index, alpha = draws.background_index.to(x.device), draws.alpha.to(x.device, torch.float64)
    # a and 1 - a each rounded from double, as shap's Python-float arithmetic does
    weight_x, weight_base = alpha.to(x.dtype), (1 - alpha).to(x.dtype)
    sums = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    with in_mode(model):
        for i0, i1, s0, s1 in _passes(len(x), nsamples, batch_size):
            xs = x[i0:i1, None]  # (n, 1, C, H, W)
            if local_smoothing > 0:
                xs = xs + draws.noise[i0:i1, s0:s1].to(x.device, x.dtype) * local_smoothing  # (n, P, C, H, W)
            base = background[index[i0:i1, s0:s1]]  # (n, P, C, H, W)
            points = (
                weight_x[i0:i1, s0:s1, None, None, None] * xs + weight_base[i0:i1, s0:s1, None, None, None] * base
            )  # (n, P, C, H, W)
            grads, _ = output_gradients(model, points.flatten(0, 1), target[i0:i1].repeat_interleave(s1 - s0), output)
            sums[i0:i1] += (grads.view(points.shape).double() * (xs - base).double()).sum(dim=1)
    return (sums / nsamples).to(x.dtype)


# --- metrics --------------------------------------------------------------------------------------


def pixel_mass(attributions: torch.Tensor) -> torch.Tensor:
    """|attribution| summed over channels, one value per pixel: (N, C, H, W) -> (N, H * W)."""
    return attributions.abs().sum(dim=1).flatten(1)


def gini(attributions: torch.Tensor) -> torch.Tensor:
    """Gini index of each image's pixel mass (N,): 0 when spread evenly, towards 1 when concentrated
    on few pixels (Hurley & Rickard's sparsity measure; 0 for an all-zero map)."""
    mass = pixel_mass(attributions).double().sort(dim=1).values  # ascending, (N, P)
    p = mass.shape[1]
    rank = torch.arange(1, p + 1, dtype=torch.float64, device=mass.device)
    total = mass.sum(dim=1)
    g = ((2 * rank - p - 1) * mass).sum(dim=1) / (p * total)
    return torch.where(total > 0, g, torch.zeros_like(g)).float()


def top_mass(attributions: torch.Tensor, fraction: float = 0.05) -> torch.Tensor:
    """Share of each image's pixel mass held by its top `fraction` of pixels (N,), in [fraction, 1]
    (= fraction for an even map)."""
    check(0 < fraction <= 1, f"fraction must lie in (0, 1], got {fraction}")
    mass = pixel_mass(attributions).double()
    top = max(1, round(fraction * mass.shape[1]))
    total = mass.sum(dim=1)
    share = mass.topk(top, dim=1).values.sum(dim=1) / total
    return torch.where(total > 0, share, torch.full_like(share, fraction)).float()


def deletion_insertion(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    attributions: torch.Tensor,
    *,
    steps: int = 32,
    reference: torch.Tensor | None = None,
    batch_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion AUCs (Petsiuk et al. 2018), each (N,).

    Pixels are ranked by attribution summed over channels, most positive first. Deletion replaces the
    top i/steps of them (i = 0..steps) by the reference image (default black), insertion starts from
    the reference and puts them back; both follow the softmax probability of `target`, and the AUC is
    the trapezoid area under that curve over the fraction of pixels in [0, 1]. Faithful attributions
    give a low deletion AUC and a high insertion AUC.
    """
    check(steps >= 1, f"steps must be >= 1, got {steps}")
    reference = torch.zeros_like(x) if reference is None else reference.expand_as(x)
    n, c, h, w = x.shape
    order = attributions.sum(dim=1).flatten(1).argsort(dim=1, descending=True, stable=True)  # (N, HW)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(h * w, device=x.device).expand(n, -1))
    counts = torch.round(torch.linspace(0, h * w, steps + 1, device=x.device)).long()  # pixels moved at step i
    curves = torch.zeros((2, n, steps + 1), dtype=torch.float64, device=x.device)
    with torch.no_grad(), in_mode(model):
        for i0, i1, _, _ in _passes(n, 2 * (steps + 1), batch_size):
            moved = (rank[i0:i1, None, :] < counts[None, :, None]).view(i1 - i0, steps + 1, 1, h, w).to(x.dtype)
            xs, refs = x[i0:i1, None], reference[i0:i1, None]
            deleted = xs * (1 - moved) + refs * moved  # (n, steps + 1, C, H, W)
            inserted = refs * (1 - moved) + xs * moved
            points = torch.stack((deleted, inserted)).flatten(0, 2)  # (2 n (steps + 1), C, H, W)
            prob = target_output(model(points), target[i0:i1].repeat_interleave(steps + 1).repeat(2), "probability")
            curves[:, i0:i1] = prob.view(2, i1 - i0, steps + 1).double()
    area = ((curves[..., 1:] + curves[..., :-1]) / 2).mean(dim=-1)  # trapezoid on [0, 1], (2, N)
    return area[0].float(), area[1].float()


def mean_ci(values: np.ndarray | list[float], *, confidence: float = 0.95) -> dict[str, float]:
    """Mean and its t-interval: {"mean", "ci_low", "ci_high", "std", "n"} (NaNs dropped; the interval
    is NaN with fewer than two values)."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    if n < 2:
        return {"mean": mean, "ci_low": float("nan"), "ci_high": float("nan"), "std": float("nan"), "n": n}
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "std": std, "n": n}


def paired_difference(
    a: np.ndarray | list[float], b: np.ndarray | list[float], *, confidence: float = 0.95
) -> dict[str, float]:
    """mean(b - a) over the same images, with its t-interval and the two-sided paired t-test p-value."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    check(a.shape == b.shape, f"paired values must have the same shape, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    out = mean_ci(b[keep] - a[keep], confidence=confidence)
    out["p_value"] = float(stats.ttest_rel(b[keep], a[keep]).pvalue) if keep.sum() >= 2 else float("nan")
    return out
