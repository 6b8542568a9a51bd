"""Attribution math: IG axioms and captum, expected gradients against shap, metrics' invariants."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from robint_ray import attributions as attr
from robint_ray.errors import InputError
from robint_ray.models import build_model


@pytest.fixture(scope="module")
def images(sample_test):
    x, y = sample_test
    return x[:4], y[:4]


def on(device, model, *tensors):
    """A copy of the (module-scoped) model and the tensors on `device`."""
    return (copy.deepcopy(model).to(device), *(t.to(device) for t in tensors))


def linear_model(shape=(3, 6, 5), classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), classes)).eval()


# --- Integrated Gradients -------------------------------------------------------------------------


def test_trapezoid_weights_sum_to_one():
    for m in (1, 2, 7, 50):
        alphas, weights = attr.trapezoid(m, dtype=torch.float64)
        assert len(alphas) == m + 1 and alphas[0] == 0 and alphas[-1] == 1
        torch.testing.assert_close(alphas.diff(), torch.full((m,), 1 / m, dtype=torch.float64))
        assert abs(weights.sum().item() - 1) < 1e-12


@pytest.mark.parametrize("steps", [1, 2, 7, 50])
@pytest.mark.parametrize("kind,k", [("black", 1), ("uniform", 3)])
def test_ig_on_a_linear_model_is_delta_times_weight(steps, kind, k):
    model = linear_model()
    torch.manual_seed(1)
    x, target = torch.rand(5, 3, 6, 5), torch.tensor([0, 1, 2, 3, 1])
    baselines = attr.make_baselines(x, kind=kind, k=k, seed=3)
    result = attr.integrated_gradients(model, x, target, baselines, steps=steps, output="logit", batch_size=17)
    w = model[1].weight.detach()[target].view(x.shape)
    expected = ((x[:, None] - baselines) * w[:, None]).mean(1)
    torch.testing.assert_close(result.attributions, expected, rtol=1e-5, atol=1e-5)
    assert result.gap.abs().max() < 1e-4  # completeness is exact for a linear F


def test_ig_completeness_gap_is_what_it_says(tiny, images, device):
    tiny, x, y = on(device, tiny, *images)
    baselines = attr.make_baselines(x, kind="uniform", k=2, seed=0)
    result = attr.integrated_gradients(tiny, x, y, baselines, steps=20, output="probability", batch_size=32)
    with torch.no_grad():
        f_x = tiny(x).softmax(1).gather(1, y[:, None]).squeeze(1)
        f_b = torch.stack([tiny(baselines[:, j]).softmax(1).gather(1, y[:, None]).squeeze(1) for j in range(2)]).mean(0)
    torch.testing.assert_close(result.output, f_x)
    torch.testing.assert_close(result.baseline_output, f_b)
    torch.testing.assert_close(result.gap, result.attributions.flatten(1).sum(1) - (f_x - f_b), atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def trained_tiny():
    """A tiny ResNet trained for a few seconds on the bundled sample's 1,000 real training images: a
    real classifier (above chance on the sample's test images) without ../shared."""
    from robint_ray.data import load_split, stack

    x, y = stack(load_split("sample", "train"))
    torch.manual_seed(0)
    model = build_model("cifar_resnet8")
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(4):
        for batch in torch.randperm(len(x), generator=torch.Generator().manual_seed(_)).split(100):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    return model.eval()


def test_ig_completeness_on_a_trained_model_from_the_bundled_sample(trained_tiny, sample_test):
    """Completeness as an axiom, not a definition: sum(attributions) must equal F(x) - F(x') computed
    by the model directly, on a trained network (logit, black baseline), and the error must fall with
    the number of steps. A wrong path, a missing (x - x') factor or wrong weights breaks it."""
    x, y = sample_test[0][:6], sample_test[1][:6]
    with torch.no_grad():
        assert (
            trained_tiny(sample_test[0]).argmax(1) == sample_test[1]
        ).float().mean() > 0.15  # learnt something (chance: 0.1)
        logit_x, logit_0 = (trained_tiny(z).gather(1, y[:, None]).squeeze(1) for z in (x, torch.zeros_like(x)))
    baselines = attr.make_baselines(x, kind="black", k=1)
    errors = {}
    for m in (10, 200):
        result = attr.integrated_gradients(trained_tiny, x, y, baselines, steps=m, output="logit", batch_size=256)
        total = result.attributions.flatten(1).sum(1).double()
        errors[m] = ((total - (logit_x - logit_0).double()).abs() / (logit_x - logit_0).double().abs()).mean().item()
    assert errors[200] <= 0.02, errors
    assert errors[200] < errors[10], errors


def test_ig_does_not_depend_on_the_batch_size(tiny, images, device):
    tiny, x, y = on(device, tiny, *images)
    baselines = attr.make_baselines(x, kind="uniform", k=2, seed=0)
    runs = [attr.integrated_gradients(tiny, x, y, baselines, steps=9, batch_size=b).attributions for b in (7, 20, 1000)]
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], rtol=1e-5, atol=1e-7)


def test_random_baselines_are_seeded_per_image():
    x = torch.rand(4, 3, 8, 8)
    full = attr.make_baselines(x, kind="uniform", k=3, seed=5, indices=[10, 11, 12, 13])
    part = attr.make_baselines(x[2:], kind="uniform", k=3, seed=5, indices=[12, 13])
    assert torch.equal(full[2:], part)
    assert not torch.equal(full[0], full[1])
    assert full.min() >= 0 and full.max() <= 1
    assert not torch.equal(full, attr.make_baselines(x, kind="uniform", k=3, seed=6, indices=[10, 11, 12, 13]))


@pytest.mark.parametrize("output", ["probability", "logit"])
@pytest.mark.parametrize("kind", ["black", "uniform"])
def test_ig_equals_captum_trapezoid_after_rescaling(tiny, images, output, kind, device):
    from captum.attr import IntegratedGradients

    tiny, x, y = on(device, tiny, *images)
    steps = 20
    baselines = attr.make_baselines(x, kind=kind, k=1, seed=0)
    ours = attr.integrated_gradients(tiny, x, y, baselines, steps=steps, output=output, batch_size=64).attributions
    forward = (lambda z: tiny(z).softmax(1)) if output == "probability" else tiny
    theirs = IntegratedGradients(forward).attribute(
        x, baselines=baselines[:, 0], target=y, n_steps=steps + 1, method="riemann_trapezoid", internal_batch_size=64
    )
    # captum's trapezoid weights sum to n/(n+1) on the same points: ours = captum * (m + 1) / m
    rescaled = theirs * (steps + 1) / steps
    torch.testing.assert_close(ours, rescaled, rtol=1e-4, atol=1e-4 * rescaled.abs().max().item())


def test_ig_rejects_bad_input(tiny, images):
    x, y = images
    with pytest.raises(InputError, match="baseline"):
        attr.make_baselines(x, kind="gray")
    with pytest.raises(InputError, match="black baseline"):
        attr.make_baselines(x, kind="black", k=10)
    with pytest.raises(InputError, match="steps"):
        attr.integrated_gradients(tiny, x, y, attr.make_baselines(x, kind="black", k=1), steps=0)
    with pytest.raises(InputError, match="output"):
        attr.integrated_gradients(tiny, x, y, attr.make_baselines(x, kind="black", k=1), output="loss")


def test_ig_restores_training_mode(tiny, images):
    x, y = images
    tiny.train()
    try:
        attr.integrated_gradients(tiny, x[:1], y[:1], attr.make_baselines(x[:1], kind="black", k=1), steps=2)
        assert tiny.training
    finally:
        tiny.eval()


@pytest.mark.parametrize("n", [4, pytest.param(32, marks=pytest.mark.slow)])
def test_ig_completeness_on_pretrained_resnet20(resnet20, cifar_exact, n):
    """Acceptance: logit target, black baseline, m = 300 -> mean relative completeness gap <= 5 %."""
    from robint_ray.data import load_split, stack, take

    x, y = stack(take(load_split(cifar_exact, "test"), n))
    baselines = attr.make_baselines(x, kind="black", k=1)
    gaps = {
        m: attr.integrated_gradients(resnet20, x, y, baselines, steps=m, output="logit", batch_size=301)
        .relative_gap.mean()
        .item()
        for m in (50, 300)
    }
    assert gaps[300] <= 0.05, gaps
    assert gaps[300] < gaps[50], gaps


# --- expected gradients ---------------------------------------------------------------------------


def replay_shap_draws(n_images, nsamples, n_background, rseed, noise_shape=None, torch_seed=None, device="cpu"):
    """shap.GradientExplainer's draws, replayed: after np.random.seed(rseed), for each image and each
    sample, np.random.choice(n_background) then np.random.uniform(); with local smoothing, a
    torch normal_() noise image per (image, sample) from torch's global generator of the images'
    device (seeded by the caller before shap_values)."""
    rs = np.random.RandomState(rseed)
    index = np.zeros((n_images, nsamples), dtype=np.int64)
    alpha = np.zeros((n_images, nsamples))
    noise = None if noise_shape is None else torch.zeros((n_images, nsamples, *noise_shape))
    if noise is not None:
        torch.manual_seed(torch_seed)
    for j in range(n_images):
        for k in range(nsamples):
            index[j, k] = rs.choice(n_background)
            alpha[j, k] = rs.uniform()
            if noise is not None:
                noise[j, k] = torch.empty(noise_shape, device=device).normal_().cpu()
    return attr.Draws(torch.from_numpy(index), torch.from_numpy(alpha), noise)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_expected_gradients_equal_shap_on_the_same_draws(tiny, sample_test, smoothing, device):
    import shap

    x_all, _ = sample_test
    tiny, x, background = on(device, tiny, x_all[:3], x_all[100:112])
    nsamples, rseed, torch_seed = 24, 1234, 99
    explainer = shap.GradientExplainer(tiny, background, batch_size=10, local_smoothing=smoothing)
    torch.manual_seed(torch_seed)
    values, ranks = explainer.shap_values(x, nsamples=nsamples, ranked_outputs=1, rseed=rseed)
    theirs = torch.from_numpy(np.asarray(values)[..., 0]).float().to(device)  # (N, C, H, W)
    target = torch.as_tensor(ranks)[:, 0].long().to(device)
    torch.testing.assert_close(target, tiny(x).argmax(1))

    draws = replay_shap_draws(
        len(x),
        nsamples,
        len(background),
        rseed,
        device=device,
        noise_shape=tuple(x.shape[1:]) if smoothing else None,
        torch_seed=torch_seed,
    )
    ours = attr.expected_gradients(
        tiny, x, target, background, output="logit", local_smoothing=smoothing, draws=draws, batch_size=10
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


def test_expected_gradients_seeded_and_batch_free(tiny, images, sample_test, device):
    tiny, x, y, background = on(device, tiny, *images, sample_test[0][200:220])
    a = attr.expected_gradients(tiny, x, y, background, nsamples=30, seed=4, indices=[5, 6, 7, 8], batch_size=7)
    b = attr.expected_gradients(tiny, x, y, background, nsamples=30, seed=4, indices=[5, 6, 7, 8], batch_size=100)
    c = attr.expected_gradients(tiny, x[2:], y[2:], background, nsamples=30, seed=4, indices=[7, 8])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a[2:], c, rtol=1e-5, atol=1e-7)
    d = attr.expected_gradients(tiny, x, y, background, nsamples=30, seed=5, indices=[5, 6, 7, 8])
    assert not torch.allclose(a, d)


def test_expected_gradients_on_a_linear_model():
    """For a linear F the gradient is w everywhere: phi = w * (x - mean of the drawn backgrounds)."""
    model = linear_model()
    torch.manual_seed(2)
    x, background, target = torch.rand(3, 3, 6, 5), torch.rand(9, 3, 6, 5), torch.tensor([0, 2, 3])
    draws = attr.draw([0, 1, 2], nsamples=50, n_background=9, seed=0)
    phi = attr.expected_gradients(model, x, target, background, output="logit", draws=draws)
    w = model[1].weight.detach()[target].view(x.shape)
    expected = w * (x - background[draws.background_index].mean(1))
    torch.testing.assert_close(phi, expected, rtol=1e-5, atol=1e-6)


# --- metrics --------------------------------------------------------------------------------------


def test_concentration_metrics():
    even = torch.ones(1, 3, 10, 10)
    one_pixel = torch.zeros(1, 3, 10, 10)
    one_pixel[0, :, 4, 4] = -2.0
    assert attr.gini(even).item() == pytest.approx(0.0, abs=1e-6)
    assert attr.gini(one_pixel).item() == pytest.approx(1 - 1 / 100, abs=1e-6)  # the maximum for 100 pixels
    assert attr.top_mass(even, 0.05).item() == pytest.approx(0.05)
    assert attr.top_mass(one_pixel, 0.05).item() == pytest.approx(1.0)
    # scale-free, and both rank a concentrated map above a spread one
    spread = torch.rand(1, 3, 10, 10)
    assert attr.gini(3 * spread).item() == pytest.approx(attr.gini(spread).item(), rel=1e-5)
    assert attr.gini(one_pixel + 0.01 * spread) > attr.gini(spread)


def test_deletion_insertion_on_a_model_that_counts_pixels():
    """F = softmax of (brightness of the left half, 0): a map pointing at the left half deletes the
    class fastest and inserts it fastest; a map pointing at the right half does neither."""

    class LeftHalf(nn.Module):
        def forward(self, z):
            score = 20 * z[:, :, :, :4].mean(dim=(1, 2, 3))
            return torch.stack([score, torch.zeros_like(score)], dim=1)

    model = LeftHalf()
    x = torch.ones(2, 1, 8, 8)
    target = torch.zeros(2, dtype=torch.long)
    good = torch.zeros_like(x)
    good[..., :4] = 1
    bad = 1 - good
    del_good, ins_good = attr.deletion_insertion(model, x, target, good, steps=16, batch_size=20)
    del_bad, ins_bad = attr.deletion_insertion(model, x, target, bad, steps=16, batch_size=20)
    assert (del_good < del_bad).all() and (ins_good > ins_bad).all()
    assert ((0 <= del_good) & (del_good <= 1) & (0 <= ins_good) & (ins_good <= 1)).all()


def test_mean_ci_and_paired_difference():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    ci = attr.mean_ci(values)
    assert ci["mean"] == 2.5 and ci["ci_low"] < 2.5 < ci["ci_high"] and ci["n"] == 4
    # scipy's own interval as the reference
    from scipy import stats

    low, high = stats.t.interval(0.95, 3, loc=2.5, scale=stats.sem(values))
    assert ci["ci_low"] == pytest.approx(low) and ci["ci_high"] == pytest.approx(high)
    diff = attr.paired_difference(values, values + np.array([1.0, 1.1, 0.9, 1.0]))
    assert diff["mean"] == pytest.approx(1.0) and diff["ci_low"] > 0 and diff["p_value"] < 0.01


def test_memory_cap_estimate_scales_with_the_budget(tiny):
    small = attr.estimate_batch_size(tiny, (3, 32, 32), 1e6)
    large = attr.estimate_batch_size(tiny, (3, 32, 32), 1e9)
    assert small >= 1 and large > 100 * small // 2
    assert attr.estimate_batch_size(tiny, (3, 32, 32), 1.0) == 1
    assert not tiny.training
