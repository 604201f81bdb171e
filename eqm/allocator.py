"""How a CPU process keeps the memory it frees: in the heap, not handed back to the OS each step.

A training or sampling step on the CPU allocates and frees the same activations, a few megabytes
each, every step. glibc's malloc serves blocks that large from fresh mappings, or trims them off
the top of its heap once they are freed, so every step faults the same pages back in and the
kernel zeroes them again: a visible share of a small model's step (docs/demo.md#the-cpus-allocator).
Raising the mmap threshold to glibc's ceiling and turning trimming off keeps those blocks in the
heap for reuse. The price is that the process's resident memory stays at its peak instead of
shrinking between steps, which a training or sampling run reaches again every step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc refuses a larger mmap threshold on 64-bit systems (half its largest heap).
_MMAP_THRESHOLD_MAX = 32 << 20
_NO_TRIM = 2**31 - 1

_applied = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks (up to its mmap ceiling) for reuse; once per process.

    Returns whether the setting is in force: False where the C library is not glibc (musl,
    macOS, Windows), which keep their own allocation policies. Process-wide and irreversible,
    so it is applied where a run starts on the CPU (eqm.train's setup and
    eqm.generate.load_for_sampling), not on import.
    """
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # The mmap threshold first: setting the trim threshold alone freezes glibc's adaptive mmap
    # threshold at its small default, which sends more blocks to fresh mappings, not fewer.
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _NO_TRIM))
    return _applied


__all__ = ["keep_freed_memory"]
