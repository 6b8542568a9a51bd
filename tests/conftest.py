"""Shared fixtures: paths to ../shared (skipped with a reason where absent), the pretrained
ResNet-20, the tiny model, a command-line runner, and one local Ray instance for the whole test session."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

import robint_ray  # noqa: F401  (first: it keeps a local Ray instance on 127.0.0.1, see its __init__)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR_EXACT = SHARED / "data" / "cifar10" / "cifar10_exact_subset.npz"
IMAGENETTE = SHARED / "data" / "imagenette-128"
RESNET20 = SHARED / "models" / "cifar10-resnet-akamaster" / "resnet20-12fca82f.th"

torch.set_num_threads(min(2, os.cpu_count() or 1))


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (run on a GPU machine)")
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    """A test taking `device` runs on the CPU and, where there is one, again on a CUDA GPU, with TF32
    off and cuDNN's deterministic algorithms there, so that comparisons with references hold to fp32
    precision as on the CPU. With cuDNN's defaults, reruns of the same PGD differed on an H100
    (experiments/benchmarks/cudnn_determinism.py), and our PGD and torchattacks' once ended 8e-5 apart."""
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark
    cudnn.allow_tf32 = matmul.allow_tf32 = cudnn.benchmark = False
    cudnn.deterministic = True
    try:
        yield torch.device("cuda")
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved


def tiny_model(seed: int = 0, dtype=torch.float32):
    """The tests' tiny model: a CIFAR ResNet-8 with the random weights of torch.manual_seed(seed), in
    eval mode (tests with expected numbers depend on this very model: same architecture, same seed)."""
    from robint_ray.models import build_model

    torch.manual_seed(seed)
    return build_model("cifar_resnet8").to(dtype).eval()


def stand_in_inception(width: int):
    """A cheap stand-in for the FID Inception (its `features(x, dims)`: a fixed projection of the
    preprocessed image pooled to 4 x 4, `width` features), defined in a function so that Ray ships it by
    value."""
    from torch import nn

    class StandIn(nn.Module):
        weights_info = {"sha256": "stand-in", "source": "test"}

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.project = nn.Linear(3 * 4 * 4, width)

        @torch.no_grad()
        def features(self, x, dims=width):
            return self.project(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))[:, :dims]

    return StandIn().eval()


@pytest.fixture(scope="module")
def tiny():
    """tiny_model() once per test module (tests that change it, e.g. its training mode, put it back)."""
    return tiny_model()


@pytest.fixture
def run_cli(capsys):
    """Runs `robint ARGV...` in this process, as robint_ray.cli.main(argv); returns (exit status,
    stdout, stderr), the output being all that was printed since the test's last capsys.readouterr()."""
    from robint_ray.cli import main

    def run(argv) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as stop:  # argparse
            code = stop.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is not beside this clone)")
    return path


@pytest.fixture(scope="session")
def cifar_exact() -> Path:
    """The 5,438 + 1,017 exact CIFAR-10 images of ../shared."""
    return _need(CIFAR_EXACT)


@pytest.fixture(scope="session")
def imagenette() -> Path:
    return _need(IMAGENETTE)


@pytest.fixture(scope="session")
def resnet20_path() -> Path:
    return _need(RESNET20)


@pytest.fixture(scope="session")
def resnet20(resnet20_path):
    """The pretrained CIFAR-10 ResNet-20 (91.6 % on the 1,017 exact test images), eval mode."""
    from robint_ray.checkpoint import load_weights

    return load_weights("cifar_resnet20", resnet20_path)


@pytest.fixture(scope="session")
def sample_test():
    """The bundled real CIFAR-10 sample's test split as tensors (500 images)."""
    from robint_ray.data import load_split, stack

    return stack(load_split("sample", "test"))


def token_auth_env(folder: Path) -> dict[str, str]:
    """Environment for the Ray processes of a test cluster with token authentication: a fresh token
    (as `ray get-auth-token --generate` makes) in folder, not the machine's ~/.ray/auth_token, which a
    fresh machine does not have and `ray start` does not create."""
    import secrets

    path = Path(folder) / "auth_token"
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def run_in_namespaces(shell: str, folder: Path, **env: str):
    """Runs `bash -c SHELL` in private network, PID and mount namespaces (every process it starts ends
    with them) with token authentication (the token in folder), this Python's folder first on PATH, no
    RAY_ADDRESS and env's extra variables; asserts that it exits 0 and returns the CompletedProcess."""
    import sys

    env = {
        **os.environ,
        **token_auth_env(folder),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        **env,
    }
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        ["unshare", "--kill-child", "-n", "-m", "-p", "-f", "--mount-proc", "bash", "-c", shell],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def live_actors(classes: tuple[str, ...]) -> dict[str, str]:
    """Actor id -> class name of the actors of these classes not (yet) dead in the connected Ray
    instance, through Ray's public state API (served by the dashboard, which init_ray's local Ray runs
    on 127.0.0.1), asked at the connected instance's address: with none, it looks for a Ray on this
    machine and fails where it finds several (other test runs, a study)."""
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    alive = list_actors(address=address, filters=[("state", "!=", "DEAD")], limit=10_000)
    return {a.actor_id: a.class_name for a in alive if a.class_name in classes}


@pytest.fixture(scope="session")
def ray_local(request):
    """One private local Ray instance (2 CPUs, loopback only) for every Ray test of the session. It
    starts after the S3 stand-in (where moto is installed), so that its workers inherit the endpoint and
    a driver joined to it writes to a bucket as its own local Ray would let it (tests/test_train_ray.py)."""
    import ray

    from robint_ray.distributed import init_ray

    try:
        request.getfixturevalue("s3_server")
    except pytest.skip.Exception:
        pass  # no moto: the tests that need S3 skip, the others run
    init_ray("local", num_cpus=2)  # never a cluster that happens to run on this machine
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto's server mode) on 127.0.0.1 for the session, with fake
    credentials and AWS_ENDPOINT_URL set for this process and its children (Ray workers started after
    it). Yields a function that creates a fresh bucket and returns its s3:// URI."""
    import socket
    import sys
    import time
    import uuid

    pytest.importorskip("moto", reason="moto[server] is not installed (pip install 'moto[server]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)

    def new_bucket() -> str:
        from pyarrow import fs

        name = f"robint-{uuid.uuid4().hex[:12]}"
        fs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(name)
        return f"s3://{name}"

    new_bucket.endpoint = endpoint
    new_bucket.env = env
    try:
        yield new_bucket
    finally:
        server.terminate()
        server.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- the report in headless Chromium ---------------------------------------------------------------


def _chromium(chromium: str | None) -> str:
    browser = chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise FileNotFoundError("no chromium on PATH")
    return browser


# Headless Chromium that reaches nothing outside the page (the report has no external files).
_HEADLESS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def screenshot(
    page: str | Path, png: str | Path, *, size: tuple[int, int] = (1280, 3200), chromium: str | None = None
) -> Path:
    """A PNG of the top `size` (width, height px) of a report as headless Chromium draws it."""
    png = Path(png).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                _chromium(chromium),
                *_HEADLESS,
                f"--user-data-dir={tmp}/profile",
                f"--window-size={size[0]},{size[1]}",
                "--virtual-time-budget=10000",
                f"--screenshot={png}",
                Path(page).resolve().as_uri(),
            ],
            capture_output=True,
            timeout=120,
            check=True,
        )
    return png


def check_in_browser(page: str | Path, *, chromium: str | None = None, timeout: float = 120) -> dict[str, int]:
    """Open a report in headless Chromium and count its tables, its figures and the figures that
    decoded (naturalWidth > 0). A copy of the page with a small script is opened, never the report."""
    browser = _chromium(chromium)
    probe = (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images]; "
        "document.title = 'CHECK ' + document.querySelectorAll('table').length + ' ' + imgs.length + ' ' "
        "+ imgs.filter(i => i.complete && i.naturalWidth > 0).length; });</script>"
    )
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "page.html"
        copy.write_text(Path(page).read_text().replace("</body>", probe + "</body>"))
        out = subprocess.run(
            [
                browser,
                *_HEADLESS,
                f"--user-data-dir={tmp}/profile",
                "--virtual-time-budget=10000",
                "--dump-dom",
                copy.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        ).stdout
    match = re.search(r"<title>CHECK (\d+) (\d+) (\d+)</title>", out)
    if match is None:
        raise RuntimeError("the page did not load in Chromium")
    tables, images, loaded = map(int, match.groups())
    return {"tables": tables, "images": images, "images_loaded": loaded}
