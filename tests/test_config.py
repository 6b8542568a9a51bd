"""Training configs: paper defaults, the four experiment files, strict keys, --set overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from robint_ray.config import PGDSettings, TrainConfig, apply_overrides, dump_config, load_config
from robint_ray.errors import InputError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_defaults_are_the_papers_cifar10_settings():
    cfg = TrainConfig()
    assert (cfg.arch, cfg.epochs, cfg.batch_size) == ("cifar_resnet18", 100, 128)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.01, 0.9, 5e-4)
    assert (cfg.optim.schedule, cfg.optim.t_max) == ("cosine", 200)
    assert cfg.pgd == PGDSettings(norm="l2", eps=0.5, step_size=0.1, steps=20) and cfg.val_pgd is None
    assert (cfg.pgd_random_start, cfg.pgd_bn_mode) == (False, "train")


@pytest.mark.parametrize(
    "name, adversarial",
    [
        ("cifar10_standard", False),
        ("cifar10_robust_l2", True),
        ("smallimagenet150_standard", False),
        ("smallimagenet150_robust_l2", True),
    ],
)
def test_the_four_paper_runs(name, adversarial):
    cfg = load_config(EXPERIMENTS / f"{name}.yaml")
    assert cfg.adversarial is adversarial and cfg.epochs == 100
    if name.startswith("cifar10"):
        assert (cfg.arch, cfg.batch_size, cfg.optim.name, cfg.optim.lr, cfg.optim.t_max) == (
            "cifar_resnet18",
            128,
            "sgd",
            0.01,
            200,
        )
        assert (cfg.pgd.eps, cfg.pgd.step_size, cfg.pgd.steps) == (0.5, 0.1, 20)
    else:
        assert (cfg.arch, cfg.batch_size, cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == (
            "resnet50",
            200,
            "adam",
            1e-4,
            5e-4,
        )
        assert (cfg.optim.schedule, cfg.optim.t_max) == ("cosine", 200)  # the author's notebook
        assert (cfg.pgd.eps, cfg.pgd.steps) == (1.5, 20) and cfg.pgd.step_size == pytest.approx(2.5 * 1.5 / 20)
    assert cfg.pgd.norm == "l2" and not cfg.pgd_random_start and cfg.pgd_bn_mode == "train"
    smoke = load_config(EXPERIMENTS / "smoke" / f"{name}.yaml")
    assert smoke.adversarial is adversarial and smoke.pgd.eps == cfg.pgd.eps and smoke.optim.name == cfg.optim.name


def test_yaml_round_trip_and_frozen(tmp_path):
    cfg = load_config(EXPERIMENTS / "cifar10_robust_l2.yaml", ["optim.lr=0.05"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg == TrainConfig.from_dict(cfg.to_dict())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3


def test_unknown_keys_are_errors_that_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("arch: cifar_resnet8\noptim: {lr: 0.1, momentun: 0.9}\n")
    with pytest.raises(InputError, match="'optim.momentun'"):
        load_config(path)
    path.write_text("archh: cifar_resnet8\n")
    with pytest.raises(InputError, match="'archh'"):
        load_config(path)
    with pytest.raises(InputError, match="'pgd.epss'"):
        load_config(None, ["pgd.epss=1.0"])
    with pytest.raises(InputError, match="'optim.lr.x'"):
        load_config(None, ["optim.lr.x=1"])


def test_sets_are_typed_and_dotted():
    cfg = load_config(
        None,
        [
            "optim.lr=1e-4",
            "adversarial=true",
            "pgd.norm=linf",
            "data.train_n=100",
            "data.path=../x",
            "optim.t_max=null",
        ],
    )
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.adversarial is True and cfg.pgd.norm == "linf" and cfg.data.train_n == 100
    assert cfg.data.path == "../x" and cfg.optim.t_max is None
    assert cfg.override({"epochs": 7}).epochs == 7
    assert apply_overrides({"a": {"b": 1}}, {"a.b": 2}) == {"a": {"b": 2}}


@pytest.mark.parametrize(
    "setting, message",
    [
        ("epochs=ten", "'epochs' must be an integer"),
        ("adversarial=yes please", "'adversarial' must be true or false"),
        ("pgd.norm=l3", "'pgd.norm' must be one of"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("pgd.steps=0", "pgd: steps must be an integer >= 1"),
        ("pgd.eps=-0.5", "pgd: eps must be >= 0"),
        ("pgd.step_size=0", "pgd: step size must be > 0"),
        ("pgd=null", "'pgd' must be a mapping"),
        ("optim=3", "'optim' must be a mapping"),
        ("lr", "key=value"),
    ],
)
def test_bad_values_are_input_errors(setting, message):
    with pytest.raises(InputError, match=message):
        load_config(None, [setting])


def test_the_pgd_budget_is_one_nested_mapping_set_by_dotted_keys(tmp_path):
    """pgd: {eps, step_size, steps, norm} (a PGDSettings, checked once, whole: a key left out is an
    error); --set reaches into it; a key of the flat layout before names where it lives now."""
    cfg = load_config(EXPERIMENTS / "smoke" / "cifar10_robust_l2.yaml", ["pgd.eps=0.25", "pgd_random_start=true"])
    assert cfg.pgd == PGDSettings(eps=0.25, step_size=0.1, steps=5) and cfg.pgd_random_start is True
    assert cfg.override(["val_pgd={eps: 0.25, step_size: 0.05, steps: 2}"]).val_pgd == PGDSettings(0.25, 0.05, 2)
    path = tmp_path / "old.yaml"
    path.write_text("pgd: {norm: l2, eps: 0.5, step_size: 0.1, steps: 20, random_start: false, bn_mode: train}\n")
    with pytest.raises(InputError, match="key 'pgd.random_start' moved: write it as pgd_random_start: ..."):
        load_config(path)
    with pytest.raises(InputError, match="key 'pgd.bn_mode' moved: write it as pgd_bn_mode"):
        load_config(None, ["pgd.bn_mode=eval"])
    path.write_text("pgd: {eps: 0.5, steps: 20}\n")
    with pytest.raises(InputError, match="config section 'pgd' lacks step_size"):
        load_config(path)


def test_selection_rule_follows_the_authors_trainers():
    """Standard models keep the best clean accuracy, robust ones the best mean(clean, PGD), unless set."""
    from robint_ray.config import TrainConfig
    from robint_ray.train import selection_score

    assert TrainConfig(adversarial=False).selection_rule == "clean"
    assert TrainConfig(adversarial=True).selection_rule == "mean"
    assert TrainConfig(adversarial=False, selection="mean").selection_rule == "mean"
    assert selection_score(0.9, 0.1, rule="clean") == 0.9 and selection_score(0.9, 0.1, rule="mean") == 0.5
    with pytest.raises(InputError, match="selection"):
        TrainConfig(selection="best")
