"""Host settings for running the model on CPU: how the C allocator hands memory back (issue 6)."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

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
