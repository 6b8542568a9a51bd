"""Attributions at scale: IG or expected gradients fanned out over Ray, metrics, figures, files.

    config = ExplainConfig(method="ig")
    result = explain(model, images, labels, config=config, indices=indices,       # an Explanation
                     tasks=Tasks(workers=2, cpus=1, gpus=0))
    summary = summarize({"standard": result_a, "robust": result_b})                # means, CIs, differences
    plot_grid(images, {"standard": result_a.attributions, "robust": result_b.attributions}, "grid.png")

The math lives in `attributions.py`; this module shards the images and runs `explain_shard` on them
through `distributed.fan_out`, in this process or as Ray tasks (then the model and images go into the
object store once, results return in input order, a task lost with its worker is retried), and draws
the paper's figures with matplotlib.

Shards start at multiples of `alignment(config)` images, so every forward/backward pass holds the same
images as in a single-process run: the fan-out returns exactly the single-process attributions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
from torch import nn

from . import attributions as attr
from .config import build_dataclass
from .distributed import IN_PROCESS, Tasks, fan_out
from .errors import check
from .models import in_mode
from .shards import Shard, consecutive_shards

log = logging.getLogger(__name__)

METHODS = ("ig", "shap")


@dataclass(frozen=True)
class IGConfig:
    """Integrated Gradients as the authors ran it: 10 uniform-noise baselines x 50 intervals, the
    softmax probability as F. baseline "black" takes num_baselines = 1."""

    steps: int = 50
    baseline: Literal["black", "uniform"] = "uniform"
    num_baselines: int = 10
    output: Literal["probability", "logit"] = "probability"
    seed: int = 0

    def __post_init__(self):
        check(isinstance(self.steps, int) and self.steps >= 1, f"ig.steps must be an integer >= 1, got {self.steps!r}")
        check(self.baseline in attr.BASELINES, f"ig.baseline must be one of {attr.BASELINES}, got {self.baseline!r}")
        check(self.num_baselines >= 1, f"ig.num_baselines must be >= 1, got {self.num_baselines}")
        check(self.baseline != "black" or self.num_baselines == 1, "a black baseline takes ig.num_baselines = 1")
        check(self.output in attr.OUTPUTS, f"ig.output must be one of {attr.OUTPUTS}, got {self.output!r}")


@dataclass(frozen=True)
class ShapConfig:
    """Expected gradients as the authors ran shap.GradientExplainer: 176 background images, 200
    samples (shap's default), the logit of the top class (ranked_outputs=1 on a logit model)."""

    nsamples: int = 200
    background: int = 176  # images drawn (seeded) from the training split
    local_smoothing: float = 0.0
    output: Literal["probability", "logit"] = "logit"
    seed: int = 0

    def __post_init__(self):
        check(self.nsamples >= 1, f"shap.nsamples must be >= 1, got {self.nsamples}")
        check(self.background >= 1, f"shap.background must be >= 1, got {self.background}")
        check(self.local_smoothing >= 0, f"shap.local_smoothing must be >= 0, got {self.local_smoothing}")
        check(self.output in attr.OUTPUTS, f"shap.output must be one of {attr.OUTPUTS}, got {self.output!r}")


@dataclass(frozen=True)
class ExplainConfig:
    """One attribution run. target: explain the "predicted" class (the paper's figures) or the
    "label". batch_size: model evaluations per forward/backward pass, the memory cap (memory_mb, when
    set, lowers it to what the estimate says fits). Where the work runs is `explain`'s `tasks`; with
    Ray, about tasks.workers x shards_per_worker shards."""

    method: Literal["ig", "shap"] = "ig"
    ig: IGConfig = field(default_factory=IGConfig)
    shap: ShapConfig = field(default_factory=ShapConfig)
    target: Literal["predicted", "label"] = "predicted"
    batch_size: int = 128
    memory_mb: float | None = None
    metric_steps: int = 32  # deletion / insertion curve points - 1
    top_fraction: float = 0.05  # for the top-mass concentration metric
    shards_per_worker: int = 4  # more shards than tasks in flight: load balance and a finer progress bar

    def __post_init__(self):
        check(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        check(self.target in ("predicted", "label"), f"target must be predicted or label, got {self.target!r}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.memory_mb is None or self.memory_mb > 0, f"memory_mb must be > 0, got {self.memory_mb}")
        check(self.metric_steps >= 1, f"metric_steps must be >= 1, got {self.metric_steps}")
        check(0 < self.top_fraction <= 1, f"top_fraction must lie in (0, 1], got {self.top_fraction}")
        check(self.shards_per_worker >= 1, f"shards_per_worker must be >= 1, got {self.shards_per_worker}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ExplainConfig":
        """The inverse of to_dict; an unknown key or a wrong type is an error that names it (the one
        config loader, `config.build_dataclass`)."""
        return build_dataclass(cls, values)


@dataclass
class Explanation:
    """The attributions of N images and their per-image metrics, in input order.

    attributions (N, C, H, W) float32; targets (N,) the explained classes (the model's own argmax,
    or the labels: config["target"] says which); labels (N,) the true labels; indices (N,) the
    images' indices in their dataset; metrics: name -> (N,) per-image values (deletion_auc,
    insertion_auc, gini, top_mass, and for IG output, baseline_output, completeness_gap,
    relative_completeness_gap)."""

    method: str
    attributions: np.ndarray
    targets: np.ndarray
    indices: np.ndarray
    metrics: dict[str, np.ndarray]
    config: dict[str, Any]
    labels: np.ndarray | None = None

    def summary(self) -> dict[str, dict[str, float]]:
        """Per metric: mean with a 95 % t-interval over the images (see attributions.mean_ci)."""
        return {name: attr.mean_ci(values) for name, values in self.metrics.items()}


# --- the computation ------------------------------------------------------------------------------


def points_per_image(config: ExplainConfig) -> int:
    """Model evaluations per explained image."""
    if config.method == "ig":
        return config.ig.num_baselines * (config.ig.steps + 1)
    return config.shap.nsamples


def alignment(config: ExplainConfig, batch_size: int) -> int:
    """Shards start at multiples of this many images, so that each pass (attributions and metrics)
    holds the same images as in a single-process run: the images of one attribution pass (the metric
    passes hold a divisor of that, see metric_batch_size)."""
    return attr.images_per_pass(points_per_image(config), batch_size)


def metric_batch_size(config: ExplainConfig, batch_size: int) -> int:
    """Points per pass of the deletion/insertion metric: at most batch_size, and whole images in a
    number that divides the images of an attribution pass. (Were the two image counts unrelated,
    shards would have to start at their least common multiple: 4 and 51 images per pass would put
    204 images in every shard, and a few hundred images would not spread over the workers.)"""
    points = 2 * (config.metric_steps + 1)
    if points >= batch_size:
        return batch_size  # one image per pass either way
    a = alignment(config, batch_size)
    b = attr.images_per_pass(points, batch_size)
    return max(d for d in range(1, min(a, b) + 1) if a % d == 0) * points


def resolve_batch_size(model: nn.Module, image_shape: tuple[int, ...], config: ExplainConfig) -> int:
    """config.batch_size, lowered to fit config.memory_mb where that is set."""
    if config.memory_mb is None:
        return config.batch_size
    fits = attr.estimate_batch_size(
        model, image_shape, config.memory_mb * 2**20, device=next(model.parameters()).device
    )
    return min(config.batch_size, fits)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Predicted classes (N,) of images (N, C, H, W), in eval mode (model.training restored)."""
    device = next(model.parameters()).device
    with in_mode(model):
        out = [model(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def explain_images(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    indices: np.ndarray,
    *,
    config: ExplainConfig,
    batch_size: int,
    background: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Attributions and per-image metrics of some images, in this process, on the model's device.

    images (n, C, H, W) in [0, 1], targets (n,), indices (n,) dataset indices (they seed the random
    baselines and draws). Returns numpy arrays: "attributions" (n, C, H, W) and one (n,) per metric."""
    device = next(model.parameters()).device
    x, t = images.to(device), targets.to(device)
    out: dict[str, np.ndarray] = {}
    if config.method == "ig":
        ig = config.ig
        baselines = attr.make_baselines(x, kind=ig.baseline, k=ig.num_baselines, seed=ig.seed, indices=indices)
        result = attr.integrated_gradients(
            model, x, t, baselines, steps=ig.steps, output=ig.output, batch_size=batch_size
        )
        maps = result.attributions
        out.update(
            output=result.output,
            baseline_output=result.baseline_output,
            completeness_gap=result.gap,
            relative_completeness_gap=result.relative_gap,
        )
    else:
        check(background is not None, "expected gradients need a background set")
        sh = config.shap
        maps = attr.expected_gradients(
            model,
            x,
            t,
            background.to(device),
            nsamples=sh.nsamples,
            output=sh.output,
            local_smoothing=sh.local_smoothing,
            seed=sh.seed,
            indices=indices,
            batch_size=batch_size,
        )
    deletion, insertion = attr.deletion_insertion(
        model, x, t, maps, steps=config.metric_steps, batch_size=metric_batch_size(config, batch_size)
    )
    out.update(
        deletion_auc=deletion,
        insertion_auc=insertion,
        gini=attr.gini(maps),
        top_mass=attr.top_mass(maps, config.top_fraction),
    )
    out = {name: value.detach().cpu().numpy() for name, value in out.items()}
    out["attributions"] = maps.detach().cpu().numpy()
    return out


def explain_shard(
    shard: Shard, *, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, indices: np.ndarray, **options: Any
) -> dict[str, np.ndarray]:
    """One Ray task: explain_images (options: its config, batch_size, background) on the shard's images,
    on the model's device (in a Ray task fan_out moved it to the task's: a GPU where it was given one)."""
    part = slice(shard.start, shard.stop)
    return explain_images(model, images[part], targets[part], indices[part], **options)


def plan_shards(n: int, config: ExplainConfig, batch_size: int, workers: int) -> list[Shard]:
    """About workers x shards_per_worker shards (one where workers is 0), each a multiple of alignment."""
    unit = alignment(config, batch_size)
    wanted = max(1, workers * config.shards_per_worker)
    size = max(unit, math.ceil(math.ceil(n / wanted) / unit) * unit)
    return consecutive_shards(n, size)


def explain(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    config: ExplainConfig,
    indices: np.ndarray | None = None,
    background: torch.Tensor | None = None,
    tasks: Tasks = IN_PROCESS,
    progress: bool = True,
    shard_fn: Callable[..., dict[str, np.ndarray]] = explain_shard,
) -> Explanation:
    """Attributions of `images` (N, C, H, W) in [0, 1], with metrics, for the class config.target
    names: "predicted" (the default, as the authors' notebooks: each model's own argmax, so a wrongly
    classified image shows why the model chose what it chose) or "label" (the true `labels` (N,)).

    tasks (`distributed.Tasks`): in this process, the images as one shard; as Ray tasks, split into
    aligned shards (`plan_shards`; the same attributions either way). indices: the images' dataset
    indices (default 0..N-1); they seed the random baselines and draws. shard_fn: the function each
    shard runs (explain_shard; tests wrap it)."""
    check(images.dim() == 4 and len(labels) == len(images), "images must be (N, C, H, W) with N labels")
    indices = np.arange(len(images)) if indices is None else np.asarray(indices)
    check(len(indices) == len(images), "indices must hold one index per image")
    labels = torch.as_tensor(labels, dtype=torch.long)
    targets = labels if config.target == "label" else predict(model, images, batch_size=config.batch_size)
    batch_size = resolve_batch_size(model, tuple(images.shape[1:]), config)
    # No images: one empty shard, for the arrays' names and shapes.
    shards = plan_shards(len(images), config, batch_size, tasks.workers) or [Shard(0, 0, 0)]
    parts = fan_out(
        shard_fn,
        shards,
        tasks=tasks,
        shared=dict(
            model=model,
            images=images,
            targets=targets,
            indices=indices,
            config=config,
            batch_size=batch_size,
            background=background,
        ),
        sizes=[s.size for s in shards],
        desc=config.method,
        progress=progress,
    )
    merged = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    maps = merged.pop("attributions")
    return Explanation(config.method, maps, targets.numpy(), indices, merged, config.to_dict(), labels.numpy())


def choose_background(dataset, n: int, *, seed: int = 0) -> torch.Tensor:
    """n images (seeded, without replacement) of a dataset as (n, C, H, W) in [0, 1]: the background
    set of expected gradients."""
    check(len(dataset) >= 1, "the background split is empty")
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(dataset), size=min(n, len(dataset)), replace=False))
    return torch.stack([dataset[int(i)][0] for i in picks])


def summarize(explanations: Mapping[str, Explanation]) -> dict[str, Any]:
    """metrics.json content: per model the per-image metrics and their means (95 % CIs); with two
    models, the paired difference (second minus first) of each metric over the same images."""
    out: dict[str, Any] = {"models": {}}
    for name, e in explanations.items():
        out["models"][name] = {
            "target": e.config.get("target"),
            "per_image": {
                "index": e.indices.tolist(),
                "target": e.targets.tolist(),
                **({} if e.labels is None else {"label": e.labels.tolist()}),
                **{k: v.tolist() for k, v in e.metrics.items()},
            },
            "mean": e.summary(),
        }
    names = list(explanations)
    if len(names) == 2:
        a, b = explanations[names[0]], explanations[names[1]]
        out["difference"] = {
            "of": f"{names[1]} - {names[0]}",
            **{
                k: attr.paired_difference(a.metrics[k], b.metrics[k])
                for k in ("deletion_auc", "insertion_auc", "gini", "top_mass")
            },
        }
    return out


def save(
    out_dir: str | Path,
    explanations: Mapping[str, Explanation],
    *,
    extra: Mapping[str, Any] | None = None,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write out_dir/attributions.npz (`attributions` (N, C, H, W) of the first model, `indices`,
    `targets`, `labels`, `target_kind` ("predicted" or "label"), and `<name>_attributions`,
    `<name>_targets` for every model) and out_dir/metrics.json (with "target": the kind)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(explanations)
    first = explanations[names[0]]
    arrays = {
        "attributions": first.attributions,
        "indices": first.indices,
        "targets": first.targets,
        "target_kind": np.array(first.config.get("target", "")),
    }
    if labels is None:
        labels = first.labels
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    for name, e in explanations.items():
        arrays[f"{name}_attributions"] = e.attributions
        arrays[f"{name}_targets"] = e.targets
    np.savez_compressed(out_dir / "attributions.npz", **arrays)
    metrics = {
        "method": first.method,
        "n": int(len(first.indices)),
        "target": first.config.get("target"),
        "config": first.config,
        **(dict(extra) if extra else {}),
        **summarize(explanations),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True))
    return metrics


# --- figures --------------------------------------------------------------------------------------


def _red_blue():
    """Blue (negative) -> transparent -> red (positive), shap's red_transparent_blue in spirit."""
    from matplotlib.colors import LinearSegmentedColormap

    blue, red = (0.12, 0.53, 0.9), (1.0, 0.05, 0.34)
    colors = [(*blue, 1.0), (*blue, 0.0), (*red, 0.0), (*red, 1.0)]
    return LinearSegmentedColormap.from_list("red_transparent_blue", list(zip([0, 0.5, 0.5, 1], colors)))


def _draw_attribution(ax, image: np.ndarray, attribution: np.ndarray, cmap) -> None:
    """A dimmed grayscale image under the channel-summed attribution, scaled to its own 99.5th
    percentile of |value| (so each model's map is readable on its own)."""
    gray = image @ np.array([0.2989, 0.5870, 0.1140])  # (H, W)
    heat = attribution.sum(axis=0)
    vmax = float(np.percentile(np.abs(heat), 99.5)) or 1e-12
    ax.imshow(gray, cmap="gray", alpha=0.35, interpolation="nearest")
    ax.imshow(heat, cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _image_hwc(images: np.ndarray | torch.Tensor) -> np.ndarray:
    return np.clip(np.asarray(images, dtype=np.float32).transpose(0, 2, 3, 1), 0, 1)


def plot_overlays(
    images: np.ndarray | torch.Tensor,
    maps: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    captions: list[str] | None = None,
) -> Path:
    """The paper's Figs. 2 and 6: one row per image, columns image | one attribution map per model
    (e.g. standard | robust). images (N, C, H, W) in [0, 1]; maps name -> (N, C, H, W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pictures, cmap = _image_hwc(images), _red_blue()
    n, cols = len(pictures), 1 + len(maps)
    fig, axes = plt.subplots(n, cols, figsize=(2.4 * cols, 2.4 * n), squeeze=False)
    for row in range(n):
        axes[row, 0].imshow(pictures[row], interpolation="nearest")
        axes[row, 0].set_xticks([])
        axes[row, 0].set_yticks([])
        if captions:
            axes[row, 0].set_ylabel(captions[row], fontsize=9)
        for col, (name, values) in enumerate(maps.items(), start=1):
            _draw_attribution(axes[row, col], pictures[row], np.asarray(values[row]), cmap)
            if row == 0:
                axes[row, col].set_title(name, fontsize=10)
    axes[0, 0].set_title("image", fontsize=10)
    fig.text(0.5, 0.005, "red: raises the class score, blue: lowers it", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grid_cell(i: int, *, rows: int = 8) -> tuple[int, int, str]:
    """Where image i sits in the paper's attribution grids (Figs. 10, 13, 16, 17): filled column by
    column, `rows` images per column, as the authors' plotting code does (8 rows x 3 columns for 24
    images); rows lettered A, B, ... from the top, columns numbered 1, 2, ... from the left, so the
    paper's "H2" is the last image of the second column. Returns (row, column, label)."""
    column, row = divmod(i, rows)
    return row, column, f"{chr(ord('A') + row)}{column + 1}"


def plot_grid(
    images: np.ndarray | torch.Tensor,
    maps: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    rows: int = 8,
    captions: list[str] | None = None,
    title: str = "",
) -> Path:
    """The paper's Figs. 10 / 13 (16 / 17): 24 images as 8 rows (A-H) x 3 columns (1-3), filled column
    by column (`grid_cell`); each cell the image followed by one attribution map per model, labelled
    like the paper's "H2", with an optional caption per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pictures, cmap = _image_hwc(images), _red_blue()
    n, per_cell = len(pictures), 1 + len(maps)
    rows = max(1, min(rows, n))
    columns = math.ceil(n / rows)
    fig, axes = plt.subplots(
        rows,
        columns * per_cell,
        figsize=(1.35 * columns * per_cell, 1.65 * rows + 0.6),
        squeeze=False,
        gridspec_kw={"wspace": 0.05, "hspace": 0.45},
    )
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c, label = grid_cell(i, rows=rows)
        ax = axes[r, c * per_cell]
        ax.imshow(pictures[i], interpolation="nearest")
        ax.set_title(f"{label} {captions[i]}" if captions else label, fontsize=7, loc="left")
        for k, values in enumerate(maps.values(), start=1):
            _draw_attribution(axes[r, c * per_cell + k], pictures[i], np.asarray(values[i]), cmap)
            axes[r, c * per_cell + k].axis("on")
            for spine in axes[r, c * per_cell + k].spines.values():
                spine.set_visible(False)
    legend = "each cell: image | " + " | ".join(maps) + "   (red: raises the class score, blue: lowers it)"
    fig.suptitle(f"{title}\n{legend}" if title else legend, fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
