"""Clean, PGD and AutoAttack accuracy of a classifier on a dataset.

An example counts as robust only when the model classifies both the clean image and its adversarial
image correctly, so robust accuracy never exceeds clean accuracy. PGD-20 overestimates robustness (a
fixed step, no restarts); AutoAttack (Croce & Hein 2020, the authors' package `pyautoattack`) is the
honest figure, reported beside it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .attacks import Threat, misclassified_then_ce, pgd
from .errors import check

log = logging.getLogger(__name__)

PAPER_PGD = {  # the paper's evaluation attacks (Tables 1 and 4)
    "cifar": dict(norm="l2", eps=0.5, step_size=0.1, steps=20),
    "folder128": dict(norm="l2", eps=1.5, step_size=2.5 * 1.5 / 20, steps=20),
}


@dataclass(frozen=True)
class AttackConfig:
    """kind: "pgd", "autoattack" or "none". For PGD, keep="last" is the paper's (and torchattacks')
    convention; keep="best" returns per example the first iterate that fools the model (else the one of
    highest loss), which is never weaker."""

    kind: Literal["pgd", "autoattack", "none"] = "pgd"
    norm: Literal["l2", "linf"] = "l2"
    eps: float = 0.5
    step_size: float = 0.1
    steps: int = 20
    random_start: bool = False
    restarts: int = 1
    keep: Literal["last", "best"] = "last"
    autoattack_version: Literal["standard", "rand", "custom"] = "standard"
    autoattack_attacks: tuple[str, ...] = ()  # for version "custom", e.g. ("apgd-ce", "apgd-t")
    seed: int = 0

    def __post_init__(self):
        check(self.kind in ("pgd", "autoattack", "none"), f"unknown attack {self.kind!r}; use pgd, autoattack or none")
        check(isinstance(self.steps, int) and self.steps >= 1, f"steps must be an integer >= 1, got {self.steps!r}")
        Threat(self.norm, self.eps, self.step_size)  # validates norm, eps, step size
        check((self.autoattack_version == "custom") == bool(self.autoattack_attacks),
              "AutoAttack: give the attacks (e.g. apgd-ce,apgd-t) exactly when the version is custom")
        known = {"apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"}
        check(set(self.autoattack_attacks) <= known,
              f"unknown AutoAttack attack(s) {sorted(set(self.autoattack_attacks) - known)}; known: {sorted(known)}")

    @property
    def threat(self) -> Threat:
        return Threat(self.norm, self.eps, self.step_size)


def attack_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig) -> torch.Tensor:
    """Adversarial images for one batch under `attack` (the model in eval mode)."""
    if attack.kind == "none" or attack.eps == 0:
        return x
    if attack.kind == "pgd":
        generator = torch.Generator(device=x.device).manual_seed(attack.seed)
        return pgd(model, x, y, threat=attack.threat, steps=attack.steps, random_start=attack.random_start,
                   restarts=attack.restarts, keep=attack.keep,
                   score_fn=misclassified_then_ce if attack.keep == "best" else None, generator=generator)
    from pyautoattack import AutoAttack

    adversary = AutoAttack(model, norm={"l2": "L2", "linf": "Linf"}[attack.norm], eps=attack.eps,
                           version=attack.autoattack_version, device=x.device, seed=attack.seed,
                           attacks=list(attack.autoattack_attacks) or None)
    adversary.verbose = False
    was_training = model.training
    model.eval()
    try:
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))  # (images, their predictions)
        return x_adv
    finally:
        model.train(was_training)


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1) == y


def evaluate(model: nn.Module, dataset: Dataset, *, attack: AttackConfig | None = None, batch_size: int = 128,
             device: str | torch.device | None = None, progress: bool = False) -> dict:
    """Clean and adversarial accuracy (fractions) of `model` on every item of `dataset`.

    Returns {"n", "clean_accuracy", "adversarial_accuracy", "clean_correct", "adversarial_correct",
    "attack": {...}}. The model is put in eval mode for the evaluation and its mode is restored.
    """
    check(batch_size >= 1, f"batch size must be >= 1, got {batch_size}")
    attack = attack or AttackConfig(kind="none")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = clean = robust = 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(dataset), desc=f"eval ({attack.kind})", unit="img")
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            ok = _correct(model, x, y)
            if attack.kind != "none":
                x_adv = attack_batch(model, x, y, attack)
                ok_adv = ok & _correct(model, x_adv, y)
            else:
                ok_adv = ok
            n += len(y)
            clean += int(ok.sum())
            robust += int(ok_adv.sum())
            if bar is not None:
                bar.update(len(y))
                bar.set_postfix(clean=f"{clean / n:.4f}", adv=f"{robust / n:.4f}")
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    check(n > 0, "the dataset is empty")
    return {
        "n": n, "clean_correct": clean, "adversarial_correct": robust,
        "clean_accuracy": clean / n, "adversarial_accuracy": robust / n if attack.kind != "none" else None,
        "attack": asdict(attack),
    }
