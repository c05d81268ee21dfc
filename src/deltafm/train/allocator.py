"""glibc's malloc told to keep freed memory (``train.keep_freed_memory``, CPU training on Linux).

PyTorch's CPU tensors come from the C library's ``malloc``. With glibc's defaults a block above the mmap
threshold (128 KiB at start, raised dynamically up to 32 MiB as such blocks are freed) is a fresh ``mmap``
whose pages fault in on first touch, and free memory at the top of the heap beyond the trim threshold is
handed back to the kernel, to be faulted in again on the next step. How much of a step's activations and
gradients take that path depends on the thresholds, which move with the allocation history, so on the
CPUs measured a model's forward and backward time depended on what else the process allocated
(``benchmarks/check_allocator_coupling.py``): for SiT-B/2 with ``optim.fused_update`` the forward+backward
was slower than with the eager update, by as much as the fused update saved, until glibc was told to keep
freed memory (benchmarks/RESULTS.md).

:func:`keep_freed_memory` sets, through ``mallopt``, what the environment variables
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824`` set at
start: blocks under 32 MiB come from the heap, the heap is never trimmed, and it grows by 1 GiB at a time.
The process keeps its peak memory (a training process reaches its peak every step anyway). Allocations made
before the call are unaffected. Elsewhere (not glibc) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's <malloc.h>


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory (see the module docstring). Returns False where the C
    library is not glibc (nothing changed) or ``mallopt`` refuses one of the settings."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt's value is an int; -1 as M_TRIM_THRESHOLD turns trimming off (mallopt(3)), as the 64 GiB of
    # MALLOC_TRIM_THRESHOLD_ does
    settings = ((_M_MMAP_THRESHOLD, 32 * 2**20), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 2**30))
    return all(mallopt(k, v) == 1 for k, v in settings)
