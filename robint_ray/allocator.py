"""glibc's malloc, set up for the large, short-lived CPU tensors of a forward and backward pass.

By default glibc serves every allocation above a threshold (dynamic, at most 32 MiB on 64-bit Linux)
with a fresh mmap and unmaps it when freed, and it returns free memory at the top of the heap to the
system once more than 128 KiB lie there. A CIFAR ResNet18 pass over 204 points has activations of 53 MB
each: every pass maps them anew, and the kernel zero-fills each 4 KiB page on first touch. On this
project's 2-core machine (experiments/benchmarks/bench_malloc.py), forward + backward of 204-point
passes ran at 62 points/s with the defaults and at 93 with both thresholds at 1 GiB, and the speed then
no longer depended on the pass size (48 to 204 points: 85-93 points/s; with the defaults 83 at 48
points, 62 at 204). The price: freed blocks stay in the process for reuse, and the peak memory of that
benchmark grew from 2.4 to 3.1 GB. PyTorch's CPU tuning guide reaches the same end with jemalloc or
tcmalloc through LD_PRELOAD; `mallopt` needs no extra library and can be set in a running process.

`tune_allocator()` raises both thresholds to 1 GiB: big blocks come from the heap and stay there for
the next pass. robint calls it in its CLI, in every Ray task of `distributed.fan_out` and in every Ray
Train worker; library users call it themselves. It does nothing off glibc, when the user set glibc's
own variables (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, read at process start), or with
ROBINT_TUNE_MALLOC=0. It only affects CPU memory; CUDA tensors have their own caching allocator.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

log = logging.getLogger(__name__)

THRESHOLD_BYTES = 1 << 30  # blocks up to 1 GiB from the heap; up to 1 GiB of free heap kept for reuse
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


@functools.cache
def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB for this process (see the module docstring).
    Idempotent (the first call decides); returns whether the thresholds are now robint's."""
    if os.environ.get("ROBINT_TUNE_MALLOC", "1") == "0":
        log.debug("glibc malloc left at its defaults: ROBINT_TUNE_MALLOC=0")
        return False
    if any(name in os.environ for name in _GLIBC_VARIABLES):
        log.debug("glibc malloc left as the user set it (%s)", ", ".join(_GLIBC_VARIABLES))
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (AttributeError, ValueError, OSError):  # not Linux, or a libc without this name (musl)
        return False
    mallopt = ctypes.CDLL(None).mallopt  # glibc is loaded into every process that got here
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, THRESHOLD_BYTES))
    log.debug("glibc malloc thresholds at %d bytes: %s", THRESHOLD_BYTES, applied)
    return applied


def tuned_malloc_label() -> str:
    """Tune this process as robint's CLI and Ray workers are tuned (ROBINT_TUNE_MALLOC=0 keeps glibc's
    defaults, here and in Ray), and say which setting it runs with: the line benchmarks print."""
    return "robint's malloc thresholds" if tune_allocator() else "glibc's default malloc thresholds"
