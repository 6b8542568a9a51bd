"""Small helpers on local files that several modules need (one implementation each)."""

from __future__ import annotations

import hashlib
import os


def file_hash(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of a local file's bytes under `algorithm` (any name hashlib.new takes), read in
    1 MiB blocks so a large weights file is never held in memory whole."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
