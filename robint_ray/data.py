"""Datasets: CIFAR-10 (array file, official batches, or the bundled sample) and 128-px ImageFolders.

`load_split(path, split)` is the one entry point. `path` (a local path, or a storage URI such as
s3://bucket/data/cifar10.npz, downloaded once per node: `storage.local_input`) is one of
- `sample`: the real CIFAR-10 sample shipped inside the package (`assets/cifar10_sample.npz`: the
  first 100 train images of each class and the first 500 test images, exact pixels from
  `shared/data/cifar10`; described in README.md's Data section, made by
  `experiments/make_cifar10_sample.py`);
- a `.npz` array file with `x_train, y_train, x_test, y_test` (uint8 NHWC images, integer labels) and
  optionally `classes`, `idx_train`, `idx_test` (the layout of `shared/data/cifar10`);
- a folder holding the official CIFAR-10 python batches (`cifar-10-batches-py/`, read by torchvision;
  get them with `torchvision.datasets.CIFAR10(root, download=True)` where you have a network);
- an ImageFolder root with `train/<class>/*.jpg` and `val/<class>/...` (or `test/<class>/...`): the
  layout of Small ImageNet 150 and `shared/data/imagenette-128`; images are cropped to 128 x 128.

Splits: `train` (every training image), `test` (`val/` of an ImageFolder: ImageNet's validation set is
the paper's test set), and `fit` / `val`, a deterministic, class-balanced hold-out carved out of
`train` (`val_fraction` of each class, chosen by a seeded permutation) for model selection. Nothing in
this project selects on `test`.

An ImageFolder image that fails to decode stops the run with an error that names the file: skipping it
silently would change the dataset, and so the results, without anyone noticing.

Every item is (image, label): a float tensor (C, H, W) in [0, 1] and an int.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import InputError, check
from .storage import local_input

SPLITS = ("train", "test", "fit", "val")
# the image files of an ImageFolder class folder and of fid.py's folder sources: one list for both
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FOLDER_SIZE = 128  # the paper's Small ImageNet 150 resolution


def sample_path() -> Path:
    """The bundled CIFAR-10 sample (real images; see assets/README.md)."""
    return Path(__file__).resolve().parent / "assets" / "cifar10_sample.npz"


def holdout_indices(labels: np.ndarray, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, val) positions: per class, round(val_fraction * count) examples (at least one where the
    class has two or more) go to val, chosen by a permutation seeded with `seed`. Both sorted."""
    check(0 < val_fraction < 1, f"val_fraction must lie in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_val = int(round(val_fraction * len(members)))
        n_val = min(max(n_val, 1 if len(members) > 1 else 0), len(members) - 1)
        val.append(members[rng.permutation(len(members))[:n_val]])
    val = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    fit = np.setdiff1d(np.arange(len(labels)), val)
    return fit, val


class ArrayDataset(Dataset):
    """Images held in memory as uint8 (N, H, W, C)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        classes: Sequence[str],
        indices: np.ndarray,
        transform: Callable | None = None,
        source: str = "",
    ):
        self.images, self.labels, self.classes = images, labels.astype(np.int64), list(classes)
        self.indices, self.transform, self.source = indices, transform, source

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.images[i]).permute(2, 0, 1)  # (C, H, W) uint8
        if self.transform is not None:
            image = self.transform(image)
        return image.float() / 255, int(self.labels[i])

    def subset(self, positions: np.ndarray, transform: Callable | None = None) -> "ArrayDataset":
        """The items at `positions`, with `transform` (None: none)."""
        return ArrayDataset(
            self.images[positions],
            self.labels[positions],
            self.classes,
            self.indices[positions],
            transform,
            self.source,
        )

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as one float tensor (N, C, H, W) in [0, 1] and labels (N,), untransformed."""
        x = torch.from_numpy(self.images).permute(0, 3, 1, 2).contiguous().float() / 255
        return x, torch.from_numpy(self.labels)


class FolderDataset(Dataset):
    """An ImageFolder split read lazily from disk."""

    def __init__(self, samples: list[tuple[Path, int]], classes: Sequence[str], transform: Callable, source: str = ""):
        self.samples, self.classes, self.transform, self.source = samples, list(classes), transform, source
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.indices = np.arange(len(samples))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise InputError(f"cannot decode image {path}: {err}") from err
        return self.transform(image), label

    def subset(self, positions: np.ndarray, transform: Callable | None = None) -> "FolderDataset":
        """The items at `positions`, with `transform` (None: this dataset's)."""
        out = FolderDataset(
            [self.samples[p] for p in positions], self.classes, transform or self.transform, self.source
        )
        out.indices = self.indices[positions]
        return out


def cifar_train_transform() -> Callable:
    """Random crop 32 with 4 px padding and horizontal flip, on uint8 (C, H, W) tensors."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])


def folder_transform(train: bool) -> Callable:
    """The paper's training augmentation (random resized crop 128, horizontal flip, rotation 20
    degrees), or the deterministic eval transform (resize the short side to 128, centre crop)."""
    from torchvision.transforms import v2

    if train:
        ops = [v2.RandomResizedCrop(FOLDER_SIZE), v2.RandomHorizontalFlip(), v2.RandomRotation(20)]
    else:
        ops = [v2.Resize(FOLDER_SIZE), v2.CenterCrop(FOLDER_SIZE)]
    return v2.Compose([v2.ToImage(), *ops, v2.ToDtype(torch.float32, scale=True)])


@dataclass(frozen=True)
class Arrays:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    idx_train: np.ndarray
    idx_test: np.ndarray


def _check_arrays(arrays: Arrays, source: str) -> Arrays:
    for name in ("x_train", "x_test"):
        x = getattr(arrays, name)
        check(
            x.dtype == np.uint8 and x.ndim == 4 and x.shape[3] == 3,
            f"{source}: {name} must be uint8 images (N, H, W, 3), got {x.dtype} {x.shape}",
        )
    for x, y, name in ((arrays.x_train, arrays.y_train, "y_train"), (arrays.x_test, arrays.y_test, "y_test")):
        check(len(x) == len(y), f"{source}: {name} has {len(y)} labels for {len(x)} images")
        check(
            len(y) == 0 or (y.min() >= 0 and y.max() < len(arrays.classes)),
            f"{source}: {name} has labels outside 0..{len(arrays.classes) - 1}",
        )
    return arrays


def _read_npz(path: Path) -> Arrays:
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
            check(not missing, f"{path}: array file lacks {sorted(missing)}; expected x_train, y_train, x_test, y_test")
            get = lambda k, default: f[k] if k in f.files else default  # noqa: E731
            classes = tuple(str(c) for c in get("classes", CIFAR10_CLASSES))
            arrays = Arrays(
                f["x_train"],
                f["y_train"].astype(np.int64),
                f["x_test"],
                f["y_test"].astype(np.int64),
                classes,
                get("idx_train", np.arange(len(f["y_train"]))),
                get("idx_test", np.arange(len(f["y_test"]))),
            )
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"cannot read array file {path}: {err}") from err
    return _check_arrays(arrays, str(path))


def _read_cifar_batches(root: Path) -> Arrays:
    import torchvision

    sets = [torchvision.datasets.CIFAR10(str(root), train=t, download=False) for t in (True, False)]
    return _check_arrays(
        Arrays(
            sets[0].data,
            np.asarray(sets[0].targets),
            sets[1].data,
            np.asarray(sets[1].targets),
            tuple(sets[0].classes),
            np.arange(len(sets[0].data)),
            np.arange(len(sets[1].data)),
        ),
        str(root),
    )


def _folder_samples(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    check(classes, f"{root}: no class folders (expected {root}/<class>/<image files>)")
    samples = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        check(files, f"{root / name}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} files)")
        samples.extend((p, label) for p in files)
    return samples, classes


def load_split(
    path: str | Path, split: str, *, augment: bool = False, val_fraction: float = 0.1, seed: int = 0
) -> ArrayDataset | FolderDataset:
    """One split of a dataset (see the module docstring). augment applies the training augmentation
    (only to `train` and `fit`)."""
    check(split in SPLITS, f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    path = sample_path() if str(path) == "sample" else local_input(path)
    check(path.exists(), f"data path not found: {path}")
    augment = augment and split in ("train", "fit")

    if path.is_dir() and (path / "train").is_dir():
        test_dir = path / "test" if (path / "test").is_dir() else path / "val"
        root = test_dir if split == "test" else path / "train"
        check(root.is_dir(), f"{path}: no test/ or val/ folder for the test split")
        samples, classes = _folder_samples(root)
        if split == "test":
            train_classes = _folder_samples(path / "train")[1]
            check(classes == train_classes, f"{root}: class folders differ from {path / 'train'}")
        train_transform, eval_transform = folder_transform(True), folder_transform(False)
        data = FolderDataset(samples, classes, train_transform if augment else eval_transform, str(path))
    else:
        if path.is_file():
            check(path.suffix == ".npz", f"{path}: not a .npz array file, an ImageFolder root or a CIFAR-10 folder")
            arrays = _read_npz(path)
        elif (path / "cifar-10-batches-py").is_dir() or path.name == "cifar-10-batches-py":
            arrays = _read_cifar_batches(path.parent if path.name == "cifar-10-batches-py" else path)
        else:
            raise InputError(
                f"{path}: unrecognised layout; expected a .npz array file, a folder with "
                "cifar-10-batches-py/, or an ImageFolder root with train/<class>/ and val/<class>/"
            )
        test = split == "test"
        train_transform, eval_transform = cifar_train_transform(), None
        data = ArrayDataset(
            arrays.x_test if test else arrays.x_train,
            arrays.y_test if test else arrays.y_train,
            arrays.classes,
            arrays.idx_test if test else arrays.idx_train,
            train_transform if augment else None,
            str(path),
        )
    if split in ("fit", "val"):
        fit, val = holdout_indices(data.labels, val_fraction=val_fraction, seed=seed)
        if split == "fit":
            data = data.subset(fit, train_transform if augment else eval_transform)
        else:
            data = data.subset(val, eval_transform)
    return data


def take(dataset: ArrayDataset | FolderDataset, n: int | None) -> ArrayDataset | FolderDataset:
    """The first n items of a split (all when n is None)."""
    if n is None or n >= len(dataset):
        return dataset
    check(n >= 1, f"n must be >= 1, got {n}")
    return dataset.subset(np.arange(n), dataset.transform)


def spread_over_classes(labels: np.ndarray, n: int | None, *, seed: int) -> np.ndarray:
    """Positions of n items drawn seeded and spread over the classes: the classes in a seeded order,
    each class's items in a seeded order, then one item of each class in turn (a class that runs out
    is skipped). Any first k positions span min(k, classes) classes, and a draw of n is the first n of a
    larger draw with the same seed. n None or >= len(labels): every position, in that spread order.

    Why: folder datasets are sorted by class, so "the first n test images" are one or two classes; the
    authors explain images of a shuffled test batch."""
    labels = np.asarray(labels)
    check(n is None or n >= 1, f"n must be >= 1, got {n}")
    rng = np.random.default_rng([seed, 0x5EED])
    classes = rng.permutation(np.unique(labels))
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    rounds = max(len(m) for m in members)
    order = [m[r] for r in range(rounds) for m in members if r < len(m)]
    return np.asarray(order[:n], dtype=np.int64)  # order[:None] is all of it


def draw(dataset: ArrayDataset | FolderDataset, n: int | None, *, seed: int) -> ArrayDataset | FolderDataset:
    """n items of a split spread over its classes (`spread_over_classes`; all when n is None)."""
    if n is None or n >= len(dataset):
        return dataset
    return dataset.subset(spread_over_classes(dataset.labels, n, seed=seed), dataset.transform)


def class_counts(dataset: ArrayDataset | FolderDataset) -> dict[str, int]:
    """How many items of each class a split holds, by class name, in class order (absent classes left out)."""
    counts = np.bincount(dataset.labels, minlength=len(dataset.classes))
    return {dataset.classes[k]: int(c) for k, c in enumerate(counts) if c}


def stack(dataset: Dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item of a (small) dataset as (N, C, H, W) images and (N,) labels."""
    if isinstance(dataset, ArrayDataset) and dataset.transform is None:
        return dataset.tensors()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)
