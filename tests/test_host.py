"""pipeline/host.reuse_freed_memory: freed large tensors' pages are reused, not faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Four "training steps" after a first one: 8 activations of 16 MB, a 256 MB logits tensor and its gradient, all
# freed at the end of the step. Prints the page faults of the four.
SCRIPT = """
import resource, sys
import torch
from pipeline.host import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
def step():
    acts = [torch.empty(4 * 2**20).fill_(1.0) for _ in range(8)]
    logits = torch.empty(64 * 2**20).fill_(1.0)
    grad = torch.empty_like(logits).fill_(2.0)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 4 * (8 * 16 + 2 * 256) * 2**20 // 4096  # the four steps' allocations, in 4 KB pages


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only: the setting is a no-op elsewhere")
def test_freed_large_tensors_are_reused_without_page_faults():
    """glibc's default serves each block over 32 MB with a fresh mmap, and freed 16 MB blocks can go back to the
    kernel too: most of the pages are faulted in again every step (measured: 565k-598k of 655k). With
    reuse_freed_memory, later steps mostly get earlier steps' pages back (measured: 82k-98k)."""
    faults = {}
    for mode in ("default", "reuse"):
        run = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
        faults[mode] = int(run.stdout.split()[-1])
    assert faults["default"] > PAGES // 2, faults
    assert faults["reuse"] < PAGES // 4, faults


# Whether set_torch_environment applied, and the huge pages backing this process once a 64 MB tensor is touched (KB).
HUGE_SCRIPT = """
import os
from pipeline.host import set_torch_environment
print(set_torch_environment(), os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"])
import torch
x = torch.empty(16 * 2**20).fill_(1.0)
with open("/proc/self/smaps_rollup") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:")))
"""


def _kernel_huge_pages_mode() -> str:
    """always, madvise or never: when Linux backs anonymous memory with 2 MB pages."""
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        return f.read().split("[")[1].split("]")[0]


@pytest.mark.skipif(platform.system() != "Linux", reason="transparent huge pages are a Linux feature")
@pytest.mark.parametrize("setting", [None, "0"])
def test_set_torch_environment_gives_large_tensors_2mb_pages(setting):
    """Called before torch's import, set_torch_environment has a 64 MB tensor backed by 2 MB pages where the
    kernel grants them on request (`madvise`, as here) and nothing otherwise (`madvise` without the request); the
    environment's THP_MEM_ALLOC_ENABLE=0 turns it off. Called after torch's import, it reports that it cannot
    apply."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    run = subprocess.run([sys.executable, "-c", HUGE_SCRIPT], capture_output=True, text=True, check=True, env=env)
    applied, capacity, huge_kb = run.stdout.split()
    assert capacity == "16384"  # oneDNN's kernel cache, set alike
    mode = _kernel_huge_pages_mode()
    assert applied == str(setting is None)
    if mode == "madvise":
        assert (int(huge_kb) >= 32 * 1024) == (setting is None), huge_kb
    elif mode == "never":
        assert int(huge_kb) == 0
    late = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch; from pipeline.host import set_torch_environment; print(set_torch_environment())",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert late.stdout.split()[-1] == "False"
