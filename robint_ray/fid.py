"""FID and Inception feature distances: sufficient statistics, the Frechet distance, Ray fan-out.

The math (pure tensor functions, no Ray):
- `FeatureStats`: per shard (n, sum x, sum x x^T) in float64. Merging adds them: exact algebra, so any
  grouping of the images gives the same statistics up to float64 rounding (about 1e-16 relative).
  Mean and covariance (unbiased, as `np.cov` and pytorch-fid) come out at the end.
- `frechet_distance`: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with Tr (S1 S2)^(1/2) computed
  as the sum of square roots of the eigenvalues of a symmetric matrix similar to S1 S2 (L^T S2 L with
  S1 = L L^T, or S1^(1/2) S2 S1^(1/2) where both are singular): no complex parts, never negative, and
  several times faster than `scipy.linalg.sqrtm` (pytorch-fid's method) at 2048 dimensions.
- `inception_distance`: the paper's Inception-192 distance between original and inverted images
  (Tables 3, 6): per image, and the Frobenius norm over the batch.

Image sources (`open_source`): an array file of uint8 images as `robint generate` writes it (.npz with
`images` (N, H, W, C) and `labels`), a folder of PNG/JPEG files (searched recursively, sorted by path),
or a split of a dataset (`load_split(path, split)`: the CIFAR .npz, an ImageFolder root, ...).

Ray at the edge (`source_stats`): each source is cut into shards of consecutive images; every shard
(a Ray task, or a call in this process: robint_ray.distributed.fan_out_iter) reads its own images,
runs the Inception and returns only its statistics (8 d^2 bytes, 32 MiB at d = 2048); the driver adds
them up as they arrive, so it holds one sum per source whatever the number of images.
"""

from __future__ import annotations

import logging
import math
import warnings
import zipfile
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .data import IMAGE_EXTENSIONS, load_split, sample_path
from .distributed import IN_PROCESS, Tasks, fan_out_iter, report_progress
from .errors import InputError, check
from .inception import PREPROCESSING, RESIZE, FIDInception, inception_features
from .shards import Shard, consecutive_shards
from .storage import Location, is_uri, local_input

log = logging.getLogger(__name__)

__all__ = [
    "FeatureStats",
    "merge_tree",
    "frechet_distance",
    "fid_from_stats",
    "inception_distance",
    "ImageSource",
    "open_source",
    "read_images",
    "source_stats",
    "fid",
    "RESIZE",
    "PREPROCESSING",
]


# ------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class FeatureStats:
    """Sufficient statistics of n feature vectors: n, sum x (d,), sum x x^T (d, d); float64."""

    n: int
    total: torch.Tensor  # (d,)
    outer: torch.Tensor  # (d, d)

    @classmethod
    def of(cls, features: torch.Tensor) -> "FeatureStats":
        """Statistics of (n, d) features, summed on their device (a GPU does the n d^2 products far
        faster than the CPU), returned on the CPU."""
        x = features.detach().to(torch.float64)
        return cls(len(x), x.sum(0).cpu(), (x.T @ x).cpu())

    @classmethod
    def empty(cls, dims: int) -> "FeatureStats":
        return cls(0, torch.zeros(dims, dtype=torch.float64), torch.zeros(dims, dims, dtype=torch.float64))

    @property
    def dims(self) -> int:
        return self.total.shape[0]

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        check(self.dims == other.dims, f"cannot merge {self.dims}-d statistics with {other.dims}-d ones")
        return FeatureStats(self.n + other.n, self.total + other.total, self.outer + other.outer)

    def mean(self) -> torch.Tensor:
        check(self.n >= 1, "no images: the mean is undefined")
        return self.total / self.n

    def cov(self) -> torch.Tensor:
        """Unbiased covariance (d, d), as np.cov(features, rowvar=False)."""
        check(self.n >= 2, f"{self.n} image(s): a covariance needs at least 2")
        mu = self.mean()
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return (cov + cov.T) / 2


def merge_tree(stats: Sequence[FeatureStats]) -> FeatureStats:
    """All statistics merged pairwise, level by level (neighbours first): log2(len) deep."""
    check(len(stats) > 0, "nothing to merge")
    level = list(stats)
    while len(level) > 1:
        level = [level[i].merge(level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
    return level[0]


# ------------------------------------------------------------------------------------ Frechet distance


def _psd_eigvals_floor(eigvals: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix, those indistinguishable from 0 (below d * eps * the largest) set
    to 0: rounding leaves them at +-1e-16 of the largest, and the square root would magnify that."""
    floor = eigvals.shape[0] * torch.finfo(torch.float64).eps * float(eigvals.abs().max())
    return torch.where(eigvals > floor, eigvals, torch.zeros_like(eigvals))


def trace_sqrt_product(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Tr (S1 S2)^(1/2) for symmetric PSD S1, S2 (d, d), float64: the sum of the square roots of the
    eigenvalues of S1 S2, read off a symmetric matrix with the same eigenvalues. Where one of them is
    positive definite, A = L L^T (Cholesky) and the matrix is L^T B L (one factorisation, two products,
    one eigvalsh); where both are singular (fewer images than dimensions in both sets), R B R with
    R = A^(1/2) from a symmetric eigendecomposition."""
    for a, b in ((s1, s2), (s2, s1)):  # S1 S2 and S2 S1 have the same eigenvalues
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            middle = chol.T @ b @ chol
            break
    else:
        evals, evecs = torch.linalg.eigh(s1)
        root = (evecs * _psd_eigvals_floor(evals).sqrt()) @ evecs.T  # S1^(1/2)
        middle = root @ s2 @ root
    return _psd_eigvals_floor(_eigvalsh((middle + middle.T) / 2)).sqrt().sum()


def _eigvalsh(m: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric CPU float64 matrix by LAPACK through scipy: as fast as torch's
    when warm, and about a second faster on a process's first call at 2048 dimensions (MKL's
    first symmetric eigensolve in a process costs about that)."""
    if m.device.type != "cpu":
        return torch.linalg.eigvalsh(m)
    import scipy.linalg

    return torch.from_numpy(scipy.linalg.eigh(m.numpy(), eigvals_only=True, check_finite=False))


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) for means (d,) and covariances (d, d), in float64.

    Tr (S1 S2)^(1/2) by `trace_sqrt_product`: symmetric eigenvalue problems only, so no complex parts,
    and rank-deficient covariances (n <= d) are fine. The result is clamped at 0 (it is a squared
    distance; rounding alone could make it -1e-13)."""
    mu1, mu2, s1, s2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    check(
        mu1.shape == mu2.shape and mu1.ndim == 1,
        f"means must be (d,) alike, got {tuple(mu1.shape)}, {tuple(mu2.shape)}",
    )
    d = mu1.shape[0]
    check(s1.shape == (d, d) and s2.shape == (d, d), f"covariances must be ({d}, {d})")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    diff = mu1 - mu2
    value = diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * trace_sqrt_product(s1, s2)
    return max(float(value), 0.0)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """The FID between two sets of features given by their statistics. Warns (and still computes)
    where a set has fewer images than dimensions: its covariance is then rank-deficient and the
    figure biased upwards, not comparable with figures from more images."""
    check(a.dims == b.dims, f"statistics of {a.dims} and {b.dims} dimensions")
    for name, s in (("first", a), ("second", b)):
        check(s.n >= 2, f"the {name} set has {s.n} image(s); FID needs at least 2 per set")
        if s.n < s.dims:
            warnings.warn(
                f"the {name} set has {s.n} images for {s.dims} dimensions: its covariance is "
                "rank-deficient and the FID biased; use more images than dimensions",
                stacklevel=2,
            )
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())


# ------------------------------------------------------------------------------ Inception-192 distance


def inception_distance(
    model: FIDInception,
    originals: torch.Tensor,
    inverted: torch.Tensor,
    *,
    dims: int = 192,
    batch_size: int = 32,
    preprocessing: str = "robint",
) -> tuple[torch.Tensor, float]:
    """The paper's feature distance between originals and their inversions (Tables 3 and 6).

    originals, inverted: (N, 3, H, W), uint8 or float in [0, 1], image i of one paired with image i of
    the other. Returns (per-image L2 distances (N,), the batch figure): the Frobenius norm of the
    (N, dims) difference of features, as the authors' code computes it over a batch (not a mean).
    preprocessing: "robint" or "author" (`inception.preprocess`)."""
    check(
        originals.shape == inverted.shape, f"{tuple(originals.shape)} originals vs {tuple(inverted.shape)} inversions"
    )
    options = dict(dims=dims, batch_size=batch_size, preprocessing=preprocessing)
    diff = (
        inception_features(model, originals, **options).double()
        - inception_features(model, inverted, **options).double()
    )  # (N, dims)
    return diff.norm(dim=1), float(diff.norm())


# ------------------------------------------------------------------------------------------ image sources


@dataclass(frozen=True)
class ImageSource:
    """Where images come from: kind "array" (a .npz with `images`), "folder" (image files, `files`)
    or "split" (a dataset split, `load_split(path, split)`; with `indices`, only the items at those
    positions, in that order), and how many there are."""

    kind: str
    path: str
    count: int
    split: str | None = None
    files: tuple[str, ...] = ()
    indices: tuple[int, ...] = ()

    def describe(self) -> str:
        return f"{self.path} --split {self.split}" if self.split else self.path

    def select(self, indices) -> "ImageSource":
        """The items of this split at `indices` (positions in the split)."""
        check(self.kind == "split" and not self.indices, "select() takes the items of a whole dataset split")
        indices = tuple(int(i) for i in indices)
        check(all(0 <= i < self.count for i in indices), f"indices outside 0..{self.count} of {self.describe()}")
        return replace(self, indices=indices, count=len(indices))


def open_source(path: str | Path, split: str | None = None) -> ImageSource:
    """An ImageSource for `path` (see the module docstring), a local path or a storage URI (its
    `path` stays the URI: each task's node reads its own copy, `storage.local_input`); `split` names a
    dataset split."""
    if split is not None:  # a dataset (load_split checks the path); `sample`: the bundled one
        path = sample_path() if str(path) == "sample" else path
        return ImageSource("split", _origin(path), len(load_split(path, split)), split=split)
    origin, path = _origin(path), local_input(path)
    check(path.exists(), f"image source not found: {path}")
    if path.is_dir():
        check(
            not (path / "train").is_dir(),
            f"{path} is a dataset (it has train/); add --split train or --split test after it",
        )
        files = tuple(str(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        check(files, f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it or below it")
        return ImageSource("folder", origin, len(files), files=files)
    check(path.suffix == ".npz", f"{path}: not a .npz array file or a folder of images")
    images = _array_images(str(path), path.stat().st_mtime_ns)
    return ImageSource("array", origin, len(images))


def _origin(path: str | Path) -> str:
    """How an ImageSource names its path: a storage URI as such, a local path as given."""
    return Location(path).uri if is_uri(str(path)) else str(path)


def _stored_member(path: str, member: str) -> np.ndarray | None:
    """A read-only memory map of an uncompressed (stored) .npy member of a zip (.npz), as `write_npz`
    and np.savez write them; None where it is compressed. A task reading images i..j of a large file
    then reads those pages only, not the whole file."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header: its name and extra field lengths at bytes 26..29
        f.seek(
            info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        )
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return None
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran or dtype.hasobject:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


@lru_cache(maxsize=2)  # a Ray worker reading several shards of one file opens it once (a memory map)
def _array_images(path: str, mtime_ns: int) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f.files:
                hint = (
                    " (a dataset array file: add --split train or --split test after it)"
                    if "x_train" in f.files
                    else ""
                )
                raise InputError(f"{path}: no `images` array{hint}; found {', '.join(f.files)}")
            images = _stored_member(path, "images.npy")
            if images is None:  # compressed: read whole
                images = f["images"]
    except (OSError, ValueError, EOFError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"cannot read array file {path}: {err}") from err
    check(
        images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] in (1, 3),
        f"{path}: `images` must be uint8 (N, H, W, 3 or 1), got {images.dtype} {images.shape}",
    )
    return images


@lru_cache(maxsize=2)
def _split_dataset(path: str, split: str, mtime_ns: int):
    return load_split(path, split)


def read_images(source: ImageSource, start: int, stop: int) -> torch.Tensor | list[torch.Tensor]:
    """Images start..stop-1 of a source: a uint8 (n, C, H, W) batch, or for folders and ImageFolder
    splits a list of (C, H, W) images (their sizes may differ; uint8, or float in [0, 1])."""
    check(0 <= start <= stop <= source.count, f"images {start}..{stop} outside 0..{source.count} of {source.path}")
    local = local_input(source.path)  # (a source in storage: this node's copy, its folder's files included)
    mtime = local.stat().st_mtime_ns
    if source.kind == "array":
        return torch.from_numpy(np.ascontiguousarray(_array_images(str(local), mtime)[start:stop])).permute(0, 3, 1, 2)
    if source.kind == "folder":
        from PIL import Image, UnidentifiedImageError

        out = []
        for name in source.files[start:stop]:
            try:
                with Image.open(name) as img:
                    array = np.asarray(img.convert("RGB"), dtype=np.uint8)
            except (OSError, UnidentifiedImageError) as err:
                raise InputError(f"cannot decode image {name}: {err}") from err
            out.append(torch.from_numpy(array.copy()).permute(2, 0, 1))
        return out
    dataset = _split_dataset(str(local), source.split, mtime)
    positions = list(source.indices[start:stop]) if source.indices else range(start, stop)
    if hasattr(dataset, "images") and dataset.transform is None:  # an ArrayDataset: uint8 as stored
        picked = dataset.images[positions] if source.indices else dataset.images[start:stop]
        return torch.from_numpy(np.ascontiguousarray(picked)).permute(0, 3, 1, 2)
    return [dataset[i][0] for i in positions]  # the split's eval transform, float in [0, 1]


# ----------------------------------------------------------------------------------------- Ray fan-out


def shard_stats(
    piece: tuple[ImageSource, Shard], *, model: FIDInception, dims: int, batch_size: int, preprocessing: str = "robint"
) -> FeatureStats:
    """Statistics of one piece's images (a shard of an image source), on the model's device (in a Ray
    task: the task's device)."""
    source, shard = piece
    images = read_images(source, shard.start, shard.stop)
    parts = []
    for i in range(0, len(images), batch_size):  # batch by batch, so that the driver's progress bar moves
        parts.append(
            inception_features(
                model, images[i : i + batch_size], dims=dims, batch_size=batch_size, preprocessing=preprocessing
            )
        )
        report_progress(len(parts[-1]))
    features = torch.cat(parts)  # (n, dims); each image's features do not depend on its batch
    return FeatureStats.of(features.to(next(model.parameters()).device))  # the n d^2 sums there too


def make_shards(sources: Sequence[ImageSource], *, shard_size: int) -> list[tuple[int, ImageSource, Shard]]:
    """(position of the source, an image source, the shard of it to read): consecutive pieces of
    shard_size images of each source. A folder's piece carries only its own file names and a selection
    of a split only its own indices (read from 0), so a million names are not shipped to every task."""
    pieces = []
    for i, s in enumerate(sources):
        for shard in consecutive_shards(s.count, shard_size):
            part, size = slice(shard.start, shard.stop), shard.size
            if s.kind == "folder":
                pieces.append((i, replace(s, files=s.files[part], count=size), Shard(shard.index, 0, size)))
            elif s.indices:
                pieces.append((i, replace(s, indices=s.indices[part], count=size), Shard(shard.index, 0, size)))
            else:
                pieces.append((i, s, shard))
    return pieces


MAX_SHARD = 2048  # images per FID task at most: a lost task costs little, and progress moves


def default_shard_size(sources: Sequence[ImageSource], workers: int, batch_size: int) -> int:
    """A few shards per task in flight (so that the tasks finish together), each a whole number of
    batches, and at most about MAX_SHARD images, whatever the number of images (the driver adds the
    statistics up as they come, so more shards cost no driver memory). workers: `Tasks.workers`."""
    total = sum(s.count for s in sources)
    shards = 3 * max(workers, 1) * len(sources)
    cap = max(batch_size, MAX_SHARD // batch_size * batch_size)
    return min(cap, max(batch_size, math.ceil(total / shards / batch_size) * batch_size))


def source_stats(
    sources: Sequence[ImageSource],
    model: FIDInception,
    *,
    dims: int = 2048,
    tasks: Tasks = IN_PROCESS,
    batch_size: int = 32,
    shard_size: int | None = None,
    progress: bool = True,
    preprocessing: str = "robint",
) -> list[FeatureStats]:
    """The statistics of each source, from shards of its images run in this process or as Ray tasks
    (`tasks`: `distributed.Tasks`; on Ray each task on its own device), their statistics added up in
    the driver as they finish (one (d, d) sum per source held, whatever the number of images).
    preprocessing: "robint" or "author" (`inception.preprocess`)."""
    check(all(s.count > 0 for s in sources), "an image source is empty")
    check(
        preprocessing in PREPROCESSING,
        f"preprocessing must be one of {', '.join(PREPROCESSING)}, got {preprocessing!r}",
    )
    pieces = make_shards(sources, shard_size=shard_size or default_shard_size(sources, tasks.workers, batch_size))
    totals: list[FeatureStats | None] = [None] * len(sources)
    work = [(source, shard) for _, source, shard in pieces]
    for i, stats in fan_out_iter(
        shard_stats,
        work,
        tasks=tasks,
        shared={"model": model, "dims": dims, "batch_size": batch_size, "preprocessing": preprocessing},
        sizes=[shard.size for _, shard in work],
        desc=f"Inception-{dims} features",
        progress=progress,
    ):
        owner = pieces[i][0]  # the statistics of piece i, to its source's
        totals[owner] = stats if totals[owner] is None else totals[owner].merge(stats)
    return totals


def fid(
    source_a: ImageSource,
    source_b: ImageSource,
    model: FIDInception,
    *,
    dims: int = 2048,
    preprocessing: str = "robint",
    **options: Any,
) -> dict:
    """The FID between two image sources, with what is needed to read the figure: n_a, n_b, dims,
    the preprocessing (its name, and in `resize` what it does), the weights' source and hash.
    options: source_stats' (tasks, batch_size, shard_size, progress)."""
    stats_a, stats_b = source_stats([source_a, source_b], model, dims=dims, preprocessing=preprocessing, **options)
    return {
        "fid": fid_from_stats(stats_a, stats_b),
        "n_a": stats_a.n,
        "n_b": stats_b.n,
        "dims": dims,
        "preprocessing": preprocessing,
        "resize": PREPROCESSING[preprocessing],
        "weights_hash": model.weights_info.get("sha256", ""),
        "weights_source": model.weights_info.get("source", ""),
        "source_a": source_a.describe(),
        "source_b": source_b.describe(),
    }
