"""Peak host-memory measurement for CPU training runs: the kernel's own high-water mark.

Method: glibc is told to serve every allocation >= ``mmap_threshold`` (64 KiB) with its own mmap
(``mallopt(M_MMAP_THRESHOLD)``, which also turns off glibc's dynamic threshold), so a freed tensor
goes straight back to the kernel and the resident set size tracks the live tensors. Before a
measured region the heap is trimmed (``malloc_trim(0)``) and the kernel's peak-RSS counter is reset
(``echo 5 > /proc/self/clear_refs``, Linux >= 4.0); afterwards ``VmHWM`` of ``/proc/self/status``
is the exact peak of the region: no sampling thread, no missed short-lived spikes, and it counts
everything a process really holds (allocator slack, thread pools), not only torch tensors.
Checked on known allocations in ``tests/test_memory_plan.py`` (1 MiB accuracy).

Only for measurement: per-allocation mmap makes large allocations page-fault on every use, which
slows training; time steps with :func:`fast_malloc` instead (glibc's usual reuse of freed memory).
"""
from __future__ import annotations

import ctypes
import gc
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6")
    return _libc


def exact_malloc(mmap_threshold: int = 1 << 16) -> None:
    """Large allocations via their own mmap, returned to the kernel on free (RSS = live memory)."""
    _lib().mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))
    _lib().mallopt(_M_TRIM_THRESHOLD, 1 << 20)


def fast_malloc(mmap_threshold: int = 32 << 20) -> None:
    """glibc's steady state (threshold grown to its 32 MiB cap): freed blocks are reused, fewer page faults."""
    _lib().mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))
    _lib().mallopt(_M_TRIM_THRESHOLD, int(mmap_threshold) * 2)


def trim() -> None:
    gc.collect()
    _lib().malloc_trim(0)


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def rss() -> int:
    return _status()["VmRSS"]


def reset_peak() -> int:
    """Trim, reset the kernel's peak-RSS counter to the current RSS; returns that RSS (bytes)."""
    trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss()


def peak() -> int:
    """Peak RSS (bytes) since the last :func:`reset_peak`."""
    return _status()["VmHWM"]


@dataclass
class Region:
    baseline: int = 0  # RSS at entry (bytes)
    peak: int = 0  # peak RSS inside (bytes)
    end: int = 0  # RSS at exit

    @property
    def delta(self) -> int:
        return self.peak - self.baseline


@contextmanager
def measure() -> Iterator[Region]:
    """``with measure() as r: ...`` -> ``r.delta`` = peak RSS inside minus RSS at entry (bytes)."""
    r = Region(baseline=reset_peak())
    try:
        yield r
    finally:
        r.peak, r.end = peak(), rss()
