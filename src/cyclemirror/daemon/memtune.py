"""Process-wide allocator settings for a daemon that moves data in big buffers.

Frame packing and receiving allocate buffers of up to a few MiB per chunk.
glibc hands such blocks out with mmap and gives them back with munmap, so
every chunk pays fresh page faults and page zeroing (about two thirds of the
packing time, measured with perf). Raising the mmap and trim thresholds lets
freed chunks be reused from the heap instead. Only the daemon calls this: a
library must not change its host process's allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1 << 30


def keep_freed_buffers() -> bool:
    """Ask glibc to keep freed data buffers for reuse; False where that is not possible."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        log.debug("no mallopt in this C library; allocator left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        log.warning("mallopt refused the buffer thresholds; data buffers stay mmap-backed")
    return ok
