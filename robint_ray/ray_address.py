"""Which Ray this process uses: the running cluster it joins, or a private local instance.

The one rule, used by `distributed.init_ray` (join or start), by the package's __init__ (keep a local
instance on 127.0.0.1) and by `robint doctor` (which cluster to check): the cluster this process joins
is $RAY_ADDRESS (as `ray job submit` sets it), else the one `ray start` recorded on this machine if its
GCS answers; with none, it starts its own. `joined_cluster` says afterwards which of the two happened.
Imports nothing of Ray and nothing of this package: `import robint_ray` reads it before Ray loads.
"""

from __future__ import annotations

import os
import socket

_JOINED = False  # set by distributed.init_ray (mark_joined) when it joined a running cluster


def recorded_cluster_file() -> str:
    """Where `ray start` on this machine records its cluster's address: Ray's default temp folder
    ($RAY_TMPDIR, else $TMPDIR, else /tmp), then ray/ray_current_cluster (`ray stop` removes it)."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(base, "ray", "ray_current_cluster")


def recorded_cluster() -> str | None:
    """The address ("ip:port") that `ray start` on this machine recorded for its cluster
    (`recorded_cluster_file`), or None. The file is Ray's documented way of finding "the cluster on this
    machine" (ray.init's address="auto"); read here directly, since the helper that reads it is private."""
    try:
        text = open(recorded_cluster_file()).read().strip()
    except OSError:
        return None
    return text or None


def tcp_answers(address: str, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections at "host:port" (a live GCS, not a stale file)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def running_cluster() -> str | None:
    """The cluster this process joins: $RAY_ADDRESS (as set by `ray job submit`), else the cluster
    that `ray start` recorded on this machine if its GCS answers; None where there is none (then a
    private local instance starts)."""
    address = os.environ.get("RAY_ADDRESS")
    if address:
        return address
    recorded = recorded_cluster()
    return recorded if recorded and tcp_answers(recorded) else None


def loopback_only() -> bool:
    """Whether a Ray instance this process starts keeps every socket on 127.0.0.1: yes, unless the
    process joins a cluster (`running_cluster`) named by $RAY_ADDRESS or recorded at an address other
    than 127.0.0.1, or ROBINT_LOOPBACK=0 says so (a driver that will join a multi-node cluster by an
    explicit address)."""
    if os.environ.get("ROBINT_LOOPBACK", "1") == "0" or os.environ.get("RAY_ADDRESS"):
        return False
    address = running_cluster()
    return address is None or address.startswith("127.0.0.1:")


def mark_joined() -> None:
    """Record that this process joined a running cluster (called by distributed.init_ray)."""
    global _JOINED
    _JOINED = True


def joined_cluster() -> bool:
    """Whether this process joined a running cluster (where an autoscaler may add what is short),
    rather than starting its private instance."""
    return _JOINED
