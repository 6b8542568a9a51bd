"""glibc malloc tuning: with it, a 64 MiB tensor comes from the heap instead of a fresh mmap, in a robint
process and in a Ray task; without it (ROBINT_TUNE_MALLOC=0, or off glibc) nothing changes.

Read through glibc's mallinfo2(): hblkhd is the number of bytes held in mmapped blocks."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from robint_ray.distributed import Tasks, fan_out

MIB = 1 << 20

PROBE = """
import ctypes, torch
from robint_ray.allocator import tune_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2

def mapped_bytes_of_a_64_mib_tensor():
    before = mallinfo2().hblkhd
    tensor = torch.ones(16 * 2**20)  # 64 MiB of float32
    return mallinfo2().hblkhd - before
"""


def _has_mallinfo2() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION")) and hasattr(ctypes.CDLL(None), "mallinfo2")
    except (AttributeError, ValueError, OSError):
        return False


pytestmark = pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")


def _probe(env: dict[str, str]) -> tuple[str, int]:
    code = PROBE + "tuned = tune_allocator()\nprint(tuned, mapped_bytes_of_a_64_mib_tensor())\n"
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "ROBINT_TUNE_MALLOC")
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


def test_tuned_process_takes_big_tensors_from_the_heap():
    tuned, mapped = _probe({})
    assert tuned == "True"
    assert mapped < MIB


def test_switched_off_glibc_defaults_map_big_tensors():
    tuned, mapped = _probe({"ROBINT_TUNE_MALLOC": "0"})
    assert tuned == "False"
    assert mapped >= 64 * MIB


def test_glibc_variables_set_by_the_user_win():
    tuned, mapped = _probe({"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})  # the user wants everything mapped
    assert tuned == "False"
    assert mapped >= 64 * MIB


@pytest.mark.ray
def test_ray_tasks_run_tuned(ray_local):
    def mapped_in_task(_shard):
        namespace: dict = {}
        exec(PROBE, namespace)  # noqa: S102 - the probe above, defined inside the task's process
        return namespace["mapped_bytes_of_a_64_mib_tensor"]()

    mapped = fan_out(mapped_in_task, [0, 1], tasks=Tasks(2, cpus=1, gpus=0), progress=False)
    assert all(m < MIB for m in mapped)
