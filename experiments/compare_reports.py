"""Do two study reports hold the same numbers? For a change that must not move the figures (a refactor).

    python experiments/compare_reports.py runs/before/report.json runs/after/report.json [--rtol 1e-8]

Walks both reports' `results` (every stage's numbers) and `run_settings`, and lists each value that
differs: a number beyond rtol (relative), or any other value. Left out: what changes from run to run
by nature (stage and epoch times, throughput, the nodes and devices tasks ran on, paths under each run's own folder, the
FID weights' location). Exit status 1 where anything differs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Iterator

SKIPPED = {"_seconds", "_nodes", "_devices", "figures", "figure", "shards", "checkpoint", "config"}
TIMED = ("_seconds", "_per_s")  # a training epoch's times and throughput


def differences(a: Any, b: Any, rtol: float, path: str = "") -> Iterator[str]:
    """'path: a != b' for every leaf where a and b differ (numbers: beyond rtol)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key in SKIPPED or key.endswith(TIMED):
                continue
            if key not in a or key not in b:
                yield f"{path}/{key}: only in {'the second' if key not in a else 'the first'}"
            else:
                yield from differences(a[key], b[key], rtol, f"{path}/{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, rtol, f"{path}[{i}]")
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if not math.isclose(a, b, rel_tol=rtol, abs_tol=rtol * 1e-6):
            yield f"{path}: {a!r} != {b!r}"
    elif a != b:
        yield f"{path}: {a!r} != {b!r}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--rtol", type=float, default=1e-8, help="relative tolerance for numbers (default 1e-8)")
    args = parser.parse_args(argv)
    a, b = (json.load(open(path)) for path in (args.first, args.second))
    found = [d for key in ("results", "run_settings") for d in differences(a[key], b[key], args.rtol, key)]
    print("\n".join(found) if found else f"the same numbers (rtol {args.rtol:g})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
