"""Feature visualisation at scale: class generation sharded over Ray, array files, figures.

`generate(model, seeds, config=..., out_dir=...)` makes `per_class` images of every class (the paper:
1,000 per class, 10,000 for CIFAR-10, for FID). The images are numbered class-major (image j has class
j // per_class) and cut into shards of `shard_size`; each shard is a Ray task (or, with
`distributed.IN_PROCESS`, a call in this process) that
- draws its seeds from a torch.Generator seeded from (seed, shard index) only, so a shard's images do
  not depend on which worker runs it, how many workers there are, or which shards ran before;
- runs the class-logit PGD (`visualize.generate_classes`) on them;
- runs on the task's device (a GPU where the task asked for one: `distributed.Tasks`);
- writes `shards/shard-NNNNN.npz` atomically (storage.Location: a local or shared folder, or an object
  store such as s3://) with byte-identical contents for the same inputs (a zip with fixed timestamps),
  so a rerun skips the shards already done and an interrupted run resumes where it stopped;
- given `fid` (generation and FID as one streamed step), measures its own images with the FID
  Inception in the same task and returns only their statistics (n, sum x, sum x x^T), which the driver
  adds up as they arrive: its memory stays O(d^2) whatever the number of images.
A worker that dies takes its task with it; Ray runs that task again, alone (`fan_out`'s max_retries).
Optionally (`merge`) the shards are merged into `generated.npz`: `images` (N, H, W, C) uint8, `labels`
(N,) int64, `seeds` (N, H, W, C) uint8 (the start of each image), `classes` (names): the format the
FID code reads; the figures need only `sample_images`. The shards are written by the workers, so on a
multi-node cluster the output folder must be on storage every node sees.

`inversions(...)` and `feature_visualisations(...)` run the other two methods on a handful of images
(in process, or fanned out over Ray); `save_*_figure` draw the paper's figures.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .data import spread_over_classes
from .distributed import IN_PROCESS, Tasks, fan_out, fan_out_iter, report_progress
from .errors import InputError, check
from .fid import FeatureStats
from .inception import inception_features, quantize
from .models import Classifier
from .seeds import seeded_generator
from .shards import Shard, consecutive_shards
from .storage import Location
from .visualize import (
    FEATURE_VIS,
    INVERSION,
    ClassSeeds,
    PGDSettings,
    extreme_activations,
    feature_activations,
    fit_class_seeds,
    generate_classes,
    generation_settings,
    invert,
    mean_activation,
    normalised_distance,
    pool_images,
    representation,
    sample_class_seeds,
    seed_pool,
    visualize_features,
)

log = logging.getLogger(__name__)

SHARD_DIR, PLAN, OUTPUT = "shards", "plan.json", "generated.npz"


# --- files ---------------------------------------------------------------------------------------


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """An uncompressed .npz whose bytes depend only on the arrays (np.savez stamps the current time
    into the zip). np.load reads it."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue())
    return out.getvalue()


def write_npz(path: str | Path | Location, **arrays: np.ndarray) -> Path | Location:
    """Write `npz_bytes(**arrays)` atomically to a local path (returned as a Path) or a storage
    Location (a URI such as s3://..., returned as it is)."""
    target = Location(path)
    target.write_bytes(npz_bytes(**arrays))
    return target if isinstance(path, Location) else Path(target.uri) if target.is_local else target


def read_npz(path: str | Path | Location) -> dict[str, np.ndarray]:
    """Every array of an .npz at a local path or a storage Location."""
    with np.load(io.BytesIO(Location(path).read_bytes()), allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


def to_uint8(x: torch.Tensor, *, rounding: str = "round") -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> (N, H, W, C) uint8, rounded to the nearest level (or, with
    rounding="truncate", truncated as the paper's author did; `inception.quantize`)."""
    return quantize(x.detach().cpu(), rounding=rounding).permute(0, 2, 3, 1).contiguous().numpy()


# --- class seeds from a dataset ------------------------------------------------------------------


def fit_seeds(
    dataset, *, num_classes: int, pool: int | None = None, ridge: float = 1e-4, batch_size: int = 256
) -> ClassSeeds:
    """The class seed distributions of `visualize.fit_class_seeds`, fitted on every image of a dataset
    split (the paper: the test set), read in batches and pooled on the fly (a 128-px split never
    sits in memory at full size). pool: default `seed_pool(image size)` (4, the authors' grain)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    pooled, labels, shape = [], [], None
    for x, y in loader:
        shape = tuple(x.shape[1:])
        pool = pool or seed_pool(shape[-1])
        pooled.append(pool_images(x, pool))
        labels.append(y)
    check(shape is not None, "the dataset is empty: nothing to fit the class seeds on")
    labels_all = torch.cat(labels)
    check(
        int(labels_all.max()) < num_classes,
        f"the data has labels up to {int(labels_all.max())}, the model only {num_classes} classes",
    )
    return fit_class_seeds(
        torch.cat(pooled), labels_all, num_classes=num_classes, pool=pool, image_shape=shape, ridge=ridge
    )


def per_class_sample(labels: np.ndarray, per_class: int, *, seed: int = 0) -> np.ndarray:
    """Positions of up to per_class images of each class, drawn without replacement (seeded), sorted:
    the real-data FID's training images (the authors: 1,000 a class of a shuffled CIFAR-10 training
    set). A class with fewer images gives all it has. labels: (N,). Returns (M,) int64."""
    check(isinstance(per_class, int) and per_class >= 1, f"per_class must be an integer >= 1, got {per_class!r}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks)).astype(np.int64) if picks else np.zeros(0, np.int64)


# --- sharded generation --------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationConfig:
    """What `generate` makes. per_class images of each of the classes (default: every class of the
    model), numbered class-major, in shards of shard_size, optimised batch_size at a time; settings:
    the PGD of eq. 16 (default: the paper's for the model's input size); seed: with the shard index,
    the only source of randomness; rounding: how the images become uint8 ("round", or "truncate" as
    the paper's author did before FID)."""

    per_class: int = 1000
    classes: tuple[int, ...] = ()
    seed: int = 0
    shard_size: int = 100
    batch_size: int = 100
    settings: PGDSettings = field(default_factory=lambda: generation_settings(32))
    rounding: str = "round"

    def __post_init__(self):
        check(
            isinstance(self.per_class, int) and self.per_class >= 1, f"per_class must be >= 1, got {self.per_class!r}"
        )
        check(len(self.classes) >= 1, "no classes to generate")
        check(self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.rounding in ("round", "truncate"), f"rounding must be round or truncate, got {self.rounding!r}")

    @property
    def total(self) -> int:
        return self.per_class * len(self.classes)

    def plan(self) -> dict[str, Any]:
        """Everything that fixes the shards' contents (the device is not part of it: each task runs on
        its own, and shards made on different devices may be mixed, at the cost of last-digit
        differences)."""
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d


def plan_shards(config: GenerationConfig) -> list[Shard]:
    """The run's shards: shard_size consecutive images each (start, stop: global image numbers)."""
    return consecutive_shards(config.total, config.shard_size)


def shard_classes(config: GenerationConfig, shard: Shard) -> torch.Tensor:
    """The target class of each image of a shard, (shard.size,) long."""
    positions = torch.arange(shard.start, shard.stop) // config.per_class
    return torch.tensor(config.classes, dtype=torch.long)[positions]


def shard_generator(seed: int, index: int) -> torch.Generator:
    """A generator that depends on (seed, shard index) alone (numpy's SeedSequence mixes the pair)."""
    return seeded_generator(seed, index, layout="w1w0>>1")


@dataclass(frozen=True)
class FIDFeatures:
    """How a generation shard measures its own images for FID, in the same task: the FID Inception
    (`inception.load_fid_inception`, or any module with the same `features(x, dims)`), the feature
    size, the images per Inception batch, and the preprocessing (`inception.PREPROCESSING`)."""

    model: Any
    dims: int = 2048
    batch_size: int = 32
    preprocessing: str = "robint"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(n, dims) float32 features of uint8 (n, C, H, W) images, on the model's device."""
        return inception_features(
            self.model, images, dims=self.dims, batch_size=self.batch_size, preprocessing=self.preprocessing
        )


def make_shard_images(
    shard: Shard, *, model: Classifier, seeds: ClassSeeds, config: GenerationConfig
) -> dict[str, np.ndarray]:
    """One shard's images, labels and seeds (uint8 (n, H, W, C), int64 (n,), uint8 (n, H, W, C)),
    optimised on the model's device, `config.batch_size` at a time; inside a fan_out task each batch
    is reported to the driver's progress bar."""
    device = next(model.parameters()).device
    classes = shard_classes(config, shard)
    starts = sample_class_seeds(seeds, classes, generator=shard_generator(config.seed, shard.index))  # (n, C, H, W)
    out = []
    for i in range(0, shard.size, config.batch_size):
        batch = starts[i : i + config.batch_size].to(device)
        out.append(generate_classes(model, batch, classes[i : i + config.batch_size], settings=config.settings).cpu())
        report_progress(len(batch))
    return {
        "images": to_uint8(torch.cat(out), rounding=config.rounding),
        "labels": classes.numpy().astype(np.int64),
        "seeds": to_uint8(starts),
    }


def generate_shard(
    shard: Shard,
    *,
    model: Classifier,
    seeds: ClassSeeds,
    config: GenerationConfig,
    out_dir: str | Location,
    fid: FIDFeatures | None = None,
) -> Any:
    """Make one shard's images and write them to out_dir/shards/<shard.name> (a shard whose file
    exists already is left alone); returns where the file is. With `fid`, returns instead the
    Inception statistics (`fid.FeatureStats`, 8 d^2 bytes) of the shard's images, measured in this task
    (from the stored file where the images were made before): nothing else is written, and the
    caller adds the statistics up as they arrive."""
    at = Location(out_dir) / SHARD_DIR / shard.name
    if at.exists():
        if fid is None:
            return str(at)
        images = read_npz(at)["images"]
    else:
        arrays = make_shard_images(shard, model=model, seeds=seeds, config=config)
        write_npz(at, **arrays)
        if fid is None:
            return str(at)
        images = arrays["images"]
    return shard_fid_stats(images, fid, device=next(model.parameters()).device)


def shard_fid_stats(images: np.ndarray, fid: FIDFeatures, *, device: str | torch.device = "cpu"):
    """Inception statistics (`fid.FeatureStats`) of uint8 (n, H, W, C) images, computed on `device`."""
    fid.model.to(device)
    batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (n, C, H, W) uint8
    return FeatureStats.of(fid.features(batch).to(device))  # the n d^2 sums on the task's device too


def _check_plan(at: Location, plan: dict[str, Any]) -> None:
    """Write `plan` to `at`, or refuse where `at` holds another one (the folder belongs to another run)."""
    if at.exists():
        old = at.read_json()
        if old != plan:
            changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            raise InputError(
                f"{at.parent} holds shards of another run (differs in {', '.join(changed)}); "
                "use a new --out folder or delete that one"
            )
    else:
        at.write_text(json.dumps(plan, indent=2))


def missing_shards(out_dir: str | Path | Location, config: GenerationConfig) -> list[Shard]:
    """The shards whose file is not stored yet (one listing of the shard folder, not a query per shard)."""
    stored = set((Location(out_dir) / SHARD_DIR).list())
    return [s for s in plan_shards(config) if s.name not in stored]


def generate(
    model: Classifier,
    seeds: ClassSeeds,
    *,
    config: GenerationConfig,
    out_dir: str | Path | Location,
    tasks: Tasks = IN_PROCESS,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    shard_fn: Callable[..., Any] = generate_shard,
    fid: FIDFeatures | None = None,
    fid_draws: int = 0,
    merge: bool = True,
) -> dict[str, Any]:
    """Generate config.total images into out_dir/shards/ (a local folder, or a storage URI every node
    sees), skipping shards already there, a shard at a time in this process or as Ray tasks (`tasks`:
    `distributed.Tasks`; each task on its own device).

    fid: generation and FID as one streamed step. Every shard, stored or not, is a task that also
    returns its images' Inception statistics; the driver adds them up as they arrive, so it holds one
    (d, d) sum whatever the number of images, returned as "stats" (`fid.FeatureStats`). fid_draws: also
    the statistics of that many disjoint draws, each per_class / fid_draws images of every class (the
    shards at the same place in each class; `draw_of_shard`), as "draw_stats", for the FID's spread. merge: also
    write out_dir/generated.npz (every image in one file, read back through the driver; leave it off
    for large runs: `sample_images` reads the few images a figure shows). shard_fn: the per-shard
    function (generate_shard; tests wrap it to kill their worker). Returns {"path" (None without
    merge), "images", "shards", "computed", "stats" (None without fid)}."""
    out_dir = Location(out_dir)
    _check_plan(out_dir / PLAN, config.plan())
    check(seeds.num_classes > max(config.classes), "the seed distributions do not cover every class asked for")
    shards = plan_shards(config)
    missing = missing_shards(out_dir, config)
    todo = shards if fid is not None else missing  # with fid, stored shards are measured (not remade)
    log.info(
        "%d of %d shards to compute (%d images)%s",
        len(missing),
        len(shards),
        sum(s.size for s in missing),
        "; every shard measured for FID" if fid is not None else "",
    )
    total, draws = None, [None] * fid_draws
    if fid_draws:
        check(fid is not None, "fid_draws needs fid")
        draw_of_shard(config, shards[0], fid_draws)  # checks that every shard lies in one draw
    if todo:
        shared = dict(model=model, seeds=seeds, config=config, out_dir=out_dir)
        if fid is not None:
            shared["fid"] = fid
        for i, result in fan_out_iter(
            shard_fn,
            todo,
            tasks=tasks,
            shared=shared,
            sizes=[s.size for s in todo],
            desc="generate" + (" + FID" if fid else ""),
            unit="img",
            progress=progress,
        ):
            if fid is not None:
                total = result if total is None else total.merge(result)
            if fid_draws:
                k = draw_of_shard(config, todo[i], fid_draws)
                draws[k] = result if draws[k] is None else draws[k].merge(result)
            del result  # one shard's statistics at a time besides the sum
    path = None
    if merge:
        images, labels, starts = merge_shards(out_dir, config)
        names = np.array(list(class_names) if class_names is not None else [str(c) for c in range(seeds.num_classes)])
        path = str(write_npz(out_dir / OUTPUT, images=images, labels=labels, seeds=starts, classes=names))
    out = {"path": path, "images": config.total, "shards": len(shards), "computed": len(missing), "stats": total}
    return {**out, "draw_stats": draws} if fid_draws else out


def draw_of_shard(config: GenerationConfig, shard: Shard, draws: int) -> int:
    """Which of `draws` disjoint draws a shard belongs to: draw k holds images k * m .. (k + 1) * m - 1 of
    every class, m = per_class / draws. Each draw is then a smaller copy of the whole set (every class,
    equally many images), and the FIDs of the draws show how much the figure moves between sets."""
    check(draws >= 1 and config.per_class % draws == 0, f"{draws} draws do not split {config.per_class} images a class")
    size = config.per_class // draws
    check(
        size % config.shard_size == 0,
        f"shard_size {config.shard_size} must divide the {size} images a class of each of the {draws} draws",
    )
    return (shard.start % config.per_class) // size


def merge_shards(out_dir: str | Path | Location, config: GenerationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every shard's images, labels and seeds, concatenated in image order."""
    parts = []
    for shard in plan_shards(config):
        at = Location(out_dir) / SHARD_DIR / shard.name
        check(at.exists(), f"shard {at} is missing")
        f = read_npz(at)
        parts.append((f["images"], f["labels"], f["seeds"]))
    images, labels, starts = (np.concatenate(p) for p in zip(*parts))
    return images, labels, starts


def sample_images(
    out_dir: str | Path | Location, config: GenerationConfig, *, per_class: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first `per_class` images of every class (images, labels, seeds, as merge_shards), read from
    the few shards that hold them, one at a time: what the figures show, without merging every shard."""
    shards = plan_shards(config)
    wanted = [
        j
        for k in range(len(config.classes))
        for j in range(k * config.per_class, k * config.per_class + min(per_class, config.per_class))
    ]
    parts, loaded = [], {}
    for j in wanted:
        shard = shards[j // config.shard_size]
        if shard.index not in loaded:
            loaded = {shard.index: read_npz(Location(out_dir) / SHARD_DIR / shard.name)}
        f = loaded[shard.index]
        parts.append(tuple(f[key][j - shard.start] for key in ("images", "labels", "seeds")))
    images, labels, starts = (np.stack(p) for p in zip(*parts))
    return images, labels, starts


# --- inversion and feature visualisation on a few images ------------------------------------------


def _chunks(tensors: Sequence[torch.Tensor], chunk: int) -> list[tuple[torch.Tensor, ...]]:
    """(t[i:i+chunk] for t in tensors) for consecutive chunks of the tensors' first dimension."""
    return [tuple(t[s.start : s.stop] for t in tensors) for s in consecutive_shards(len(tensors[0]), chunk)]


def _sizes(pieces: Sequence[tuple[torch.Tensor, ...]]) -> list[int]:
    return [len(piece[0]) for piece in pieces]


def _invert_chunk(piece, *, model, settings):
    source, target = piece
    return invert(model, source, target, settings=settings)


def _featvis_chunk(piece, *, model, settings):
    start, features = piece
    return visualize_features(model, start, features, settings=settings)


def inversions(
    model: Classifier,
    sources: torch.Tensor,
    targets: torch.Tensor,
    *,
    settings: PGDSettings = INVERSION,
    tasks: Tasks = IN_PROCESS,
    chunk: int = 8,
) -> dict[str, torch.Tensor]:
    """Invert R(targets) from sources (eq. 15), `chunk` images per call, in this process or as Ray tasks
    (`tasks`). Returns {"images", "distance_before", "distance_after"}: the inversions (N, C, H, W) and
    the normalised representation distances, (N,) each."""
    pieces = _chunks((sources, targets), chunk)
    parts = fan_out(
        _invert_chunk,
        pieces,
        tasks=tasks,
        shared=dict(model=model, settings=settings),
        sizes=_sizes(pieces),
        desc="invert",
    )
    images = torch.cat(parts)
    rep_target = representation(model, targets)
    return {
        "images": images,
        "distance_before": normalised_distance(representation(model, sources), rep_target),
        "distance_after": normalised_distance(representation(model, images), rep_target),
    }


def grey_noise(shape: Sequence[int], *, generator: torch.Generator) -> torch.Tensor:
    """The authors' noise source for inversion: 0.5 + U / 20, U uniform on [0, 1), so a grey image
    with values in [0.5, 0.55). shape: (N, C, H, W). Returns float32 on the CPU."""
    return 0.5 + torch.rand(tuple(shape), generator=generator) / 20


@dataclass(frozen=True)
class InversionRun:
    """One run of the authors' inversion protocol (Inv. 1, Inv. 2): a single target image inverted
    from several sources, `source_indices` (test images of other classes) then `noise` grey-noise
    images drawn from noise_seed. target_index / source_indices: positions in the test split."""

    run: int
    target_index: int
    source_indices: tuple[int, ...]
    noise: int
    noise_seed: int

    @property
    def size(self) -> int:
        return len(self.source_indices) + self.noise


def plan_inversion_run(
    labels: np.ndarray, *, run: int, seed: int = 0, image_sources: int = 2, noise: int = 1
) -> InversionRun:
    """Pick one run's images as the authors' notebooks do (a batch of shuffled test images: the
    target is one of them, the sources two others, plus one grey-noise image); Inv. 2 reruns the
    cell on another shuffled batch, so each run draws its own target and sources. Here the draw is
    seeded by (seed, run) alone, and the sources come from classes other than the target's, as the
    paper's section 2.3.2 says, each from another class where there are enough. labels: (N,) the test split's labels."""
    labels = np.asarray(labels)
    check(image_sources >= 0 and noise >= 0 and image_sources + noise >= 1, "an inversion needs at least one source")
    rng = np.random.default_rng([seed, run])
    target = int(rng.integers(len(labels)))
    others = np.flatnonzero(labels != labels[target])
    check(
        len(others) >= image_sources,
        f"the split has {len(others)} images outside the target's class, {image_sources} needed",
    )
    # spread over the other classes: two sources of one class would show one class's features twice
    picks = spread_over_classes(labels[others], image_sources, seed=int(rng.integers(2**31))) if image_sources else []
    sources = tuple(int(others[i]) for i in picks)
    return InversionRun(run, target, sources, noise, int(rng.integers(2**62)))


def inversion_run_images(dataset, plan: InversionRun) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, sources), each (plan.size, C, H, W) in [0, 1]: the target image repeated, and the
    image sources followed by the grey-noise ones (drawn from plan.noise_seed)."""
    target = dataset[plan.target_index][0]
    images = [dataset[i][0] for i in plan.source_indices]
    noise = grey_noise((plan.noise, *target.shape), generator=torch.Generator().manual_seed(plan.noise_seed))
    sources = torch.cat([torch.stack(images), noise]) if images else noise
    return target.unsqueeze(0).expand(plan.size, -1, -1, -1).contiguous(), sources


def dataset_representation(
    model: Classifier, dataset, *, batch_size: int = 256, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """R(x) of every image of a dataset split, read in batches: (N, k) on the CPU."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model = model.to(device)
    return torch.cat([representation(model, x.to(device)).cpu() for x, _ in loader])


def feature_visualisations(
    model: Classifier,
    starts: torch.Tensor,
    features: Sequence[Sequence[int]],
    test_rep: torch.Tensor,
    *,
    settings: PGDSettings = FEATURE_VIS,
    top: int = 8,
    tasks: Tasks = IN_PROCESS,
    chunk: int = 8,
) -> dict[str, Any]:
    """For each group z of coordinates (eq. 14; one coordinate: eq. 13), maximise it from every start
    image (`chunk` starts per call, in this process or as Ray tasks: `tasks`), and find the test images
    that activate it most and least.

    starts: (P, C, H, W), each group is visualised from every start: images (G * P, C, H, W), group by
    group. test_rep: R of the test images, (N, k) (`dataset_representation`). Returns {"images",
    "group" (G*P,), "features" (G, max |z|) padded with -1, "before" / "after" (G*P,) objective
    values, "top" / "bottom" (G, top) positions in the test images, "top_values" / "bottom_values"}."""
    check(len(features) >= 1, "no features to visualise")
    groups = [list(map(int, z)) for z in features]
    width = max(len(z) for z in groups)
    images, before, after, group_of = [], [], [], []
    tops, bottoms, top_values, bottom_values = [], [], [], []
    for g, z in enumerate(groups):
        zs = torch.tensor(z).view(1, -1).expand(len(starts), -1)  # (P, |z|)
        pieces = _chunks((starts, zs), chunk)
        shared = dict(model=model, settings=settings)
        out = torch.cat(
            fan_out(_featvis_chunk, pieces, tasks=tasks, shared=shared, sizes=_sizes(pieces), desc=f"featvis {z}")
        )
        images.append(out)
        before.append(feature_activations(model, starts, z))
        after.append(feature_activations(model, out, z))
        group_of.append(torch.full((len(starts),), g))
        acts = mean_activation(test_rep, torch.tensor(z).view(1, -1).expand(len(test_rep), -1))  # (N,)
        hi, lo = extreme_activations(acts, top)
        tops.append(hi), bottoms.append(lo), top_values.append(acts[hi]), bottom_values.append(acts[lo])
    padded = torch.full((len(groups), width), -1, dtype=torch.long)  # (G, max |z|), -1 = no coordinate
    for g, z in enumerate(groups):
        padded[g, : len(z)] = torch.tensor(z)
    return {
        "images": torch.cat(images),
        "group": torch.cat(group_of),
        "features": padded,
        "before": torch.cat(before),
        "after": torch.cat(after),
        "top": torch.stack(tops),
        "bottom": torch.stack(bottoms),
        "top_values": torch.stack(top_values),
        "bottom_values": torch.stack(bottom_values),
    }


# --- figures -------------------------------------------------------------------------------------


def save_grid(
    path: str | Path,
    rows: Sequence[np.ndarray],
    *,
    row_labels: Sequence[str] = (),
    title: str = "",
    col_labels: Sequence[str] = (),
    cell: float = 1.0,
) -> Path:
    """A PNG grid: rows[r] is (n_r, H, W, C) uint8; cells left empty where a row is shorter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(cell * n_cols + (1.2 if row_labels else 0), cell * n_rows + 0.4), squeeze=False
    )
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(row):
                ax.imshow(row[c], interpolation="nearest")
            if c == 0 and r < len(row_labels):
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=8)
            if r == 0 and c < len(col_labels):
                ax.set_title(col_labels[c], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_generation_figures(
    out_dir: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    starts: np.ndarray,
    class_names: Sequence[str],
    *,
    per_row: int = 8,
    title: str = "",
) -> list[Path]:
    """Generated images per class (Figs. 3, 7) and their seeds (Figs. 14, 19): one row per class."""
    classes = sorted(set(labels.tolist()))
    name = lambda c: class_names[c] if c < len(class_names) else str(c)  # noqa: E731
    gen_rows = [images[labels == c][:per_row] for c in classes]
    seed_rows = [starts[labels == c][:per_row] for c in classes]
    out_dir = Path(out_dir)
    return [
        save_grid(
            out_dir / "classes.png",
            gen_rows,
            row_labels=[name(c) for c in classes],
            title=title or "class-specific generation",
        ),
        save_grid(
            out_dir / "seeds.png",
            seed_rows,
            row_labels=[name(c) for c in classes],
            title="seeds: draws from each class's multivariate normal",
        ),
    ]


def save_inversion_figure(
    path: str | Path,
    targets: np.ndarray,
    sources: np.ndarray,
    inverted: np.ndarray | Mapping[str, np.ndarray],
    *,
    distance_after: Sequence[float] = (),
    title: str = "",
) -> Path:
    """Figs. 4, 8, 11, 18: per column a target image, the source the inversion started from, and the
    inversion; `inverted` a mapping name -> images gives one row per model (the paper's figures:
    original | source | robust | standard)."""
    cols = [f"d={d:.2f}" for d in distance_after]
    rows = dict(inverted) if isinstance(inverted, Mapping) else {"inversion": inverted}
    return save_grid(
        path,
        [targets, sources, *rows.values()],
        row_labels=["target", "source", *rows],
        col_labels=cols,
        title=title or "representation inversion",
    )


def save_featvis_figure(path: str | Path, result: dict[str, Any], test_images: np.ndarray, *, title: str = "") -> Path:
    """Figs. 5, 9: per feature group, its visualisations, then the test images that activate it most,
    then least. result: the output of `feature_visualisations`; test_images: uint8 (N, H, W, C)."""
    images = to_uint8(result["images"])
    rows, labels = [], []
    for g, z in enumerate(result["features"].tolist()):
        z = [i for i in z if i >= 0]
        name = "+".join(map(str, z))
        rows += [
            images[result["group"].numpy() == g],
            test_images[result["top"][g].numpy()],
            test_images[result["bottom"][g].numpy()],
        ]
        labels += [f"R_{name}: visual.", "most active", "least active"]
    return save_grid(path, rows, row_labels=labels, title=title or "direct feature visualisation")
