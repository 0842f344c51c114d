"""Process-level tuning for running EDLNets on a CPU.

An EDL layer allocates several activation-sized temporaries per RISTA step.  glibc's
``malloc`` serves allocations above its mmap threshold (at most 32 MiB by default) with
a fresh ``mmap`` and returns them with ``munmap`` when freed, so every such temporary
costs a round of page faults (the kernel zeroes each new page).  On the benchmark CPU
this made an ``edlnet_resnet18`` train step at batch 128 about a quarter slower than
its FLOPs predict (see docs/performance.md).  :func:`keep_freed_memory` raises the mmap
and trim thresholds with ``mallopt``, so freed blocks stay in the heap and are reused;
it changes how fast memory is handed out, not how much a step needs at its peak.
"""
import ctypes
import ctypes.util
import os
import sys

__all__ = ['keep_freed_memory']

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_DONE = None


def keep_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Ask glibc to keep freed blocks below ``threshold_bytes`` for reuse (Linux/glibc only).

    Returns True when the allocator was tuned (now or by an earlier call), False where it
    cannot be (another OS or C library) or when ``TIMM_EDL_MALLOC_TUNING=0`` opts out.
    The ``timm-edl`` commands call it at start-up; call it yourself in your own scripts.
    """
    global _DONE
    if _DONE is not None:
        return _DONE
    _DONE = False
    if os.environ.get('TIMM_EDL_MALLOC_TUNING', '1') == '0' or not sys.platform.startswith('linux'):
        return False
    name = ctypes.util.find_library('c')
    try:
        libc = ctypes.CDLL(name or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    threshold = int(min(threshold_bytes, 2 ** 31 - 1))
    # mallopt returns 1 on success, 0 when it refuses the value
    _DONE = bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))
    return _DONE
