"""The PGD engine: against torchattacks, batch independence, invariants, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from robint_ray.attacks import Threat, misclassified_then_ce, per_example_ce, pgd
from robint_ray.errors import InputError
from robint_ray.models import Representation


def batch(n: int = 16, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_equals_torchattacks_where_the_floor_plays_no_part(norm, device):
    torchattacks = pytest.importorskip("torchattacks")
    model = tiny_model().to(device)
    x, y = (t.to(device) for t in batch())
    eps, step, steps = (0.5, 0.1, 10) if norm == "l2" else (8 / 255, 2 / 255, 10)
    # The 1e-10 floor of torchattacks' L2 step only matters for tiny gradients: make sure it is moot.
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x_req), y), x_req)
    assert grad.flatten(1).norm(dim=1).min() > 1e-6

    ours = pgd(model, x, y, threat=Threat(norm, eps, step), steps=steps, random_start=False)
    cls = torchattacks.PGDL2 if norm == "l2" else torchattacks.PGD
    reference = cls(model, eps=eps, alpha=step, steps=steps, random_start=False)(x, y)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert (ours - x).abs().max() > 0.5 * step / (32 if norm == "l2" else 1)  # it moved


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_each_example_is_independent_of_its_batch(norm, device):
    model = tiny_model(dtype=torch.float64).to(device)
    x, y = (t.to(device) for t in batch(32, dtype=torch.float64))
    threat = Threat(norm, 0.5 if norm == "l2" else 0.03, 0.1 if norm == "l2" else 0.01)
    whole = pgd(model, x, y, threat=threat, steps=5)
    for size in (1, 7, 32):
        pieces = torch.cat(
            [pgd(model, x[i : i + size], y[i : i + size], threat=threat, steps=5) for i in range(0, len(x), size)]
        )
        torch.testing.assert_close(pieces, whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("l2", 2.0), ("linf", 8 / 255)])
@pytest.mark.parametrize("random_start", [False, True])
def test_iterates_stay_in_the_ball_and_the_box(norm, eps, random_start, device):
    model = tiny_model().to(device)
    x, y = (t.to(device) for t in batch())
    g = torch.Generator().manual_seed(0)  # on the CPU: the starts are drawn there for any device
    x_adv = pgd(
        model,
        x,
        y,
        threat=Threat(norm, eps, eps / 4),
        steps=8,
        random_start=random_start,
        generator=g,
        restarts=2,
        keep="best",
    )
    delta = (x_adv - x).flatten(1)
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().max(dim=1).values
    assert (size <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_a_cpu_generator_gives_the_same_starts_on_any_device(norm, device):
    x, _ = batch(8)
    threat = Threat(norm, 0.5 if norm == "l2" else 8 / 255, 0.1)
    there = threat.init(x.to(device), torch.Generator().manual_seed(3))
    here = threat.init(x, torch.Generator().manual_seed(3))
    assert there.device.type == device.type and not torch.equal(here, x)
    torch.testing.assert_close(there.cpu(), here, atol=1e-6, rtol=0)


def test_best_iterate_is_never_worse_than_the_last(resnet20, sample_test):
    x, y = sample_test[0][:64], sample_test[1][:64]
    threat = Threat("l2", 0.1, 0.05)  # large steps overshoot, so best and last differ
    last = pgd(resnet20, x, y, threat=threat, steps=10)
    best = pgd(resnet20, x, y, threat=threat, steps=10, keep="best", score_fn=misclassified_then_ce)
    with torch.no_grad():
        clean_ok = resnet20(x).argmax(1) == y
        ok_last = clean_ok & (resnet20(last).argmax(1) == y)
        ok_best = clean_ok & (resnet20(best).argmax(1) == y)
    assert ok_best.sum() <= ok_last.sum() <= clean_ok.sum()
    assert not (ok_best & ~ok_last).any()  # per example, too
    # Best by loss: per example, the kept loss is at least the last iterate's.
    best_loss = pgd(resnet20, x, y, threat=threat, steps=10, keep="best")
    with torch.no_grad():
        assert (per_example_ce(resnet20(best_loss), y) >= per_example_ce(resnet20(last), y) - 1e-5).all()


def test_model_mode_is_explicit_and_restored():
    model = tiny_model()
    model.train()
    model.body.layer1.eval()  # a mixed state must come back as it was
    seen = []
    hook = model.body.bn1.register_forward_hook(lambda m, i, o: seen.append(m.training))
    x, y = batch(4)
    pgd(model, x, y, threat=Threat("l2", 0.5, 0.1), steps=2, model_mode="eval")
    pgd(model, x, y, threat=Threat("l2", 0.5, 0.1), steps=2, model_mode="train")
    hook.remove()
    assert seen == [False, False, True, True]
    assert model.training and not model.body.layer1.training and model.body.layer2.training
    assert all(p.grad is None for p in model.parameters())


def test_targeted_descends_toward_the_target():
    model = tiny_model()
    x, _ = batch(8)
    target = torch.full((8,), 3)
    x_adv = pgd(model, x, target, threat=Threat("l2", 3.0, 0.5), steps=10, targeted=True)
    with torch.no_grad():
        assert (per_example_ce(model(x_adv), target) < per_example_ce(model(x), target)).all()


def test_custom_loss_on_the_representation():
    model = tiny_model()
    x, _ = batch(4)
    unit = torch.zeros(4, model.representation_dim)
    unit[:, 5] = 1
    x_adv = pgd(
        Representation(model), x, unit, threat=Threat("l2", 5.0, 0.5), steps=10, loss_fn=lambda r, u: (r * u).sum(dim=1)
    )
    with torch.no_grad():
        assert (model.representation(x_adv)[:, 5] > model.representation(x)[:, 5]).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(threat=lambda: Threat("l2", -0.1, 0.1)), "eps must be >= 0"),
        (dict(threat=lambda: Threat("l3", 0.5, 0.1)), "unknown norm"),
        (dict(threat=lambda: Threat("l2", 0.5, 0.0)), "step size must be > 0"),
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(x=lambda x: x * 2), "images must lie in [0, 1]"),
        (dict(x=lambda x: x - 0.5), "images must lie in [0, 1]"),
        (dict(keep="first"), "keep must be"),
    ],
)
def test_bad_input_is_an_input_error(kwargs, message):
    model = tiny_model()
    x, y = batch(2)
    options = dict(threat=Threat("l2", 0.5, 0.1), steps=2)
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        if "threat" in kwargs:
            options["threat"] = kwargs["threat"]()
        if "x" in kwargs:
            x = kwargs["x"](x)
        options.update({k: v for k, v in kwargs.items() if k not in ("threat", "x")})
        pgd(model, x, y, **options)
