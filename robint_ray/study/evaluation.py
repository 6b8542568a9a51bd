"""Stage 2, Tables 1 and 4: clean and PGD accuracy of both models on the test split, and AutoAttack on
test images drawn across the classes (the honest robust figure, not in the paper)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import class_counts, draw
from ..evaluate import AttackConfig, evaluate
from ..report import Section, Table, difference

if TYPE_CHECKING:
    from .core import Study

NAME = "evaluation"
MODELS = ("standard", "robust")


def run(study: Study, folder: Path) -> dict[str, Any]:
    """Per model: {"pgd": evaluate's result, "autoattack": the same on autoattack_n images}; "images":
    how many test images each attack saw and how many of each class (seeded draws spread over the
    classes, `data.draw`; all of them where n is None)."""
    c, tasks, seed = study.config.evaluation, study.tasks(NAME), study.config.seed
    test = study.test_split()
    subsets = {"pgd": draw(test, c.n, seed=seed)}
    if c.autoattack_n:
        subsets["autoattack"] = draw(test, c.autoattack_n, seed=seed)
    pgd = AttackConfig(kind="pgd", pgd=c.pgd)
    autoattack = c.autoattack_n and AttackConfig(
        kind="autoattack",
        pgd=c.pgd,  # AutoAttack takes the norm and eps
        seed=study.config.seed,
        autoattack_version=c.autoattack_version,
        autoattack_attacks=c.autoattack_attacks,
    )
    out: dict[str, Any] = {"images": {kind: class_counts(subset) for kind, subset in subsets.items()}}
    for name in MODELS:
        model = study.model(name)
        out[name] = {
            "pgd": evaluate(
                model,
                subsets["pgd"],
                attack=pgd,
                batch_size=c.batch_size,
                tasks=tasks,
                progress=True,
                per_image=True,
            )
        }
        if autoattack:
            out[name]["autoattack"] = evaluate(
                model,
                subsets["autoattack"],
                attack=autoattack,
                batch_size=c.batch_size,
                tasks=tasks,
                shard_batches=1,
                progress=True,
                per_image=True,
            )
    return out


def sections(study: Study, results: dict[str, Any], paper: dict[str, Any]) -> list[Section]:
    """The accuracy table beside the paper's, with ours - paper."""
    rows = []
    for name in MODELS:
        pgd, aa = results[NAME][name]["pgd"], results[NAME][name].get("autoattack")
        clean, robust = 100 * pgd["clean_accuracy"], 100 * pgd["adversarial_accuracy"]
        paper_clean, paper_pgd = paper["accuracy"][name]
        rows.append(
            [
                name,
                pgd["n"],
                clean,
                paper_clean,
                difference(clean, paper_clean),
                robust,
                paper_pgd,
                difference(robust, paper_pgd),
                None if aa is None else 100 * aa["adversarial_accuracy"],
                None if aa is None else aa["n"],
            ]
        )
    header = ["model", "n", "clean (ours)", "clean (paper)", "ours - paper", "PGD (ours)", "PGD (paper)"]
    header += ["ours - paper", "AutoAttack (ours)", "AutoAttack n"]
    c, e = study.config, study.config.evaluation
    budget = e.pgd
    attacks = f": {', '.join(e.autoattack_attacks)}" if e.autoattack_attacks else ""
    images = results[NAME].get("images", {})
    drawn = {kind: f"{sum(counts.values())} images of {len(counts)} classes" for kind, counts in images.items()}
    return [
        Section(
            f"Accuracy ({paper['numbers']['accuracy']})",
            f"Test split of {study.shown(c.data)} ({drawn.get('pgd', 'all images')}). PGD: {budget.norm.upper()}, "
            f"eps {budget.eps}, step {budget.step_size}, {budget.steps} steps, no random start, last iterate (as "
            f"torchattacks). AutoAttack ({e.autoattack_version}{attacks}) on "
            f"{drawn.get('autoattack', 'a seeded draw')} (drawn seeded across the classes), the honest robust figure "
            "(not in the paper).",
            [Table("Accuracy (%)", header, rows)],
        )
    ]
