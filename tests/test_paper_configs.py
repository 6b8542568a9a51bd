"""The paper's configs hold the paper's numbers. Every key of experiments/paper/*.yaml and of the
training configs they name is a row below: its value and where the value comes from (the paper's
text, its author's code, or ours where neither gives one). A changed value, or a key without a row,
fails here; change or add the row with its source. The settings the report shows as the paper's
(study.config.PAPER) must equal what the configs set."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from robint_ray.config import PGDSettings, load_config
from robint_ray.study import PAPER, load_study
from robint_ray.visualize import FEATURE_VIS, GENERATION, INVERSION

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

# Rows both studies share: (value, source).
STUDY_COMMON = {
    "workers": (4, "ours: 4 GPU workers (cluster.yaml)"),
    "gpus_per_worker": (1, "ours"),
    "evaluation.n": (None, "author: the whole test set"),
    "evaluation.pgd.norm": ("l2", "paper: Tables 1 / 4"),
    "evaluation.pgd.steps": (20, "paper: Tables 1 / 4, PGD-20"),
    "evaluation.autoattack_n": (1000, "ours: AutoAttack is not in the paper"),
    "attributions.n": (24, "paper: Figs. 10, 13, 16, 17 (8 x 3)"),
    "attributions.overlays": (3, "paper: Figs. 2 / 6"),
    "attributions.ig_steps": (50, "author: notebook"),
    "attributions.ig_baselines": (10, "author: notebook"),
    "attributions.shap_nsamples": (200, "author: GradientExplainer's default"),
    "attributions.shap_background": (176, "author: notebook"),
    "attributions.background": ("test", "author: notebook (one shuffled test batch: 176 background + 24 explained)"),
    "generation.shard_size": (100, "ours: images per Ray task"),
    "generation.fid_dims": (2048, "author: torchmetrics' FID default"),
    "inversion.runs": (2, "paper: Tables 3 / 6, Inv. 1 and Inv. 2"),
    "inversion.image_sources": (2, "author: notebooks"),
    "inversion.noise": (1, "author: notebooks"),
    "inversion.pgd.eps": (1000, "paper: Figs. 4 / 8"),
    "inversion.pgd.step_size": (1, "paper: Figs. 4 / 8"),
    "inversion.pgd.steps": (10000, "paper: Figs. 4 / 8"),
    "features.starts": (4, "ours: the author starts from one grey image"),
    "features.top": (8, "ours: the author shows 3"),
    "features.pgd.eps": (1000, "paper: Figs. 5 / 9"),
    "features.pgd.step_size": (1, "paper: Figs. 5 / 9"),
    "features.pgd.steps": (400, "paper: Figs. 5 / 9"),
}
STUDIES = {
    "cifar10": {
        **STUDY_COMMON,
        "name": ("CIFAR-10", "paper: section 3.1"),
        "paper": ("cifar10", "ours: which of PAPER's tables"),
        "data": ("/mnt/shared/data/cifar10", "ours"),
        "standard.train": ("../cifar10_standard.yaml", "ours"),
        "robust.train": ("../cifar10_robust_l2.yaml", "ours"),
        "evaluation.pgd.eps": (0.5, "paper: Table 1"),
        "evaluation.pgd.step_size": (0.1, "paper: Table 1"),
        "generation.per_class": (1000, "author: notebook; paper: Table 2"),
        "generation.real_per_class": (1000, "author: notebook"),
        "features.features": ([[130], [435]], "paper: Fig. 5 (130); 435 a seeded draw for Fig. 12"),
    },
    "smallimagenet150": {
        **STUDY_COMMON,
        "name": ("Small ImageNet 150", "paper: section 3.2"),
        "paper": ("folder128", "ours: which of PAPER's tables"),
        "data": ("/mnt/shared/data/small-imagenet-150", "ours"),
        "standard.train": ("../smallimagenet150_standard.yaml", "ours"),
        "robust.train": ("../smallimagenet150_robust_l2.yaml", "ours"),
        "evaluation.pgd.eps": (1.5, "paper: Table 4"),
        "evaluation.pgd.step_size": (2.5 * 1.5 / 20, "paper: Table 4"),
        "generation.per_class": (60, "paper: Table 5, 9,000 images of 150 classes"),
        "generation.real_per_class": (60, "ours: as the generated side"),
        "features.features": ([[492], [1742]], "paper: Fig. 9 (492); 1742 a seeded draw for Fig. 15"),
    },
}

# Rows the standard and the robust training config of a dataset share.
TRAINING_COMMON = {
    "grad_clip": (0.1, "author: trainers/tools/backward.py (clip_grad_value_)"),
    "epochs": (100, "paper: section 3.1; author: notebooks"),
    "pgd.norm": ("l2", "paper"),
    "pgd.steps": (20, "paper"),
    "pgd_random_start": (False, "author: trainer (Algorithm 1 draws one)"),
    "pgd_bn_mode": ("train", "author: trainer"),
    "precision": ("fp32", "author: fp32 on one GPU"),
    "channels_last": (False, "ours: the fp32 benchmarked"),
    "data.augment": (True, "author: notebooks"),
    "data.val_n": (2000, "ours: model selection off the test set"),
    "optim.weight_decay": (5e-4, "author: notebooks"),
    "optim.schedule": ("cosine", "author: CosineAnnealingLR"),
    "optim.t_max": (200, "author: trainer's T_max"),
}
TRAINING = {
    "cifar10": {
        **TRAINING_COMMON,
        "arch": ("cifar_resnet18", "paper: section 3.1"),
        "batch_size": (128, "author: notebook"),
        "pgd.eps": (0.5, "paper: section 3.1"),
        "pgd.step_size": (0.1, "paper: section 3.1"),
        "data.path": ("data/cifar10", "ours: the study's data replaces it"),
        "data.val_fraction": (0.1, "ours"),
        "optim.name": ("sgd", "author: notebook"),
        "optim.lr": (0.01, "author: notebook"),
        "optim.momentum": (0.9, "author: trainer"),
    },
    "smallimagenet150": {
        **TRAINING_COMMON,
        "arch": ("resnet50", "paper: section 3.2"),
        "batch_size": (200, "author: notebook"),
        "pgd.eps": (1.5, "paper: section 3.2 (the author's notebook: 0.5)"),
        "pgd.step_size": (2.5 * 1.5 / 20, "paper: section 3.2 (the author's notebook: 0.1)"),
        "data.path": ("data/small-imagenet-150", "ours: the study's data replaces it"),
        "data.val_fraction": (0.05, "ours"),
        "data.loader_workers": (4, "ours"),
        "optim.name": ("adam", "author: notebook"),
        "optim.lr": (1e-4, "author: notebook"),
        "cpus_per_worker": (6, "ours: fits a g5.2xlarge"),
    },
}
ADVERSARIAL = {"standard": (False, "paper"), "robust_l2": (True, "paper")}


def flat(mapping: dict, prefix: str = "") -> dict:
    """A YAML mapping's leaves under dotted keys: {"pgd": {"eps": 0.5}} -> {"pgd.eps": 0.5}."""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def expected(rows: dict) -> dict:
    return {key: value for key, (value, _source) in rows.items()}


@pytest.mark.parametrize("dataset", STUDIES)
def test_every_value_of_the_paper_configs_is_a_row_of_the_table(dataset):
    study = flat(yaml.safe_load((EXPERIMENTS / "paper" / f"{dataset}.yaml").read_text()))
    assert study == expected(STUDIES[dataset])
    for kind, adversarial in ADVERSARIAL.items():
        training = flat(yaml.safe_load((EXPERIMENTS / f"{dataset}_{kind}.yaml").read_text()))
        assert training == expected({**TRAINING[dataset], "adversarial": adversarial})


@pytest.mark.parametrize("dataset", STUDIES)
def test_the_papers_settings_in_the_report_are_what_the_configs_set(dataset):
    """PAPER[...]["settings"], which the report prints as the paper's, against the loaded configs; the
    settings only a run can tell (images, FID counts) are compared in each run's report."""
    study = load_study(EXPERIMENTS / "paper" / f"{dataset}.yaml")
    paper = PAPER[study.paper]["settings"]
    standard, robust = load_config(study.standard.train), load_config(study.robust.train)
    a, size = study.attributions, 32 if study.paper == "cifar10" else 128
    configured = {
        "architecture": standard.arch,
        "epochs": standard.epochs,
        "batch size": standard.batch_size,
        "robust training PGD": robust.pgd.describe(),
        "evaluation PGD": study.evaluation.pgd.describe(),
        "explained images": a.n,
        "explained class": a.target,
        "IG baselines x steps": f"{a.ig_baselines} x {a.ig_steps}",
        "SHAP samples, background": f"{a.shap_nsamples}, {a.shap_background}",
        "generated images a class": study.generation.per_class,
        "generation PGD": GENERATION[size].describe(),  # generation.pgd unset: the paper's for the size
        "inversion PGD": study.inversion.pgd.describe(),
        "inversion runs": study.inversion.runs,
        "feature visualisation PGD": study.features.pgd.describe(),
    }
    assert study.generation.pgd is None
    assert {key: paper[key] for key in configured} == configured
    assert (standard.arch, standard.epochs, standard.batch_size) == (robust.arch, robust.epochs, robust.batch_size)
    assert study.evaluation.pgd == robust.pgd  # the training attack is the evaluation's


def test_the_papers_pgd_budgets_are_its_captions():
    """The budgets PAPER and the stages default to, against the paper's figure captions."""
    assert INVERSION == PGDSettings(eps=1000, step_size=1, steps=10_000)  # Figs. 4, 8, 11, 18
    assert FEATURE_VIS == PGDSettings(eps=1000, step_size=1, steps=400)  # Figs. 5, 9, 12, 15
    assert GENERATION[32] == PGDSettings(eps=30, step_size=0.5, steps=60)  # Fig. 3
    assert GENERATION[128] == PGDSettings(eps=40, step_size=1, steps=60)  # Fig. 7
    assert PAPER["cifar10"]["settings"]["training images"] == 50_000  # section 3.1: CIFAR-10's training set
    assert PAPER["folder128"]["settings"]["training images"] == 90_000  # section 3.2: 150 x 600
