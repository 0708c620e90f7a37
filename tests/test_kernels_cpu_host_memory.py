"""mlm.kernels.cpu_host_memory: freed host buffers are reused instead of being faulted in again."""

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the settings are glibc's",
)

# Allocates, touches and frees a 64 MiB buffer 6 times; reports the page faults of the last 5
# and the bytes glibc held in mmapped blocks while one buffer was alive. (How many faults a
# fresh buffer costs depends on the kernel's page and folio sizes: 544 on a 6.18 kernel.)
PROBE = """
import ctypes, json, resource, sys
import numpy as np
from mlm.kernels import cpu_host_memory as host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = host_memory.keep_freed_host_memory() if sys.argv[1] == "apply" else None
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = np.ones(8 * 2**20)  # 64 MiB, every page written
    mmapped = libc.mallinfo2().hblkhd
    del buffer
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults[1:], "mmapped": mmapped}))
"""
BUFFER_BYTES = 64 * 2**20


def probe(mode: str, **env: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_freed_buffers_are_reused_without_page_faults():
    record = probe("apply")
    assert record["applied"] is True
    assert record["mmapped"] < BUFFER_BYTES  # served from the heap, not a fresh mmap
    # Each repeat reuses the pages of the previous buffer: none is faulted in again.
    assert max(record["faults"]) < 20, record


def test_default_malloc_faults_every_page_in_again():
    # The behaviour the settings remove: glibc maps each large buffer afresh.
    record = probe("leave")
    assert record["mmapped"] >= BUFFER_BYTES
    assert min(record["faults"]) >= 100, record


def test_opt_out_variable_leaves_malloc_alone():
    record = probe("apply", MLM_KEEP_HOST_MEMORY="0")
    assert record["applied"] is False
    assert record["mmapped"] >= BUFFER_BYTES
