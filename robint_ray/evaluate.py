"""Clean, PGD and AutoAttack accuracy of a classifier on a dataset.

An example counts as robust only when the model classifies both the clean image and its adversarial
image correctly, so robust accuracy never exceeds clean accuracy. PGD-20 overestimates robustness (a
fixed step, no restarts); AutoAttack (Croce & Hein 2020, the authors' package `pyautoattack`) is the
honest figure, reported beside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .attacks import misclassified_then_ce, pgd
from .config import PAPER_PGD, PGDSettings, flat_record
from .distributed import IN_PROCESS, Tasks, fan_out, report_progress
from .errors import check
from .models import in_mode
from .shards import Shard, consecutive_shards

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttackConfig:
    """kind: "pgd", "autoattack" or "none"; pgd: the budget (default: the paper's CIFAR-10 PGD-20;
    AutoAttack takes its norm and eps alone). For PGD, keep="last" is torchattacks' convention (the
    paper does not say; its author's code keeps the iterate of highest batch-mean loss); keep="best"
    returns per example the first iterate that fools the model (else the one of highest loss), which is
    never weaker."""

    kind: Literal["pgd", "autoattack", "none"] = "pgd"
    pgd: PGDSettings = PAPER_PGD
    random_start: bool = False
    restarts: int = 1
    keep: Literal["last", "best"] = "last"
    autoattack_version: Literal["standard", "rand", "custom"] = "standard"
    autoattack_attacks: tuple[str, ...] = ()  # for version "custom", e.g. ("apgd-ce", "apgd-t")
    seed: int = 0

    def __post_init__(self):
        check(self.kind in ("pgd", "autoattack", "none"), f"unknown attack {self.kind!r}; use pgd, autoattack or none")
        check(
            (self.autoattack_version == "custom") == bool(self.autoattack_attacks),
            "AutoAttack: give the attacks (e.g. apgd-ce,apgd-t) exactly when the version is custom",
        )
        known = {"apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"}
        check(
            set(self.autoattack_attacks) <= known,
            f"unknown AutoAttack attack(s) {sorted(set(self.autoattack_attacks) - known)}; known: {sorted(known)}",
        )


def attack_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig) -> torch.Tensor:
    """Adversarial images for one batch under `attack` (the model in eval mode)."""
    if attack.kind == "none" or attack.pgd.eps == 0:
        return x
    if attack.kind == "pgd":
        generator = torch.Generator(device=x.device).manual_seed(attack.seed)
        return pgd(
            model,
            x,
            y,
            threat=attack.pgd.threat,
            steps=attack.pgd.steps,
            random_start=attack.random_start,
            restarts=attack.restarts,
            keep=attack.keep,
            score_fn=misclassified_then_ce if attack.keep == "best" else None,
            generator=generator,
        )
    from pyautoattack import AutoAttack

    adversary = AutoAttack(
        model,
        norm={"l2": "L2", "linf": "Linf"}[attack.pgd.norm],
        eps=attack.pgd.eps,
        version=attack.autoattack_version,
        device=x.device,
        seed=attack.seed,
        attacks=list(attack.autoattack_attacks) or None,
    )
    adversary.verbose = False
    with in_mode(model):
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))  # (images, their predictions)
        return x_adv


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1) == y


def correctness(
    model: nn.Module,
    dataset: Dataset,
    *,
    attack: AttackConfig | None = None,
    batch_size: int = 128,
    tasks: Tasks = IN_PROCESS,
    shard_batches: int = 4,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example of `dataset`, in its order: (clean correct (N,) bool, clean and adversarial correct
    (N,) bool).

    The images are cut into batches at fixed positions (batch k: images k * batch_size onwards), and
    each batch is attacked alone with the attack's seed, so the answer does not depend on how batches
    are grouped into tasks: PGD's loss is summed per example, and AutoAttack, whose random starts and
    whose choice of which images to attack further depend on the batch, sees the same batches.
    tasks (`distributed.Tasks`): in this process, on the model's device, the dataset as one shard (one
    pass of one DataLoader); as Ray tasks, shards of shard_batches batches, each task on its own device,
    reporting per batch. The model's mode is restored."""
    check(batch_size >= 1, f"batch size must be >= 1, got {batch_size}")
    check(shard_batches >= 1, f"shard_batches must be >= 1, got {shard_batches}")
    attack = attack or AttackConfig(kind="none")
    check(len(dataset) > 0, "the dataset is empty")
    shards = consecutive_shards(len(dataset), shard_batches * batch_size if tasks.on_ray else len(dataset))
    parts = fan_out(
        _evaluate_shard,
        shards,
        tasks=tasks,
        shared=dict(model=model, dataset=dataset, attack=attack, batch_size=batch_size),
        sizes=[s.size for s in shards],
        desc=f"eval ({attack.kind})",
        progress=progress,
    )
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _evaluate_shard(
    shard: Shard, *, model: nn.Module, dataset: Dataset, attack: AttackConfig, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One shard: correctness of its items (whole batches) on the model's device, reporting per batch."""
    device = next(model.parameters()).device
    clean, robust = [], []
    loader = DataLoader(Subset(dataset, range(shard.start, shard.stop)), batch_size=batch_size, shuffle=False)
    with in_mode(model):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            ok = _correct(model, x, y)
            ok_adv = ok & _correct(model, attack_batch(model, x, y, attack), y) if attack.kind != "none" else ok
            clean.append(ok.cpu())
            robust.append(ok_adv.cpu())
            report_progress(len(y))
    return torch.cat(clean), torch.cat(robust)


def evaluate(
    model: nn.Module, dataset: Dataset, *, attack: AttackConfig | None = None, per_image: bool = False, **options: Any
) -> dict:
    """Clean and adversarial accuracy (fractions) of `model` on every item of `dataset`, in this process
    or as Ray tasks: options are correctness' (batch_size, tasks, shard_batches, progress; the same
    figures either way).

    Returns {"n", "clean_accuracy", "adversarial_accuracy", "clean_correct", "adversarial_correct",
    "attack": {...}}, with per_image also "per_image": {"clean", "adversarial"}, each item's 0 / 1 in the
    dataset's order (what paired comparisons of two models need). The model is put in eval mode for the
    evaluation and its mode is restored.
    """
    attack = attack or AttackConfig(kind="none")
    ok, ok_adv = correctness(model, dataset, attack=attack, **options)
    n, clean, robust = len(ok), int(ok.sum()), int(ok_adv.sum())
    extra = {"per_image": {"clean": ok.int().tolist(), "adversarial": ok_adv.int().tolist()}} if per_image else {}
    return {
        **extra,
        "n": n,
        "clean_correct": clean,
        "adversarial_correct": robust,
        "clean_accuracy": clean / n,
        "adversarial_accuracy": robust / n if attack.kind != "none" else None,
        "attack": flat_record(attack),
    }
