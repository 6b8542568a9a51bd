"""Which Ray init_ray uses: $RAY_ADDRESS, else the cluster `ray start` recorded on this machine if it
answers, else a private local instance. (Joining a real `ray start` cluster: tests/test_two_nodes.py.)"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from robint_ray.ray_address import recorded_cluster, running_cluster

ROOT = Path(__file__).resolve().parents[1]


def test_running_cluster_is_ray_address_then_a_live_recorded_one(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert recorded_cluster() is None and running_cluster() is None  # nothing recorded: a private instance
    with socket.socket() as gcs:  # a listening socket stands in for a live GCS
        gcs.bind(("127.0.0.1", 0))
        gcs.listen()
        address = f"127.0.0.1:{gcs.getsockname()[1]}"
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(address + "\n")
        assert recorded_cluster() == address and running_cluster() == address
    assert running_cluster() is None  # recorded, but nothing answers there any more (a stale file)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert running_cluster() == "10.0.0.1:6379"


def test_import_keeps_ray_on_loopback_unless_it_joins_a_cluster_elsewhere(tmp_path, monkeypatch):
    """`import robint_ray` keeps a local Ray on 127.0.0.1 (ray_address.loopback_only) by the same rule
    init_ray joins by (running_cluster): a live cluster recorded at another address, or $RAY_ADDRESS,
    leaves it alone; a stale record does not (init_ray then starts a private instance)."""
    from robint_ray.ray_address import loopback_only

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("ROBINT_LOOPBACK", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert loopback_only()  # nothing recorded
    (tmp_path / "ray").mkdir()
    for host, loopback in [("127.0.0.1", True), ("127.0.0.2", False)]:  # 127.0.0.2: "another machine"
        with socket.socket() as gcs:
            gcs.bind((host, 0))
            gcs.listen()
            (tmp_path / "ray" / "ray_current_cluster").write_text(f"{host}:{gcs.getsockname()[1]}\n")
            assert loopback_only() is loopback, host
    assert loopback_only()  # the record of 127.0.0.2 is stale now
    monkeypatch.setenv("ROBINT_LOOPBACK", "0")
    assert not loopback_only()
    monkeypatch.delenv("ROBINT_LOOPBACK")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not loopback_only()


def test_importing_the_package_loads_no_ray_layer():
    """`import robint_ray` reads the recorded cluster through ray_address alone: no Ray, no distributed."""
    code = (
        "import sys, robint_ray; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'ray' or m == 'robint_ray.distributed'); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
