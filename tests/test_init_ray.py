"""Which Ray init_ray uses: $RAY_ADDRESS, else the cluster `ray start` recorded on this machine if it
answers, else a private local instance. (Joining a real `ray start` cluster: tests/test_two_nodes.py.)"""

from __future__ import annotations

import socket

from robint_ray.distributed import recorded_cluster, running_cluster


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
