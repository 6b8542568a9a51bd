"""The study as one job: its config, its report, resuming after a kill. `ray job submit` to a
two-node cluster: tests/test_two_nodes.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robint_ray.errors import InputError
from robint_ray.report import Section, Table, write_report
from robint_ray.study import load_study

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke" / "paper_cifar10.yaml"


def test_study_configs_load():
    for path in [SMOKE, *sorted((ROOT / "experiments" / "paper").glob("*.yaml"))]:
        config = load_study(path)
        assert Path(config.standard.train).is_file() and Path(config.robust.train).is_file()


def test_study_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMOKE.read_text() + "\ngeneraton: {per_class: 3}\n")
    with pytest.raises(InputError, match="unknown config key 'generaton'"):
        load_study(bad)
    bad.write_text("standard: {train: a.yaml, checkpoint: b}\nrobust: {train: a.yaml}\n")
    with pytest.raises(InputError, match="standard: give exactly one of train"):
        load_study(bad)
    bad.write_text(SMOKE.read_text().replace("per_class: 10", "per_class: ten"))
    with pytest.raises(InputError, match="generation.per_class' must be an integer"):
        load_study(bad)


def test_report_is_self_contained(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "f.png")
    page = write_report(
        tmp_path / "out",
        title="t",
        data={"fid": 1.5},
        sections=[
            Section("S", "text", [Table("T", ["a", "b"], [["x", 0.123456]])], [("a figure", tmp_path / "f.png")])
        ],
    )
    text = page.read_text()
    assert "data:image/png;base64," in text and "<td>0.1235</td>" in text and 'src="http' not in text
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == {"fid": 1.5}


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_tables_and_figures_show_in_headless_chromium(tmp_path):
    from conftest import check_in_browser
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 30), (i * 80, 20, 200)).save(tmp_path / f"{i}.png")
    page = write_report(
        tmp_path / "out",
        title="t",
        data={},
        sections=[
            Section(
                "A",
                "",
                [Table("T1", ["a"], [[1]]), Table("T2", ["b"], [[2]])],
                [(f"figure {i}", tmp_path / f"{i}.png") for i in range(3)],
            )
        ],
    )
    assert check_in_browser(page) == {"tables": 2, "images": 3, "images_loaded": 3}


def smoke_config(tmp_path: Path, **sizes) -> Path:
    """The smoke study, smaller still (tests must be quick): fewer images and steps."""
    text = SMOKE.read_text()
    for old, new in sizes.items():
        assert old in text, f"{old!r} is no longer in {SMOKE.name}: the test would run it at full size"
        text = text.replace(old, new)
    for name in ("cifar10_standard.yaml", "cifar10_robust_l2.yaml"):
        shutil.copy(SMOKE.parent / name, tmp_path / name)
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


# Each model trains 2 epochs on 256 of the sample's training images (64 held out, 64 test images at
# the end). FID takes 5 training images a class and the Inception's 192 features (the layers before its
# second max-pool: a quarter of its cost; the statistics, 192 x 192, still travel through the object store).
TRAIN = "epochs=2, data.train_n=256, data.val_n=64, data.test_n=64"
TINY = {
    "epochs=15": TRAIN,
    "epochs=10": TRAIN,
    "n: 200,": "n: 40,",
    "autoattack_n: 50": "autoattack_n: 8",
    "n: 24,": "n: 6,",
    "steps: 300": "steps: 20",
    "steps: 150": "steps: 10",
    "steps: 60": "steps: 5",
    "per_class: 10": "per_class: 4",
    "real_per_class: 50": "real_per_class: 5",
    "fid_dims: 2048": "fid_dims: 192",
    "shard_size: 25": "shard_size: 5",
}


@pytest.mark.slow
def test_killed_in_generation_resumes_without_redoing(tmp_path):
    config, out = smoke_config(tmp_path, **TINY), tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "robint_ray", "study", str(config), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = out / "generation" / "standard" / "shards"
    deadline = time.time() + 1200
    while not (shards.is_dir() and any(shards.glob("shard-*.npz"))):
        assert proc.poll() is None and time.time() < deadline, "the study ended before generation"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "generation" / "result.json").exists()
    before = {p: p.stat().st_mtime_ns for p in [*out.glob("*/result.json"), *shards.glob("shard-*.npz")]}
    assert len([p for p in before if p.name == "result.json"]) == 3  # train, evaluation, attributions
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=1800)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # nothing done twice
    assert (out / "report.html").is_file() and (out / "report.json").is_file()
