"""The report's test of the paper's claims: robust - standard with its interval, and the verdict."""

from __future__ import annotations

import pytest

from robint_ray.study.claims import AGREES, CONTRADICTS, UNCLEAR, claims, section, verdict
from robint_ray.study.config import PAPER


@pytest.mark.parametrize(
    "low, high, sign, expected",
    [
        (1.0, 2.0, 1, AGREES),
        (-2.0, -1.0, -1, AGREES),
        (1.0, 2.0, -1, CONTRADICTS),
        (-2.0, -1.0, 1, CONTRADICTS),
        (-1.0, 2.0, 1, UNCLEAR),
        (float("nan"), float("nan"), 1, UNCLEAR),
    ],
)
def test_verdict(low, high, sign, expected):
    assert verdict({"ci_low": low, "ci_high": high}, sign) == expected


def _evaluation(standard_clean, robust_clean, standard_pgd, robust_pgd):
    def model(clean, pgd):
        return {"pgd": {"per_image": {"clean": clean, "adversarial": pgd}}}

    return {"standard": model(standard_clean, standard_pgd), "robust": model(robust_clean, robust_pgd)}


def test_accuracy_claims_pair_the_same_images_and_follow_the_papers_direction():
    n = 40
    # robust: 4 of 40 fewer clean-correct images (the paper's direction), far more PGD-correct ones
    evaluation = _evaluation([1] * n, [1] * 36 + [0] * 4, [0] * n, [1] * 30 + [0] * 10)
    rows = claims({"evaluation": evaluation}, PAPER["cifar10"])
    clean, pgd = rows
    assert clean["difference"]["mean"] == pytest.approx(-10.0) and clean["difference"]["n"] == n
    assert clean["sign"] == -1 and clean["verdict"] == AGREES
    assert pgd["difference"]["mean"] == pytest.approx(75.0) and pgd["verdict"] == AGREES
    assert clean["values"] == {"standard": 100.0, "robust": 90.0}
    # the other way round contradicts the paper
    flipped = claims({"evaluation": _evaluation([0] * n, [1] * n, [1] * n, [0] * n)}, PAPER["cifar10"])
    assert [r["verdict"] for r in flipped] == [CONTRADICTS, CONTRADICTS]


def test_fid_inversion_and_attribution_claims():
    results = {
        "generation": {
            "fid": {"standard": 150.0, "robust": 90.0},
            "fid_draws": {"images_per_draw": 200, "robust - standard": {"per_draw": [-50.0, -61.0, -58.0, -55.0]}},
        },
        "inversion": {
            name: {
                "inv1": {"inception192_per_image": values},
                "inception192_inv1": sum(values),
            }
            for name, values in (("standard", [30.0, 31.0, 29.0]), ("robust", [31.0, 29.5, 30.0]))
        },
        "attributions": {
            "ig": {
                "difference": {
                    "gini": {"mean": 0.1, "ci_low": 0.05, "ci_high": 0.15, "n": 24},
                    "deletion_auc": {"mean": 0.02, "ci_low": 0.01, "ci_high": 0.03, "n": 24},
                }
            }
        },
    }
    rows = {r["claim"]: r for r in claims(results, PAPER["cifar10"])}
    fid = next(r for claim, r in rows.items() if "FID" in claim)
    assert fid["difference"]["mean"] == pytest.approx(-56.0) and fid["verdict"] == AGREES
    inv = next(r for claim, r in rows.items() if "Inv. 1" in claim)
    assert inv["difference"]["n"] == 3 and inv["verdict"] == UNCLEAR
    gini = next(r for r in rows.values() if r.get("metric") == "gini")
    deletion = next(r for r in rows.values() if r.get("metric") == "deletion_auc")
    assert gini["verdict"] == AGREES and deletion["verdict"] == CONTRADICTS  # deletion AUC should fall
    assert "4 claims" in section(list(rows.values())).text
