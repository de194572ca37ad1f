"""Process-wide settings for training on a CPU: glibc malloc keeps freed memory for reuse.

A training step allocates and frees the same large buffers every step: saved activations, the (N, V)
log-softmax of a 49k vocabulary, dense embedding gradients. By default glibc serves every block above its
mmap threshold (at most 32 MB, lower for short-lived blocks) with fresh pages from the kernel and unmaps it
on free, so each step pays a page fault and a zero-fill for every 4 KB page of those buffers again. With the
threshold and the trim threshold raised, freed memory stays in the heap and is reused. Measured on the
2-core bench machine (SmolLM2-135M reward-model step, `bench/workers/rlhfkit_worker.py --trainer rm`, two
runs each, alternating): 8.73 / 9.37 s -> 7.82 / 7.63 s median, peak RSS unchanged (4.8 GiB).
shared/ANCHORS.md measured the same effect for TRL with jemalloc.

Off when RLHFKIT_MALLOC=system, when another allocator is preloaded (LD_PRELOAD), when the user set
glibc's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, and on anything but Linux with glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
KEEP = 2**31 - 1  # the largest value mallopt takes (an int): only blocks above 2 GB still use mmap
ENV_OVERRIDES = ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process (see the module docstring); True if they
    are raised, False if this process keeps its allocator as it is."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("RLHFKIT_MALLOC", "keep") == "system" or any(os.environ.get(k) for k in ENV_OVERRIDES):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    done = [libc.mallopt(param, ctypes.c_int(KEEP)) for param in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD)]
    return done == [1, 1]  # mallopt returns 1 on success


def release_freed_memory() -> None:
    """Free what only reference cycles keep alive (`gc.collect`), then hand the heap's free memory back to
    the kernel (glibc's `malloc_trim(0)`): between the stages of a pipeline, which run in one process, so
    that a stage's peak is its own and not added to the memory the stages before it freed but kept."""
    import gc

    gc.collect()
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
