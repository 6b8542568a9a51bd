"""The committed CPU study (experiments/results/*_cpu-2core_*/, from experiments/cpu/cifar10_exact.yaml):
its checkpoints reproduce its Table 1 under `robint eval`, its report opens in headless Chromium, and
the README's column and summary say what its report.json says."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = sorted(p for p in (ROOT / "experiments" / "results").glob("*_cpu-2core_*") if (p / "report.json").exists())


@pytest.fixture(scope="module")
def run() -> Path:
    """The newest committed CPU study (the README's column comes from it)."""
    if not RUNS:  # a study still training has no report yet (its folder says so in STATUS.md)
        pytest.skip("no finished CPU study under experiments/results/ yet (experiments/cpu/run.sh makes one)")
    return RUNS[-1]


@pytest.fixture(scope="module")
def report(run) -> dict:
    return json.loads((run / "report.json").read_text())


@pytest.mark.parametrize("model", ["standard", "robust"])
def test_robint_eval_of_the_committed_checkpoints_gives_table_1(run, report, model, cifar_exact, tmp_path, run_cli):
    committed = report["results"]["evaluation"][model]["pgd"]
    out = tmp_path / "eval.json"
    checkpoint = run / "train" / model / "best"
    code, _, err = run_cli(["eval", "--checkpoint", checkpoint, "--data", cifar_exact, "--json", out])
    assert code == 0, err
    ours = json.loads(out.read_text())
    assert ours["n"] == committed["n"] == 1017
    assert (ours["clean_correct"], ours["adversarial_correct"]) == (
        committed["clean_correct"],
        committed["adversarial_correct"],
    )


def test_the_committed_results_hold_no_path_of_the_machine_that_ran_them(run):
    for path in [run / "report.html", *run.rglob("*.json"), *run.rglob("*.jsonl")]:
        text = path.read_text()
        assert not re.search(r'[" ](/work|/home|/root|/tmp)/', text), f"{path} holds an absolute path"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (apt-get install chromium)")
def test_the_committed_report_shows_every_table_and_figure_in_headless_chromium(run):
    from conftest import check_in_browser, screenshot

    html = (run / "report.html").read_text()
    shown = check_in_browser(run / "report.html")
    assert shown["tables"] == html.count("<table") >= 8
    assert shown["images"] == shown["images_loaded"] == html.count("<img") >= 13
    png = screenshot(run / "report.html", run / "report.png")  # committed beside the report
    assert png.stat().st_size > 50_000


def _readme_row(label: str) -> list[str]:
    prefix = f"| {label} |" if label else "| |"  # the header row's first cell is empty
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(prefix))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_the_readme_column_and_summary_agree_with_the_committed_report(run, report):
    results = report["results"]
    evaluation, generation, inversion = results["evaluation"], results["generation"], results["inversion"]
    expected = {
        "Table 1: clean accuracy (%)": [100 * evaluation[m]["pgd"]["clean_accuracy"] for m in ("standard", "robust")],
        "Table 1: PGD-20 accuracy, L2 eps 0.5 (%)": [
            100 * evaluation[m]["pgd"]["adversarial_accuracy"] for m in ("standard", "robust")
        ],
        "AutoAttack (APGD-CE + APGD-T) accuracy (%), not in the paper": [
            100 * evaluation[m]["autoattack"]["adversarial_accuracy"] for m in ("standard", "robust")
        ],
        "Table 2: FID of the generations against the test set": [generation["fid"][m] for m in ("standard", "robust")],
        "Table 3: Inception-192 distance of the inversions, Inv. 1": [
            inversion[m]["inception192_inv1"] for m in ("standard", "robust")
        ],
    }
    header = _readme_row("")
    first = header.index("this run: standard")  # the CPU study's two columns
    assert header[first + 1] == "this run: robust"
    for label, (standard, robust) in expected.items():
        cells = _readme_row(label)
        assert float(cells[first]) == pytest.approx(standard, abs=0.051), label
        assert float(cells[first + 1]) == pytest.approx(robust, abs=0.051), label
    # The opening paragraph's sentence counts the claims as the report's claims table does.
    counts = {v: sum(c["verdict"] == v for c in report["claims"]) for v in {c["verdict"] for c in report["claims"]}}
    opening = (ROOT / "README.md").read_text().split("\n## ")[0]
    sentence = re.search(r"Of the (\d+) claims .*? (\d+) agree .*?, (\d+) contradict", opening, re.S)
    assert sentence, "the README's opening paragraph has no summary of the CPU study"
    assert int(sentence[1]) == len(report["claims"])
    assert int(sentence[2]) == counts.get("agrees", 0) and int(sentence[3]) == counts.get("contradicts", 0)
    assert run.name in opening
