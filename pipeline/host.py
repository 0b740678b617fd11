"""Host settings for running the model on CPU: how the C allocator hands memory back, the page size torch's
tensors get, and how many generated matmul kernels oneDNN keeps; and the third-party warnings known to be harmless
here, silenced at startup."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys
import warnings

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


# Third-party warnings that used to open every run, each known to be harmless here (why: beside it), silenced by
# message, category and the module that warns, so that any other warning, from these libraries too, still shows:
# (message regex, category, module regex).
KNOWN_HARMLESS_WARNINGS = (
    # Lightning 2.6 walks the data loaders it is given (CombinedLoader) with its own copy of torch's tree_flatten
    # (lightning/pytorch/utilities/_pytree.py), which builds a LeafSpec, deprecated since torch 2.13. Lightning's
    # code, not ours: it works the same until a Lightning release updates it.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
)
# Lightning warns that `srun` is on the PATH but unused whenever a process starts without it. Outside a SLURM job
# that is a machine with SLURM's tools installed training on its own (what `aiayn train` does there); the SLURM route
# (`aiayn submit`, `aiayn run cluster=slurm`) starts every task under srun. Inside a job (SLURM_JOB_ID set, e.g. an
# salloc shell) it may be a real mistake, and stays.
SRUN_WARNING = (
    r"The `srun` command is available on your system but is not used",
    UserWarning,  # Lightning's PossibleUserWarning
    r"lightning\.fabric\.plugins\.environments\.slurm",
)
# Lightning's info messages (its loggers, not warnings) that say nothing about the run: an advertisement printed by
# every Trainer, and the echo of trainer.limit_val_batches=1.0, which conf/trainer/*.yaml passes explicitly (the
# default: all validation batches). By their text's start.
KNOWN_HARMLESS_MESSAGES = (
    "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
    "`Trainer(limit_val_batches=1.0)` was configured so 100% of the batches will be used.",
)
# Where Lightning's rank_zero_info logs (lightning.pytorch's import points lightning_utilities' logger at its own).
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet_known_warnings() -> None:
    """Silence KNOWN_HARMLESS_WARNINGS (and SRUN_WARNING outside a SLURM job) and Lightning's
    KNOWN_HARMLESS_MESSAGES, each by its text, for the rest of the process: `aiayn` calls this at startup. Imports
    nothing (the filters wait for the libraries). Warning options given to Python (-W, PYTHONWARNINGS) win: with
    any, no warning filter is added."""
    if not sys.warnoptions:
        known = [*KNOWN_HARMLESS_WARNINGS, *([] if os.environ.get("SLURM_JOB_ID") else [SRUN_WARNING])]
        for message, category, module in known:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(KNOWN_HARMLESS_MESSAGES))
