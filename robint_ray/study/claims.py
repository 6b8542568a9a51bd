"""The paper's claims tested on a run: for each, robust minus standard with its 95 % interval and
whether the run agrees with the paper, contradicts it, or cannot tell (the interval holds 0).

- Accuracy (Tables 1 / 4): the paired difference of per-image correctness over the same test images
  (clean and PGD on the evaluation images, AutoAttack on its draw).
- FID (Tables 2 / 5): the difference on each disjoint draw of the generations (`generation.fid_draws`),
  its mean and t-interval over the draws; the whole set's FIDs beside it.
- Inception-192 (Tables 3 / 6): the paired difference of the per-image distances of each inversion run,
  beside the batch figure the paper prints.
- Attributions (Figs. 2 / 6, 10 / 13, 16 / 17: the paper shows them, it does not measure them): the
  paired difference of each metric over the explained images, in the direction that means "more
  interpretable": more concentrated (Gini, top-5 % mass up) and more faithful (deletion AUC down,
  insertion AUC up).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..attributions import mean_ci, paired_difference
from ..report import Section, Table

AGREES, CONTRADICTS, UNCLEAR = "agrees", "contradicts", "cannot tell (the interval holds 0)"
# Each attribution metric and the sign of robust - standard that means "more interpretable".
METRIC_SIGNS = {"gini": 1, "top_mass": 1, "deletion_auc": -1, "insertion_auc": 1}
HEADER = ["claim", "paper (robust vs standard)", "measure", "robust - standard [95 %]", "verdict"]


def verdict(interval: dict[str, float], sign: int) -> str:
    """AGREES where the interval lies on the side of 0 that `sign` (the paper's direction) names,
    CONTRADICTS where it lies on the other side, else UNCLEAR."""
    low, high = interval["ci_low"], interval["ci_high"]
    if not (np.isfinite(low) and np.isfinite(high)):
        return UNCLEAR
    if low > 0 or high < 0:
        return AGREES if (low > 0) == (sign > 0) else CONTRADICTS
    return UNCLEAR


def claims(results: dict[str, Any], paper: dict[str, Any]) -> list[dict[str, Any]]:
    """Every claim the run's results can test, as rows: {"claim", "paper", "measure", "difference"
    (mean, ci_low, ci_high, n, ...), "sign" (the paper's direction), "verdict", "scale"}."""
    rows = []
    evaluation = results.get("evaluation", {})
    if "standard" in evaluation and "per_image" in evaluation["standard"]["pgd"]:
        rows += _accuracy_claims(evaluation, paper)
    generation = results.get("generation", {})
    if "fid_draws" in generation:
        rows.append(_fid_claim(generation, paper))
    inversion = results.get("inversion", {})
    for run, key in ((1, "inception192"), (2, "inception192_inv2")):
        if f"inv{run}" in inversion.get("robust", {}):
            rows.append(_inversion_claim(inversion, run, paper[key]))
    attributions = results.get("attributions", {})
    for method, title in (("ig", "Integrated Gradients"), ("shap", "SHAP")):
        if attributions.get(method, {}).get("difference"):
            rows += _attribution_claims(attributions[method]["difference"], method, title)
    for row in rows:
        row["verdict"] = verdict(row["difference"], row["sign"])
    return rows


def _accuracy_claims(evaluation: dict[str, Any], paper: dict[str, Any]) -> list[dict[str, Any]]:
    (clean_s, pgd_s), (clean_r, pgd_r) = paper["accuracy"]["standard"], paper["accuracy"]["robust"]
    specs = [
        ("pgd", "clean", "Adversarial training costs clean accuracy", -1, f"{clean_r:g} vs {clean_s:g} %"),
        ("pgd", "adversarial", "Adversarial training gives PGD robustness", 1, f"{pgd_r:g} vs {pgd_s:g} %"),
        ("autoattack", "adversarial", "... and AutoAttack robustness (not in the paper)", 1, "not measured"),
    ]
    rows = []
    for attack, kind, claim, sign, theirs in specs:
        if attack not in evaluation["standard"]:
            continue
        standard, robust = (np.asarray(evaluation[m][attack]["per_image"][kind], float) for m in ("standard", "robust"))
        diff = paired_difference(standard * 100, robust * 100)
        measure = f"{'clean' if kind == 'clean' else attack.replace('pgd', 'PGD')} accuracy (%), robust - standard"
        rows.append(
            {
                "claim": claim,
                "paper": theirs,
                "measure": measure + f", paired over {len(standard)} test images",
                "difference": diff,
                "sign": sign,
                "values": {"standard": float(standard.mean() * 100), "robust": float(robust.mean() * 100)},
            }
        )
    return rows


def _fid_claim(generation: dict[str, Any], paper: dict[str, Any]) -> dict[str, Any]:
    draws = generation["fid_draws"]
    per_draw = draws["robust - standard"]["per_draw"]
    fid = generation["fid"]
    return {
        "claim": "Robust models generate more realistic class images (lower FID)",
        "paper": f"{paper['fid']['robust']:g} vs {paper['fid']['standard']:g}",
        "measure": (
            f"FID robust - standard on each of {len(per_draw)} disjoint draws of {draws['images_per_draw']} "
            f"generations (whole sets: {fid['robust']:.1f} vs {fid['standard']:.1f})"
        ),
        "difference": {**mean_ci(per_draw), "min": min(per_draw), "max": max(per_draw)},
        "sign": -1,
        "values": {"standard": fid["standard"], "robust": fid["robust"]},
    }


def _inversion_claim(inversion: dict[str, Any], run: int, theirs: dict[str, float]) -> dict[str, Any]:
    standard, robust = (inversion[m][f"inv{run}"]["inception192_per_image"] for m in ("standard", "robust"))
    batch = {m: inversion[m][f"inception192_inv{run}"] for m in ("standard", "robust")}
    return {
        "claim": f"Robust representations invert closer to the target (Inv. {run}, Inception-192 distance)",
        "paper": f"{theirs['robust']:g} vs {theirs['standard']:g}",
        "measure": (
            f"per-image distance robust - standard over the run's {len(standard)} inversions "
            f"(batch figure as the paper's: {batch['robust']:.2f} vs {batch['standard']:.2f})"
        ),
        "difference": paired_difference(standard, robust),
        "sign": -1,
        "values": batch,
    }


def _attribution_claims(difference: dict[str, Any], method: str, title: str) -> list[dict[str, Any]]:
    return [
        {
            "claim": f"Robust {title} maps are more interpretable: {metric.replace('_', ' ')} "
            + ("up" if sign > 0 else "down"),
            "paper": "shown (figures), not measured",
            "measure": f"{metric} robust - standard, paired over {difference[metric].get('n', 'the')} explained images",
            "difference": difference[metric],
            "sign": sign,
            "method": method,
            "metric": metric,
        }
        for metric, sign in METRIC_SIGNS.items()
        if metric in difference
    ]


def section(rows: list[dict[str, Any]]) -> Section:
    """The claims table, with a one-line count of what agrees."""
    table = [
        [
            r["claim"],
            r["paper"],
            r["measure"],
            f"{r['difference']['mean']:.4g} [{r['difference']['ci_low']:.4g}, {r['difference']['ci_high']:.4g}]",
            r["verdict"],
        ]
        for r in rows
    ]
    counts = {v: sum(r["verdict"] == v for r in rows) for v in (AGREES, CONTRADICTS, UNCLEAR)}
    summary = (
        f"Of {len(rows)} claims this run can test, {counts[AGREES]} agree with the paper, {counts[CONTRADICTS]} "
        f"contradict it and {counts[UNCLEAR]} cannot be told apart from no difference (95 % intervals: a "
        "t-interval over the paired test images, explained images, inversions or disjoint FID draws)."
    )
    return Section(
        "The paper's claims on this run",
        summary,
        [Table("Claims", HEADER, table)],
    )
