"""Keep memory the CPU engine frees for its next use (Linux, glibc).

A prefill allocates and frees tens of megabytes per layer (activations, attention outputs, matmul results).
glibc hands blocks above its mmap threshold back to the kernel when they are freed, and its heap's top
when it grows past the trim threshold; the next allocation then faults its pages in again, each zeroed by
the kernel: 380,000-480,000 page faults per 2048-token prefill of the default model, a quarter of its time
(BENCHMARKS.md). With the mmap threshold at glibc's maximum (32 MB) and a trim threshold of 1 GB, such
blocks stay in the heap and are reused. The price: memory freed after a peak stays with the process rather
than returning to the system (a server's peak comes back with its next long prompt anyway).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's thresholds (module docstring) once per process; False where it does not apply: not Linux
    with glibc, or the user chose them (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the environment)."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_",
                                                                             "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # musl has mallopt too, as a no-op: glibc only
    except (OSError, AttributeError):
        return False
    done = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        log.warning("glibc refused the malloc thresholds; CPU prefill runs slower (page faults)")
    return done


def physical_memory() -> int | None:
    """Bytes of memory this machine has; None where it is not known."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def available_memory() -> int | None:
    """Bytes the kernel can give this process without swapping (Linux's MemAvailable: free memory and the
    reclaimable page cache), else the machine's physical memory; None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return physical_memory()
