"""The data layer: the bundled sample is exact, splits are deterministic and balanced, bad input is clear."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robint_ray.data import holdout_indices, load_split, sample_path, stack, take
from robint_ray.errors import InputError


def test_bundled_sample_holds_exact_images(cifar_exact):
    with np.load(sample_path()) as s, np.load(cifar_exact) as f:
        position = {int(i): p for p, i in enumerate(f["idx_train"])}
        rows = [position[int(i)] for i in s["idx_train"]]
        np.testing.assert_array_equal(s["x_train"], f["x_train"][rows])
        np.testing.assert_array_equal(s["y_train"], f["y_train_all"][s["idx_train"]])
        np.testing.assert_array_equal(s["x_test"], f["x_test"][: len(s["x_test"])])
        np.testing.assert_array_equal(s["y_test"], f["y_test_all"][s["idx_test"]])
    assert sample_path().stat().st_size < 5e6


def test_sample_splits():
    train, fit, val, test = (load_split("sample", s) for s in ("train", "fit", "val", "test"))
    assert (len(train), len(fit), len(val), len(test)) == (1000, 900, 100, 500)
    assert np.bincount(val.labels).tolist() == [10] * 10  # class-balanced
    assert not set(fit.indices) & set(val.indices)
    assert set(fit.indices) | set(val.indices) == set(train.indices)
    x, y = stack(val)
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    np.testing.assert_array_equal(load_split("sample", "val").indices, val.indices)  # deterministic
    assert not np.array_equal(load_split("sample", "val", seed=1).indices, val.indices)


def test_holdout_is_balanced_and_seeded():
    labels = np.repeat(np.arange(5), [10, 20, 30, 1, 2])
    fit, val = holdout_indices(labels, val_fraction=0.1, seed=0)
    assert np.bincount(labels[val], minlength=5).tolist() == [1, 2, 3, 0, 1]
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(len(labels)))
    assert np.array_equal(val, holdout_indices(labels, val_fraction=0.1, seed=0)[1])


def test_augmentation_only_on_training_splits():
    aug = load_split("sample", "fit", augment=True)
    torch.manual_seed(0)
    a = torch.stack([aug[0][0] for _ in range(8)])
    assert (a != a[0]).any()  # random crops/flips differ
    assert load_split("sample", "test", augment=True).transform is None


def test_exact_cifar_file(cifar_exact):
    test = load_split(cifar_exact, "test")
    assert len(test) == 1017 and len(load_split(cifar_exact, "train")) == 5438
    assert test.classes[0] == "airplane"


def test_imagefolder_128(imagenette):
    val = load_split(imagenette, "val")
    test = load_split(imagenette, "test")
    assert len(test) == 500 and len(val) == 300 and len(val.classes) == 10
    x, y = val[0]
    assert x.shape == (3, 128, 128) and 0 <= x.min() and x.max() <= 1
    torch.testing.assert_close(val[0][0], x)  # the eval transform is deterministic
    fit = load_split(imagenette, "fit", augment=True)
    assert fit[0][0].shape == (3, 128, 128)


def make_folder(root, classes=("a", "b"), per_class=2, size=(150, 140)):
    from PIL import Image

    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", size, (i * 40, 10, 200)).save(root / split / c / f"{i}.png")
    return root


def test_folder_errors(tmp_path):
    root = make_folder(tmp_path / "ok")
    assert len(load_split(root, "test")) == 4
    (root / "train" / "empty").mkdir()
    with pytest.raises(InputError, match="empty class folder"):
        load_split(root, "train")
    bad = make_folder(tmp_path / "bad")
    (bad / "train" / "a" / "9.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"cannot decode image .*9\.png"):
        stack(load_split(bad, "train"))


def test_clear_errors(tmp_path):
    with pytest.raises(InputError, match="data path not found"):
        load_split(tmp_path / "nope.npz", "test")
    with pytest.raises(InputError, match="unknown split"):
        load_split("sample", "validation")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="unrecognised layout"):
        load_split(tmp_path / "folder", "test")
    x = np.zeros((4, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "labels.npz", x_train=x, y_train=np.array([0, 1, 2, 10]), x_test=x, y_test=np.zeros(4))
    with pytest.raises(InputError, match="labels outside 0..9"):
        load_split(tmp_path / "labels.npz", "train")
    np.savez(tmp_path / "partial.npz", x_train=x)
    with pytest.raises(InputError, match="lacks"):
        load_split(tmp_path / "partial.npz", "train")
    (tmp_path / "trunc.npz").write_bytes((tmp_path / "labels.npz").read_bytes()[:100])
    with pytest.raises(InputError, match="cannot read array file"):
        load_split(tmp_path / "trunc.npz", "train")


def test_take():
    assert len(take(load_split("sample", "test"), 7)) == 7
