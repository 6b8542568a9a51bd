"""Every command's --out (and --json) through one storage layer: a URI robint cannot use is one line and
exit status 2 before any work or Ray starts; s3:// (moto's server on 127.0.0.1) and file:// land where
they say; an input (checkpoint, data) may live in the bucket too. And S3's retries: a store that stalls
for 30 s in the middle of a stage delays it, and every file of the stage is there, whole."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import stand_in_inception, tiny_model

from robint_ray.storage import Location

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"train": ROOT / "experiments" / "smoke" / "cifar10_standard.yaml"}


def _argv(command: str, checkpoint: str, out: str) -> list[str]:
    """A small run of `command` writing to `out` (eval and fid: their --json file inside it)."""
    model = ["--checkpoint", checkpoint, "--data", "sample"]
    return {
        "eval": ["eval", *model, "--n", "4", "--attack", "none", "--json", f"{out}/eval.json"],
        "fid": ["fid", "sample", "--split", "test", "sample", "--split", "train", "--dims", "64"]
        + ["--workers", "0", "--json", f"{out}/fid.json"],
        "explain": ["explain", "--method", "ig", *model, "--n", "2", "--steps", "2", "--baselines", "1"]
        + ["--metric-steps", "2", "--workers", "0", "--out", out],
        "invert": ["invert", *model, "--n", "2", "--steps", "2", "--out", out],
        "featvis": ["featvis", *model, "--features", "5", "--starts", "1", "--top", "2", "--steps", "2"]
        + ["--out", out],
        "generate": ["generate", *model, "--per-class", "1", "--steps", "1", "--shard-size", "5"]
        + ["--workers", "2", "--out", out],
        "train": ["train", str(CONFIGS["train"]), "--out", out],
        "tune": ["tune", str(ROOT / "experiments" / "smoke" / "sweep_cifar10_l2.yaml"), "--out", out],
        "study": ["study", str(ROOT / "experiments" / "smoke" / "paper_cifar10.yaml"), "--out", out],
    }[command]


WRITES = {  # what each command leaves at its --out
    "eval": ["eval.json"],
    "fid": ["fid.json"],
    "explain": ["attributions.npz", "metrics.json", "grid.png"],
    "invert": ["inversions.npz", "inversions-image.png"],
    "featvis": ["featvis.npz", "featvis.png"],
    "generate": ["generated.npz", "summary.json", "classes.png", "shards"],
}
COMMANDS = [*WRITES, "train", "tune", "study"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from robint_ray.checkpoint import save_checkpoint

    return str(save_checkpoint(tmp_path_factory.mktemp("ckpt") / "best", tiny_model()))


@pytest.fixture
def no_ray(monkeypatch):
    """Any start of Ray (or of a fan-out) fails the test: distributed.init_ray, and the name it has in
    every module of the package already loaded (a module loaded later takes the stand-in)."""
    from robint_ray import distributed

    def started(*args, **kwargs):
        raise AssertionError("Ray was started")

    real = distributed.init_ray
    for module in [m for name, m in sys.modules.items() if name.startswith("robint_ray")]:
        if getattr(module, "init_ray", None) is real:
            monkeypatch.setattr(module, "init_ray", started)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("out", ["gs://bkt/x", "S3://bkt/x", "s3://", "s3://bkt/x?region=eu-west-1", "s3a://bkt/x"])
def test_a_uri_robint_cannot_use_is_one_line_before_anything_starts(command, out, checkpoint, run_cli, no_ray):
    started = time.monotonic()
    code, stdout, err = run_cli(_argv(command, checkpoint, out))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"robint {command}: error: {out}") and stdout == ""
    assert time.monotonic() - started < 10  # (gs:// once hung `robint train` for minutes)


BAD_SETTINGS = {  # a setting of the command's own that is wrong, and what its one line says
    "eval": (["--workers", "2", "--attack", "pgd", "--eps", "-1"], "eps must be >= 0"),
    "explain": (["--workers", "2", "--steps", "0"], "ig.steps must be an integer >= 1"),
    "invert": (["--workers", "2", "--step-size", "0"], "step size must be > 0"),
    "featvis": (["--workers", "2", "--norm", "l3"], "unknown norm"),
    "generate": (["--steps", "0"], "steps must be an integer >= 1"),
}


@pytest.mark.parametrize("command", list(BAD_SETTINGS))
def test_bad_settings_are_one_line_before_ray_starts(command, checkpoint, tmp_path, run_cli, no_ray):
    extra, message = BAD_SETTINGS[command]
    code, stdout, err = run_cli(_argv(command, checkpoint, str(tmp_path / "out")) + extra)
    assert code == 2 and err.startswith(f"robint {command}: error: ") and stdout == "", err
    assert len(err.strip().splitlines()) == 1 and message in err, err


OLD_KEYS = {  # a config of the layout before the PGD budget became one `pgd` mapping, and its one line
    "train": ("train", "config key 'pgd.random_start' moved: write it as pgd_random_start: ..."),
    "study's training config": ("study", "config key 'pgd.random_start' moved: write it as pgd_random_start: ..."),
    "study": ("study", "config key 'evaluation.eps' moved: write it as evaluation: {pgd: {eps: ...}}"),
}


@pytest.mark.parametrize("case", list(OLD_KEYS))
def test_a_key_of_the_old_layout_is_one_line_naming_the_new_one_before_ray_starts(case, tmp_path, run_cli, no_ray):
    command, message = OLD_KEYS[case]
    train = (ROOT / "experiments" / "smoke" / "cifar10_standard.yaml").read_text()
    if case != "study":
        budget = "pgd: {norm: l2, eps: 0.5, step_size: 0.1, steps: 5}"
        assert budget in train
        train = train.replace(budget, budget[:-1] + ", random_start: false}")
    (tmp_path / "standard.yaml").write_text(train)
    study = "standard: {train: standard.yaml}\nrobust: {checkpoint: /nowhere}\n"
    (tmp_path / "study.yaml").write_text(study + ("evaluation: {eps: 0.25}\n" if case == "study" else ""))
    config = tmp_path / ("standard.yaml" if command == "train" else "study.yaml")
    code, stdout, err = run_cli([command, config, "--out", tmp_path / "out"])
    assert code == 2 and stdout == "" and err.startswith(f"robint {command}: error: "), err
    assert len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.ray
@pytest.mark.parametrize("command", list(WRITES))
def test_file_uris_are_the_local_folder(command, checkpoint, tmp_path, run_cli, ray_local, stand_in):
    folder = tmp_path / "a b" / "out"  # %20 in the URI
    code, _, err = run_cli(_argv(command, checkpoint, f"file://{tmp_path}/a%20b/out"))
    assert code == 0, err
    assert set(WRITES[command]) <= {p.name for p in folder.iterdir()}, sorted(folder.iterdir())
    assert not (Path.cwd() / "file:").exists()


@pytest.mark.parametrize("command", [c for c in WRITES if c != "generate"])
def test_s3_outputs_land_in_the_bucket_and_inputs_come_from_it(
    command, checkpoint, tmp_path, run_cli, s3_server, stand_in, monkeypatch
):
    """In process (--workers 0 where a command fans out; no Ray): the model is read from the bucket,
    eval's data too, and every file is written there, none here."""
    from robint_ray.data import sample_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBINT_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    bucket = Location(s3_server())
    (bucket / "ckpt").upload(checkpoint)
    argv = _argv(command, (bucket / "ckpt").uri, (bucket / "out").uri)
    if command == "eval":
        (bucket / "data" / "sample.npz").upload(sample_path())
        argv[argv.index("sample")] = (bucket / "data" / "sample.npz").uri
    code, _, err = run_cli(argv)
    assert code == 0, err
    assert set(WRITES[command]) <= set((bucket / "out").list())
    assert list(tmp_path.iterdir()) == []


def _wired(command: str, monkeypatch) -> dict:
    """Replace what train, tune and study run with a recorder of the run folder it is handed."""
    from robint_ray import study, train, tune

    seen: dict = {}

    def record(where):
        seen["out"] = Location(where)
        raise SystemExit(0)

    if command == "train":
        monkeypatch.setattr(train, "run", lambda cfg, run_dir, **kw: record(run_dir))
    elif command == "tune":
        monkeypatch.setattr(tune, "run_sweep", lambda sweep, sweep_dir, **kw: record(sweep_dir))
    else:
        monkeypatch.setattr(study.Study, "run", lambda self: record(self.out))
    return seen


@pytest.mark.parametrize("command", ["train", "tune", "study"])
def test_train_tune_and_study_run_in_the_location_out_names(command, tmp_path, run_cli, s3_server, monkeypatch):
    """Their runs write through the Location they are handed (test_train_ray, test_tune, test_study and
    test_two_nodes run them on local folders and in a bucket); here: that --out reaches them as that
    Location, a file:// URI as its local folder, a bucket once it answers."""
    bucket = s3_server()
    for out, expected in [
        (f"file://{tmp_path}/run", Location(tmp_path / "run")),
        (f"{bucket}/run/", Location(f"{bucket}/run")),
    ]:
        seen = _wired(command, monkeypatch)
        code, _, err = run_cli(_argv(command, "", out))
        assert code == 0 and seen["out"] == expected, err
    code, _, err = run_cli(_argv(command, "", "s3://no-such-bucket-robint/run"))
    assert code == 2 and "no bucket 'no-such-bucket-robint'" in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def stand_in(monkeypatch):
    """`robint fid` with a cheap stand-in for the FID Inception."""
    from robint_ray import inception

    monkeypatch.setattr(inception, "load_fid_inception", lambda *a, **k: stand_in_inception(64))


# --- S3 retries: a store that stalls in the middle of a stage ---------------------------------------------


class StallingProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server. When a request whose bytes hold `trigger`
    passes, it forwards nothing in either direction (on every connection, new ones included) for
    `seconds`, then goes on as if nothing happened."""

    def __init__(self, port: int, *, trigger: bytes, seconds: float):
        self.upstream, self.trigger, self.seconds = ("127.0.0.1", port), trigger, seconds
        self.stalled_at: float | None = None
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, request: bool) -> None:
        try:
            while data := source.recv(65536):
                if request and self.stalled_at is None and self.trigger in data:
                    self.stalled_at = time.monotonic()
                while self.stalled_at is not None and time.monotonic() < self.stalled_at + self.seconds:
                    time.sleep(0.05)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


@pytest.mark.slow  # the 30 s stall and a generate run of its own Ray: about 70 s on 2 cores
@pytest.mark.ray
def test_a_stage_survives_a_store_that_stalls_for_30_s(s3_server, checkpoint, tmp_path):
    """`robint generate --out s3://...` (shards written by Ray tasks, then the merged file and figures by
    the driver) through a proxy that stops forwarding for 30 s when the fourth of ten shards is being
    written: requests make no progress, time out and are retried (storage.S3_ATTEMPTS,
    S3_REQUEST_TIMEOUT_S); the run ends well, with every shard there and whole, and the merged file
    made of them all."""
    from robint_ray.generate import read_npz

    out = Location(s3_server()) / "gen"
    proxy = StallingProxy(int(s3_server.endpoint.rsplit(":", 1)[1]), trigger=b"shard-00003", seconds=30)
    env = {**os.environ, **s3_server.env, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    env.pop("RAY_ADDRESS", None)
    argv = ["generate", "--checkpoint", checkpoint, "--data", "sample", "--per-class", "2", "--steps", "1"]
    argv += ["--shard-size", "2", "--workers", "2", "--out", out.uri]
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "robint_ray", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
    finally:
        proxy.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proxy.stalled_at is not None and time.monotonic() - started > 30
    names = (out / "shards").list()
    assert names == [f"shard-{i:05d}.npz" for i in range(10)], names  # no temporary or half file beside them
    shards = [read_npz(out / "shards" / name) for name in names]  # each one whole: it opens
    merged = read_npz(out / "generated.npz")
    np.testing.assert_array_equal(merged["images"], np.concatenate([shard["images"] for shard in shards]))
    assert merged["images"].shape == (20, 32, 32, 3)
    assert {"classes.png", "seeds.png", "summary.json"} <= set(out.list())
