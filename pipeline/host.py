"""Host settings for running the model on CPU: how the C allocator hands memory back, and the page size torch's
tensors get (issue 6)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of returning it to the kernel.

    By default glibc serves every block over 32 MB (the most its adaptive threshold grows to) with a fresh mmap and
    unmaps it when freed. A training step on CPU allocates such blocks dozens of times (a 4096 x 37k bf16 logits
    tensor is 300 MB, the gradient of the 37k x 512 embedding 76 MB, every FFN activation 16 MB), so each one
    comes back from the kernel as new pages: a page fault and zero-filling for every 4 KB, and a `zeros` of the
    embedding gradient took longer than a matmul. With mmap off and the heap never trimmed, freed blocks are reused
    as they are: a base-model step (bench/step_profile.py, 4096 tokens, three runs alternating without and with)
    took 3.35, 3.22, 3.08 s without and 3.00, 2.94, 2.71 s with, for about 10% more peak memory. The same as
    starting the process with MALLOC_MMAP_MAX_=0 and a large MALLOC_TRIM_THRESHOLD_,
    done here so that `aiayn train` does not depend on its launcher. CUDA memory has its own caching allocator, so
    this only matters where tensors live on the host. Returns whether it applied (glibc only).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


# Read by torch's CPU allocator (c10/core/impl/alloc_cpu.cpp) at its first allocation: blocks of 2 MB and more are
# then aligned to 2 MB and marked madvise(MADV_HUGEPAGE), so the kernel backs them with 2 MB pages.
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages() -> bool:
    """Have torch's large CPU tensors live in 2 MB pages (transparent huge pages) instead of 4 KB ones.

    A training step's activations, logits and gradients are tens to hundreds of MB each: in 4 KB pages every first
    touch of a new block is a page fault per 4 KB, and the matmuls reading them miss the TLB more often. A base-model
    step (bench/step_profile.py, 4096 tokens, one run each) took 1.99 s without and 1.79 s with. Linux only
    does this where /sys/kernel/mm/transparent_hugepage/enabled is `madvise` or `always`; elsewhere it changes
    nothing. torch reads the setting once, at its first allocation, so this must run before torch is imported:
    `aiayn` calls it first thing. THP_MEM_ALLOC_ENABLE=0 in the environment turns it off. Returns whether torch
    uses it: once torch is imported, only if the variable was set to 1 before.
    """
    if "torch" in sys.modules:
        return os.environ.get(HUGE_PAGES_ENV) == "1"
    os.environ.setdefault(HUGE_PAGES_ENV, "1")
    return os.environ[HUGE_PAGES_ENV] == "1"
