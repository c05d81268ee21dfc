"""train.keep_freed_memory (deltafm.train.allocator): after the call glibc keeps a freed block in the process.

Each case runs in a fresh interpreter (the allocator's settings are per process): a 16 MiB tensor is filled
(its pages resident) and freed. With glibc's defaults such a block is an mmap of its own, handed back to the
kernel when freed (resident memory drops by its size); after keep_freed_memory() it comes from the heap,
which is not trimmed (resident memory stays)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

_PROBE = """
import sys
from deltafm.train.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
import torch
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
x = torch.empty(16 * 2**20, dtype=torch.uint8)
x.fill_(1)
filled = resident()
del x
print(filled - resident())
"""

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")


def _released(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_a_freed_block_is_returned_by_default_and_kept_after_the_call():
    assert _released("default") >= 15 * 2**20
    assert _released("keep") < 2**20  # (the probe also asserts that keep_freed_memory() reported success)

