"""The paper's global methods (section 2.3.2): projected gradient steps on R(x) or on a logit.

All three hand the PGD engine (`attacks.pgd`) their own per-example objective:
- representation inversion (eq. 15): from a source image toward the representation of a target image,
  minimising ||R(x_src + d) - R(x_targ)|| / ||R(x_targ)||;
- class-specific generation (eq. 16): maximise the logit of class i from a seed drawn from the class's
  multivariate normal (section 2.4);
- direct feature visualisation (eq. 13-14): maximise one coordinate of R(x), or the mean of several,
  from noise or an image; and the test images that activate those coordinates most and least.

Defaults are the paper's (L2 throughout): inversion eps 1000, step 1, 10,000 iterations; generation
eps 30, step 0.5, 60 iterations at 32 px and eps 40, step 1, 60 iterations at 128 px; feature
visualisation eps 1000, step 1, 400 iterations.

Where we differ from the authors' code (`rep_visualization.py`): the inversion loss there is one norm
over the whole batch, ||R(X_src + D) - R(X_targ)||_F / ||R(X_targ)||_F, so each image's step depends
on the others; here it is each example's own normalised distance. The authors' models also pass the
gradient through the last ReLU ("fake ReLU"); ours use the plain ReLU, so a coordinate that is zero at
every position of the start image cannot grow (its gradient is zero: the engine leaves it put).

Class seeds (section 2.4, as the authors' notebooks do it): each class's images are average-pooled
by 4 at every input size (`pool` = 4: 8 x 8 x 3 = 192 dimensions at 32 px, 32 x 32 x 3 = 3,072 at
128 px; Santurkar et al.'s `robustness` code pools ImageNet to 8 x 8, `pool` = 16 at 128 px, which
the study offers as `generation.seed_pool`), a normal with the class's mean and covariance (eq. 19-22,
1/n) plus 1e-4 * I is fitted there, and the draws are upsampled back by repeating each value over its
pool x pool block and clipped to [0, 1].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .attacks import check_images, pgd
from .config import PGDSettings
from .errors import check
from .models import Classifier, Representation, in_mode

log = logging.getLogger(__name__)


INVERSION = PGDSettings(eps=1000.0, step_size=1.0, steps=10_000)  # Figs. 4, 8, 11, 18
FEATURE_VIS = PGDSettings(eps=1000.0, step_size=1.0, steps=400)  # Figs. 5, 9, 12, 15
GENERATION = {  # Figs. 3 and 7, by input size
    32: PGDSettings(eps=30.0, step_size=0.5, steps=60),
    128: PGDSettings(eps=40.0, step_size=1.0, steps=60),
}


def generation_settings(input_size: int) -> PGDSettings:
    """The paper's generation settings for a model's input size (32 px: CIFAR-10; else 128 px)."""
    return GENERATION[32] if input_size <= 32 else GENERATION[128]


# --- objectives: (output, target) -> (N,) --------------------------------------------------------


def normalised_distance(rep: torch.Tensor, rep_target: torch.Tensor) -> torch.Tensor:
    """||R - R_targ|| / ||R_targ|| per example (eq. 15). rep, rep_target: (N, k). Returns (N,)."""
    return (rep - rep_target).norm(dim=1) / rep_target.norm(dim=1).clamp_min(torch.finfo(rep.dtype).tiny)


def class_logit(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """F(x)_i for each example's class i (eq. 16). logits: (N, classes); classes: (N,). Returns (N,)."""
    return logits.gather(1, classes.view(-1, 1)).squeeze(1)


def mean_activation(rep: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(1/|z|) sum_i R(x)_{z_i} per example (eq. 13 for one coordinate, eq. 14 for several).
    rep: (N, k); features: (N, |z|) coordinate indices. Returns (N,)."""
    return rep.gather(1, features).mean(dim=1)


# --- the three methods ---------------------------------------------------------------------------


def _feature_index(features: Sequence[int] | torch.Tensor, n: int, k: int, device) -> torch.Tensor:
    z = torch.as_tensor(features, dtype=torch.long, device=device)
    if z.dim() == 0:
        z = z.view(1)
    if z.dim() == 1:
        z = z.view(1, -1).expand(n, -1)  # the same coordinates for every image
    check(z.shape[0] == n and z.shape[1] >= 1, f"features must be (|z|,) or (N, |z|); got {tuple(z.shape)} for N = {n}")
    check(
        int(z.min()) >= 0 and int(z.max()) < k,
        f"feature indices must lie in 0..{k - 1}, got {z.min().item()}..{z.max().item()}",
    )
    return z


def invert(
    model: Classifier, x_source: torch.Tensor, x_target: torch.Tensor, *, settings: PGDSettings = INVERSION
) -> torch.Tensor:
    """Representation inversion (eq. 15): per example, x_source + d with ||d|| <= eps whose R is
    closest to R(x_target) in normalised L2 distance.

    x_source, x_target: (N, C, H, W) in [0, 1] on the model's device. Returns (N, C, H, W) in [0, 1],
    detached. Runs the model in eval mode and restores its mode.
    """
    check(
        x_source.shape == x_target.shape,
        f"source and target batches differ in shape: {tuple(x_source.shape)} vs {tuple(x_target.shape)}",
    )
    check_images(x_target)
    rep_target = representation(model, x_target)  # (N, k)
    return pgd(
        Representation(model),
        x_source,
        rep_target,
        threat=settings.threat,
        steps=settings.steps,
        loss_fn=normalised_distance,
        targeted=True,
    )


def generate_classes(
    model: Classifier, seeds: torch.Tensor, classes: torch.Tensor, *, settings: PGDSettings = GENERATION[32]
) -> torch.Tensor:
    """Class-specific image generation (eq. 16): per example, seed + d with ||d|| <= eps that
    maximises the logit of its class. seeds: (N, C, H, W) in [0, 1]; classes: (N,) long.
    Returns (N, C, H, W) in [0, 1], detached."""
    check(
        classes.shape == (seeds.shape[0],),
        f"need one class per seed, got {tuple(classes.shape)} for {seeds.shape[0]} seeds",
    )
    return pgd(
        model, seeds, classes.to(seeds.device), threat=settings.threat, steps=settings.steps, loss_fn=class_logit
    )


def visualize_features(
    model: Classifier,
    x_start: torch.Tensor,
    features: Sequence[int] | torch.Tensor,
    *,
    settings: PGDSettings = FEATURE_VIS,
) -> torch.Tensor:
    """Direct feature visualisation (eq. 13-14): per example, x_start + d with ||d|| <= eps that
    maximises the mean of R(x) over the coordinates `features` ((|z|,) for every image, or (N, |z|)).
    x_start: (N, C, H, W) in [0, 1] (noise or images). Returns (N, C, H, W) in [0, 1], detached."""
    z = _feature_index(features, x_start.shape[0], model.representation_dim, x_start.device)
    return pgd(Representation(model), x_start, z, threat=settings.threat, steps=settings.steps, loss_fn=mean_activation)


# --- measurements --------------------------------------------------------------------------------


@torch.no_grad()
def representation(model: Classifier, x: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """R(x) in eval mode, (N, k), batched; restores the model's mode."""
    with in_mode(model):
        return torch.cat([model.representation(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def logits(model: Classifier, x: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """model(x) in eval mode, (N, classes), batched; restores the model's mode."""
    with in_mode(model):
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def feature_activations(
    model: Classifier, x: torch.Tensor, features: Sequence[int] | torch.Tensor, *, batch_size: int = 256
) -> torch.Tensor:
    """The objective of eq. 13-14 on each image: mean of R(x) over `features`. Returns (N,)."""
    rep = representation(model, x, batch_size=batch_size)
    return mean_activation(rep, _feature_index(features, len(x), rep.shape[1], rep.device))


def extreme_activations(activations: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the k highest and the k lowest activations, each ordered from the extreme
    inward: (top (k,), bottom (k,)). Ties go to the lower position (a stable sort)."""
    k = min(k, len(activations))
    order = torch.sort(activations, descending=True, stable=True).indices
    bottom = torch.sort(activations, stable=True).indices
    return order[:k], bottom[:k]


# --- class seeds (section 2.4) -------------------------------------------------------------------


SEED_POOL = 4  # the authors' GRAIN, at 32 px and at 128 px alike


def seed_pool(input_size: int) -> int:
    """The pooling factor of the class seeds: 4, the authors' grain at every input size (8 x 8 x 3 =
    192 dimensions at 32 px, 32 x 32 x 3 = 3,072 at 128 px), or 1 for images too small to pool."""
    return SEED_POOL if input_size % SEED_POOL == 0 else 1


@dataclass(frozen=True)
class ClassSeeds:
    """One multivariate normal per class over average-pooled images: a draw is
    mean + scale @ z + noise_sd * z', with z (r,) and z' (d,) standard normal.

    mean: (classes, d); scale: (classes, d, r); noise_sd: (classes,); d = C * (H / pool) * (W / pool).
    With at least d images in some class, scale is the lower Cholesky factor of the regularised
    covariance (r = d) and noise_sd is 0; with fewer (d = 3,072 at 128 px, 50 images a class), the
    covariance has rank below d, and the same normal is stored exactly in low-rank form: scale holds
    the class's centred images / sqrt(n) (r = the largest class size, zero columns for smaller
    classes) and noise_sd = sqrt(ridge) adds the ridge, so no (d, d) matrix is kept per class (150
    classes x 3,072^2 floats would be 5.7 GB). image_shape: (C, H, W) of the full-size images.
    """

    mean: torch.Tensor
    scale: torch.Tensor
    noise_sd: torch.Tensor
    pool: int
    image_shape: tuple[int, int, int]

    @property
    def num_classes(self) -> int:
        return self.mean.shape[0]


def fit_class_seeds(
    pooled: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    pool: int,
    image_shape: tuple[int, int, int],
    ridge: float = 1e-4,
) -> ClassSeeds:
    """Fit each class's normal on its pooled images (eq. 19-22: mean and 1/n covariance, in float64),
    with ridge * I added to the covariance (the authors' 1e-4). Should a covariance still not factor
    (round-off), the ridge grows tenfold until it does, so sampling never fails. Where every class
    has fewer images than dimensions the low-rank form of `ClassSeeds` is stored (the same normal).

    pooled: (N, C, h, w) images already average-pooled by `pool` (see `pool_images`); labels: (N,).
    Every class in 0..num_classes-1 needs at least one image.
    """
    check(ridge > 0, f"ridge must be > 0, got {ridge}")
    check(pooled.dim() == 4 and len(pooled) == len(labels), "pooled must be (N, C, h, w) with one label per image")
    flat = pooled.flatten(1).to(torch.float64)  # (N, d)
    d = flat.shape[1]
    members_of = [flat[labels == c] for c in range(num_classes)]
    for c, members in enumerate(members_of):
        check(len(members) >= 1, f"class {c} has no images to fit its seed distribution on")
    largest = max(len(m) for m in members_of)
    low_rank = largest < d
    eye = None if low_rank else torch.eye(d, dtype=torch.float64)
    means, scales, noise = [], [], []
    for c, members in enumerate(members_of):
        mu = members.mean(dim=0)
        centred = members - mu  # (n, d)
        if low_rank:  # cov = centred.T @ centred / n exactly, kept as its (d, n) factor
            scale = torch.zeros(d, largest, dtype=torch.float64)
            scale[:, : len(members)] = centred.T / len(members) ** 0.5
            scales.append(scale)
            noise.append(ridge**0.5)
        else:
            cov = centred.T @ centred / len(members)  # (d, d), eq. 20
            jitter = ridge
            while True:
                tril, info = torch.linalg.cholesky_ex(cov + jitter * eye)
                if int(info) == 0:
                    break
                log.warning(
                    "class %d: covariance + %.0e I is not positive definite; trying %.0e", c, jitter, jitter * 10
                )
                jitter *= 10
            scales.append(tril)
            noise.append(0.0)
        means.append(mu)
    return ClassSeeds(
        torch.stack(means).float(), torch.stack(scales).float(), torch.tensor(noise), pool, tuple(image_shape)
    )


def pool_images(x: torch.Tensor, pool: int) -> torch.Tensor:
    """Average-pool (N, C, H, W) by `pool` (H and W must be multiples of it)."""
    check(
        x.shape[-1] % pool == 0 and x.shape[-2] % pool == 0,
        f"image size {tuple(x.shape[-2:])} is not a multiple of {pool}",
    )
    return F.avg_pool2d(x, pool)


def sample_class_seeds(
    seeds: ClassSeeds, classes: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One draw from each listed class's normal, upsampled to full size and clipped to [0, 1].
    classes: (M,) long. Returns (M, C, H, W) float32 on the CPU. The draws depend only on the
    generator's state and `classes`."""
    classes = classes.long().cpu()
    check(classes.dim() == 1, "classes must be (M,)")
    check(
        len(classes) == 0 or (int(classes.min()) >= 0 and int(classes.max()) < seeds.num_classes),
        f"classes must lie in 0..{seeds.num_classes - 1}",
    )
    c, h, w = seeds.image_shape
    z = torch.randn(len(classes), seeds.scale.shape[2], generator=generator)  # (M, r)
    draws = seeds.mean[classes] + (seeds.scale[classes] @ z.unsqueeze(2)).squeeze(2)  # (M, d)
    if bool((seeds.noise_sd > 0).any()):  # the low-rank form: the ridge as independent noise
        draws = draws + seeds.noise_sd[classes].view(-1, 1) * torch.randn(draws.shape, generator=generator)
    small = draws.view(len(classes), c, h // seeds.pool, w // seeds.pool)
    full = small.repeat_interleave(seeds.pool, dim=2).repeat_interleave(seeds.pool, dim=3)  # (M, C, H, W)
    return full.clamp(0, 1)
