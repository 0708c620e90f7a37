"""Host memory on CPU: glibc malloc settings under which XLA:CPU reuses freed buffers.

XLA:CPU allocates each step's buffers with malloc. glibc serves a large request with a fresh
`mmap` and returns it to the kernel on free, so every step faults in (and the kernel zeroes)
every page of its large buffers again; a reused buffer is written several times faster than a
fresh one, and the CPU train step is correspondingly faster (docs/performance.md).

`keep_freed_host_memory` makes glibc serve large requests from its heap and keep freed memory
for reuse, as the caching allocators of TensorFlow and PyTorch do: the process's resident memory
then stays at its peak instead of falling between steps. The command-line entry points apply it
when they compute on CPU (`mlm.kernels.tune_host`); a library caller's process is left alone
unless it calls this itself. `MLM_KEEP_HOST_MEMORY=0` leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

OPT_OUT_VARIABLE = "MLM_KEEP_HOST_MEMORY"

# mallopt(3) parameters (glibc <malloc.h>) and the values set.
M_TRIM_THRESHOLD = -1  # Free heap top kept before returning memory to the kernel.
M_TOP_PAD = -2  # Extra bytes requested whenever the heap grows.
M_MMAP_MAX = -4  # Largest number of requests served by mmap; 0: none, all from the heap.
M_ARENA_MAX = -8  # Number of arenas; 1: threads share the main heap, never unmapped.
SETTINGS = (
    (M_MMAP_MAX, 0),
    (M_TRIM_THRESHOLD, 2**31 - 1),
    (M_TOP_PAD, 256 * 2**20),
    (M_ARENA_MAX, 1),
)

_applied = False


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (Linux), else None (macOS, musl, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    return ctypes.CDLL(name)


def in_effect() -> bool:
    """Whether `keep_freed_host_memory` has applied its settings in this process."""
    return _applied


def keep_freed_host_memory() -> bool:
    """Sets glibc malloc to serve large blocks from its heap and keep freed memory for reuse.

    Call it before JAX's CPU backend starts (first thing in a program or notebook): the arena
    setting only affects threads that have not allocated yet. Calling it again does nothing.

    Returns:
      True if the settings are in effect in this process; False where the C library is not
      glibc or `MLM_KEEP_HOST_MEMORY=0` is set.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(OPT_OUT_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    _applied = all(libc.mallopt(parameter, value) == 1 for parameter, value in SETTINGS)
    return _applied
