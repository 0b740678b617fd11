"""Host settings for running the model on CPU: how the C allocator hands memory back, the page size torch's
tensors get, and how many generated matmul kernels oneDNN keeps."""

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
    tensor is 300 MB, the gradient of the 37k x 512 embedding 76 MB, every FFN activation 16 MB), so each one comes
    back from the kernel as new pages: a page fault and zero-filling for every 4 KB, work a step repeats for
    nothing. With mmap off and the heap never trimmed, freed blocks are reused as they are, at the price of a higher
    peak memory (what is freed stays with the process). The same as starting the process with MALLOC_MMAP_MAX_=0 and
    a large MALLOC_TRIM_THRESHOLD_, done here so that `aiayn train` does not depend on its launcher. CUDA memory has
    its own caching allocator, so this only matters where tensors live on the host. Returns whether it applied
    (glibc only).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


# Environment variables torch reads once, when it first needs them: so they are set before torch is imported.
TORCH_ENVIRONMENT = {
    # Read by torch's CPU allocator (c10/core/impl/alloc_cpu.cpp) at its first allocation: blocks of 2 MB and more
    # are then page-aligned and marked madvise(MADV_HUGEPAGE), so the kernel may back them with 2 MB pages.
    "THP_MEM_ALLOC_ENABLE": "1",
    # Read by oneDNN when it creates its first primitive: how many generated kernels (one per matmul shape and
    # layout) it keeps. Its default, 1024, is about the shapes of one Multi30k epoch at 4096 tokens (39 source and
    # 38 target batch shapes, some 15 matmul shapes each), and a kernel evicted is generated again at its next use,
    # costing far more than running a cached one: the cache holds every shape a run meets.
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16384",
}


def set_torch_environment() -> bool:
    """Set TORCH_ENVIRONMENT's variables (where the environment does not set them already, which wins), before
    torch is imported: `aiayn` calls this first thing.

    Huge pages: a training step's activations, logits and gradients are tens to hundreds of MB each; in 4 KB pages
    every first touch of a new block is a page fault per 4 KB, and the matmuls reading them miss the TLB more often;
    a 2 MB page takes one fault and one TLB entry where 4 KB pages take 512. Linux only does this where
    /sys/kernel/mm/transparent_hugepage/enabled is `madvise` or `always`; elsewhere it changes nothing;
    THP_MEM_ALLOC_ENABLE=0 turns it off.
    Kernel cache: on CPU, torch's bf16 matmuls are oneDNN primitives generated for each shape, and generating one
    costs many times what running it does: once a run's shapes outnumber the default capacity, the oldest are
    evicted and generated again every epoch, which this capacity avoids.

    Returns whether torch uses the huge pages: once torch is imported, only if THP_MEM_ALLOC_ENABLE was set to 1
    before.
    """
    if "torch" in sys.modules:
        return os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
    for name, value in TORCH_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
