"""The three global methods (eq. 13-16) and the class seeds (section 2.4), in process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robint_ray import visualize as V
from robint_ray.data import load_split
from robint_ray.generate import fit_seeds, to_uint8, write_npz


def _l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1)


def _covariance(seeds: V.ClassSeeds, c: int) -> torch.Tensor:
    """Class c's covariance as the seeds hold it, scale scale^T + noise_sd^2 I: (d, d) float64."""
    scale = seeds.scale[c].double()
    return scale @ scale.T + float(seeds.noise_sd[c]) ** 2 * torch.eye(scale.shape[0], dtype=torch.float64)


def test_objectives_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    rep, target = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    expected = torch.stack([torch.linalg.norm(rep[i] - target[i]) / torch.linalg.norm(target[i]) for i in range(5)])
    torch.testing.assert_close(V.normalised_distance(rep, target), expected)
    logits, classes = torch.randn(5, 10, generator=g), torch.tensor([3, 0, 9, 3, 1])
    torch.testing.assert_close(V.class_logit(logits, classes), logits[torch.arange(5), classes])
    z = torch.tensor([[1, 4]] * 5)
    torch.testing.assert_close(V.mean_activation(rep, z), (rep[:, 1] + rep[:, 4]) / 2)


def test_extreme_activations_match_topk():
    acts = torch.randn(100, generator=torch.Generator().manual_seed(1))
    top, bottom = V.extreme_activations(acts, 5)
    torch.testing.assert_close(top, torch.topk(acts, 5).indices)
    torch.testing.assert_close(bottom, torch.topk(-acts, 5).indices)


def test_class_seed_fit_matches_numpy_and_samples(sample_test):
    x, y = sample_test
    seeds = V.fit_class_seeds(V.pool_images(x, 4), y, num_classes=10, pool=4, image_shape=(3, 32, 32))
    # The sample's 500 test images hold about 50 a class, fewer than 192 dimensions: the low-rank form.
    assert seeds.mean.shape == (10, 192) and seeds.scale.shape[:2] == (10, 192)  # 8 x 8 x 3
    pooled = V.pool_images(x, 4).flatten(1).double().numpy()
    for c in (0, 7):
        members = pooled[y.numpy() == c]
        cov = np.cov(members, rowvar=False, bias=True) + 1e-4 * np.eye(192)  # eq. 20 (1/n) + the ridge
        np.testing.assert_allclose(_covariance(seeds, c).numpy(), cov, atol=1e-6)
        np.testing.assert_allclose(seeds.mean[c].numpy(), members.mean(0), atol=1e-6)
    classes = torch.tensor([0, 0, 7, 3])
    a = V.sample_class_seeds(seeds, classes, generator=torch.Generator().manual_seed(5))
    b = V.sample_class_seeds(seeds, classes, generator=torch.Generator().manual_seed(5))
    assert a.shape == (4, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    # Each 4 x 4 block is one value of the 8 x 8 draw.
    torch.testing.assert_close(a, V.pool_images(a, 4).repeat_interleave(4, 2).repeat_interleave(4, 3))


def test_class_seeds_never_fail_on_degenerate_classes():
    # One image per class (zero covariance) and a constant class: the ridge keeps sampling possible.
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x[2] = 0.5
    seeds = V.fit_class_seeds(
        V.pool_images(x, 4), torch.tensor([0, 1, 2]), num_classes=3, pool=4, image_shape=(3, 32, 32)
    )
    draws = V.sample_class_seeds(seeds, torch.tensor([0, 1, 2] * 20), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(draws).all()
    assert (V.pool_images(draws[2::3], 4) - 0.5).abs().max() < 0.1  # sd 0.01 around the constant


def test_class_seed_draws_have_the_fitted_covariance_in_both_forms():
    """Full (Cholesky, n >= d) and low-rank (n < d) forms: the empirical covariance of many draws
    matches cov + ridge I, and a broken low-rank form (the ridge left out) is caught."""
    g = torch.Generator().manual_seed(3)
    for n in (40, 6):  # d = 3 x 2 x 2 = 12 dimensions
        pooled = 0.3 + 0.2 * torch.rand(n, 3, 2, 2, generator=g)
        seeds = V.fit_class_seeds(
            pooled, torch.zeros(n, dtype=torch.long), num_classes=1, pool=4, image_shape=(3, 8, 8), ridge=1e-3
        )
        assert (seeds.scale.shape[2] == 12) == (n >= 12) and (float(seeds.noise_sd[0]) > 0) == (n < 12)
        flat = pooled.flatten(1).double()
        expected = torch.cov(flat.T, correction=0) + 1e-3 * torch.eye(12, dtype=torch.float64)
        torch.testing.assert_close(_covariance(seeds, 0), expected, atol=1e-6, rtol=0)
        draws = V.pool_images(
            V.sample_class_seeds(
                seeds, torch.zeros(40_000, dtype=torch.long), generator=torch.Generator().manual_seed(0)
            ),
            4,
        ).flatten(1)
        empirical = torch.cov(draws.double().T)
        torch.testing.assert_close(empirical, expected, atol=4e-4, rtol=0)
        if n < 12:  # without the ridge term the smallest variances are ~0, not 1e-3
            assert torch.linalg.eigvalsh(empirical).min() > 5e-4


def test_seed_pool_is_the_authors_grain_at_both_sizes():
    """The authors pool by 4 at 32 and at 128 px: 8 x 8 x 3 and 32 x 32 x 3 dimensions."""
    assert V.seed_pool(32) == 4 and V.seed_pool(128) == 4
    x = torch.rand(6, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    seeds = V.fit_class_seeds(
        V.pool_images(x, V.seed_pool(128)),
        torch.tensor([0, 0, 0, 1, 1, 1]),
        num_classes=2,
        pool=V.seed_pool(128),
        image_shape=(3, 128, 128),
    )
    assert seeds.mean.shape == (2, 3 * 32 * 32) and seeds.scale.shape == (2, 3072, 3)  # 3 images a class
    draw = V.sample_class_seeds(seeds, torch.tensor([1]), generator=torch.Generator().manual_seed(0))
    assert draw.shape == (1, 3, 128, 128)
    torch.testing.assert_close(draw, V.pool_images(draw, 4).repeat_interleave(4, 2).repeat_interleave(4, 3))


def test_fit_seeds_streams_a_dataset():
    seeds = fit_seeds(load_split("sample", "test"), num_classes=10, batch_size=64)
    assert seeds.pool == 4 and seeds.image_shape == (3, 32, 32) and seeds.num_classes == 10


def test_class_generation_reaches_its_class(resnet20, sample_test):
    """Paper settings (L2 eps 30, step 0.5, 60 steps), one seed per class from the class normals."""
    x, y = sample_test
    seeds = V.fit_class_seeds(V.pool_images(x, 4), y, num_classes=10, pool=4, image_shape=(3, 32, 32))
    classes = torch.arange(10)
    start = V.sample_class_seeds(seeds, classes, generator=torch.Generator().manual_seed(0))
    out = V.generate_classes(resnet20, start, classes, settings=V.GENERATION[32])
    before = V.class_logit(V.logits(resnet20, start), classes)
    after_logits = V.logits(resnet20, out)
    after = V.class_logit(after_logits, classes)
    assert after.mean() > before.mean() and (after > before).float().mean() >= 0.9
    assert (after_logits.argmax(1) == classes).float().mean() >= 0.9
    assert out.min() >= 0 and out.max() <= 1
    assert (_l2(out, start) <= 30 + 1e-3).all()
    assert not resnet20.training


@pytest.mark.slow  # about 150 CPU seconds
def test_inversion_lowers_the_distance_by_90_percent(resnet20, sample_test):
    """From noise and from an image of another class toward two test images (500 of the paper's
    10,000 steps: enough for a 90 % cut on the standard ResNet-20)."""
    x, y = sample_test
    targets = x[:2]
    other = torch.stack([x[int(torch.nonzero(y != y[i])[0])] for i in range(2)])
    noise = torch.rand(targets.shape, generator=torch.Generator().manual_seed(0))
    sources = torch.cat([noise[:1], other[1:]])
    settings = V.PGDSettings(eps=1000.0, step_size=1.0, steps=500)
    out = V.invert(resnet20, sources, targets, settings=settings)
    rep_target = V.representation(resnet20, targets)
    before = V.normalised_distance(V.representation(resnet20, sources), rep_target)
    after = V.normalised_distance(V.representation(resnet20, out), rep_target)
    assert (after <= 0.1 * before).all(), (before, after)
    assert out.min() >= 0 and out.max() <= 1 and (_l2(out, sources) <= 1000).all()


def test_inversion_improves_and_stays_in_its_ball(resnet20, sample_test):
    x, _ = sample_test
    settings = V.PGDSettings(eps=3.0, step_size=0.5, steps=10)
    out = V.invert(resnet20, x[10:12], x[:2], settings=settings)
    assert (_l2(out, x[10:12]) <= 3.0 + 1e-5).all() and out.min() >= 0 and out.max() <= 1
    rep_target = V.representation(resnet20, x[:2])
    before = V.normalised_distance(V.representation(resnet20, x[10:12]), rep_target)
    after = V.normalised_distance(V.representation(resnet20, out), rep_target)
    assert (after < before).all(), (before, after)


def test_feature_visualisation_raises_its_coordinates(resnet20, sample_test):
    x, _ = sample_test
    noise = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    settings = V.PGDSettings(eps=1000.0, step_size=1.0, steps=20)
    for features, start in (([13], noise), ([3, 7], x[:2])):
        out = V.visualize_features(resnet20, start, features, settings=settings)
        before = V.feature_activations(resnet20, start, features)
        after = V.feature_activations(resnet20, out, features)
        assert (after > before).all(), (features, before, after)
        assert out.min() >= 0 and out.max() <= 1
    small = V.visualize_features(resnet20, noise, [13], settings=V.PGDSettings(eps=2.0, step_size=0.5, steps=6))
    assert (_l2(small, noise) <= 2.0 + 1e-4).all()


def test_bad_inputs_are_errors(resnet20):
    from robint_ray.errors import InputError

    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(InputError):
        V.visualize_features(resnet20, x, [64], settings=V.PGDSettings(eps=1.0, step_size=0.1, steps=1))
    with pytest.raises(InputError):
        V.invert(resnet20, x, x[:1], settings=V.PGDSettings(eps=1.0, step_size=0.1, steps=1))
    with pytest.raises(InputError):
        V.PGDSettings(eps=1.0, step_size=0.1, steps=0)


def test_npz_files_are_byte_identical_and_round_trip(tmp_path):
    images = to_uint8(torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    labels = np.arange(4, dtype=np.int64)
    a = write_npz(tmp_path / "a.npz", images=images, labels=labels)
    b = write_npz(tmp_path / "b.npz", images=images, labels=labels)
    assert a.read_bytes() == b.read_bytes()
    with np.load(a, allow_pickle=False) as f:
        assert np.array_equal(f["images"], images) and np.array_equal(f["labels"], labels)
    levels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # each uint8 level as a float
    torch.testing.assert_close(to_uint8(levels), images, rtol=0, atol=0)  # comes back as itself
