"""pipeline/host.py: reuse_freed_memory keeps glibc from handing large freed blocks back to the kernel, and
set_torch_environment sets torch's environment variables before torch is imported, without overriding the user's.

Each check is about what the code does, not about this machine: the malloc settings are read back through glibc's
own statistics (mallinfo2), and huge pages through the madvise flag torch puts on a tensor's mapping, which the
kernel records whatever its transparent-huge-page mode."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import host

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
TORCH_VARIABLES = ("THP_MEM_ALLOC_ENABLE", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


def _python(script: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run `script` in a fresh interpreter (from the project root, so `pipeline` imports) with the environment
    `env` adds to this one's, less TORCH_VARIABLES; return the JSON it printed last."""
    base = {k: v for k, v in os.environ.items() if k not in TORCH_VARIABLES}
    run = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        check=True,
        env={**base, **(env or {})},
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(run.stdout.splitlines()[-1])


# --- reuse_freed_memory ------------------------------------------------------------------------------------------


class _FakeLibc:
    def __init__(self, result: int) -> None:
        self.result, self.calls = result, []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


@pytest.fixture
def fake_glibc(monkeypatch: pytest.MonkeyPatch):
    """A glibc host, whatever this one is, whose libc records mallopt calls; returns a function that sets what
    mallopt answers (1 success, 0 failure) and gives the fake."""
    monkeypatch.setattr(host.platform, "system", lambda: "Linux")
    monkeypatch.setattr(host.platform, "libc_ver", lambda *a, **k: ("glibc", "2.36"))

    def make(result: int = 1) -> _FakeLibc:
        libc = _FakeLibc(result)
        monkeypatch.setattr(host.ctypes, "CDLL", lambda name, *a, **k: libc)
        return libc

    return make


def test_reuse_freed_memory_turns_mmap_off_and_never_trims_the_heap(fake_glibc):
    """The two mallopt(3) settings, with glibc's <malloc.h> numbers: M_MMAP_MAX (-4) = 0, so no block is served by
    mmap and unmapped when freed, and M_TRIM_THRESHOLD (-1) = the largest int, so free never shrinks the heap."""
    libc = fake_glibc(1)
    assert host.reuse_freed_memory() is True
    assert sorted(libc.calls) == [(-4, 0), (-1, 2**31 - 1)]


def test_reuse_freed_memory_reports_a_refused_setting(fake_glibc):
    """mallopt returns 0 when it refuses a setting: the function then says it did not apply."""
    fake_glibc(0)
    assert host.reuse_freed_memory() is False


@pytest.mark.parametrize("system, libc_name", [("Linux", "musl"), ("Linux", ""), ("Darwin", ""), ("Windows", "")])
def test_reuse_freed_memory_is_a_no_op_without_glibc(monkeypatch, system, libc_name):
    """mallopt's parameters are glibc's: elsewhere nothing is loaded or called, and it reports False."""
    monkeypatch.setattr(host.platform, "system", lambda: system)
    monkeypatch.setattr(host.platform, "libc_ver", lambda *a, **k: (libc_name, ""))

    def no_libc(*args, **kwargs):
        raise AssertionError("libc loaded on a host without glibc")

    monkeypatch.setattr(host.ctypes, "CDLL", no_libc)
    assert host.reuse_freed_memory() is False


# Allocates a 64 MB block with malloc (above the 32 MB that glibc's mmap threshold can grow to), frees it and
# allocates another, reading glibc's statistics around each step: `hblks`, blocks served by mmap; `arena`, bytes of
# heap taken from the kernel. Nothing else runs between the calls, so the freed block always merges into the heap's
# top, which free trims back to the kernel unless told not to. argv[1]: "default" (glibc as it starts), "mmap_off"
# (only M_MMAP_MAX=0, set here: the function without its second setting) or "reuse" (reuse_freed_memory).
MALLOC_SCRIPT = """
import ctypes, ctypes.util, json, sys
from pipeline.host import M_MMAP_MAX, reuse_freed_memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
try:  # glibc 2.33+; mallinfo's int fields hold these sizes too
    mallinfo, field = libc.mallinfo2, ctypes.c_size_t
except AttributeError:
    mallinfo, field = libc.mallinfo, ctypes.c_int
class MallInfo(ctypes.Structure):
    _fields_ = [(name, field) for name in FIELDS]
mallinfo.restype = MallInfo
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
applied = None
if sys.argv[1] == "reuse":
    applied = reuse_freed_memory()
elif sys.argv[1] == "mmap_off":
    assert libc.mallopt(M_MMAP_MAX, 0) == 1
N = 64 * 2**20
before = mallinfo()
block = libc.malloc(N)
held = mallinfo()
libc.free(block)
freed = mallinfo()
block = libc.malloc(N)
again = mallinfo()
libc.free(block)
print(json.dumps({
    "applied": applied,
    "mmapped": held.hblks - before.hblks,
    "trimmed": freed.arena < held.arena,
    "heap_grew_again": again.arena > freed.arena,
}))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc statistics; the function is a no-op elsewhere")
def test_large_freed_blocks_stay_in_the_heap_and_are_reused():
    """By default glibc serves a 64 MB block (a large tensor) with its own mmap, unmapped when freed, so the next one
    is faulted in page by page. With reuse_freed_memory it comes from the heap, the heap keeps it once freed, and
    the next block of the size takes its place without the heap growing. Turning mmap off alone is not enough:
    free then trims the heap's top back to the kernel, which the second setting prevents."""
    default = _python(MALLOC_SCRIPT, "default")
    assert default["mmapped"] == 1, default
    mmap_off = _python(MALLOC_SCRIPT, "mmap_off")
    assert mmap_off["mmapped"] == 0 and mmap_off["trimmed"] and mmap_off["heap_grew_again"], mmap_off
    reuse = _python(MALLOC_SCRIPT, "reuse")
    assert reuse == {"applied": True, "mmapped": 0, "trimmed": False, "heap_grew_again": False}, reuse


# --- set_torch_environment ----------------------------------------------------------------------------------------

# argv[1]: "before" or "after" torch's import. Prints what set_torch_environment returned, whether it imported
# torch itself, and the two variables after it.
ENV_SCRIPT = """
import json, os, sys
from pipeline.host import TORCH_ENVIRONMENT, set_torch_environment
if sys.argv[1] == "after":
    import torch
had_torch = "torch" in sys.modules
applied = set_torch_environment()
print(json.dumps({
    "applied": applied,
    "imported_torch": "torch" in sys.modules and not had_torch,
    "env": {name: os.environ.get(name) for name in TORCH_ENVIRONMENT},
}))
"""


@pytest.mark.parametrize(
    "preset, applied, env",
    [
        ({}, True, {"THP_MEM_ALLOC_ENABLE": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16384"}),
        (
            {"THP_MEM_ALLOC_ENABLE": "1"},
            True,
            {"THP_MEM_ALLOC_ENABLE": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16384"},
        ),
        (
            {"THP_MEM_ALLOC_ENABLE": "0"},
            False,
            {"THP_MEM_ALLOC_ENABLE": "0", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16384"},
        ),
        (
            {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "99"},
            True,
            {"THP_MEM_ALLOC_ENABLE": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "99"},
        ),
        (
            {"THP_MEM_ALLOC_ENABLE": "0", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "99"},
            False,
            {"THP_MEM_ALLOC_ENABLE": "0", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "99"},
        ),
    ],
    ids=["unset", "thp-on", "thp-off", "cache-set", "both-set"],
)
def test_set_torch_environment_before_torch_fills_in_only_what_is_unset(preset, applied, env):
    """Before torch's import, each variable the environment lacks gets TORCH_ENVIRONMENT's value, one the
    environment sets is left as it is, and the result says whether torch's allocator will use huge pages
    (THP_MEM_ALLOC_ENABLE=1). The call does not import torch itself."""
    result = _python(ENV_SCRIPT, "before", env=preset)
    assert result == {"applied": applied, "imported_torch": False, "env": env}, result


@pytest.mark.parametrize(
    "preset, applied",
    [({}, False), ({"THP_MEM_ALLOC_ENABLE": "1"}, True), ({"THP_MEM_ALLOC_ENABLE": "0"}, False)],
    ids=["unset", "thp-on", "thp-off"],
)
def test_set_torch_environment_after_torch_changes_nothing(preset, applied):
    """Once torch is imported its allocator has read the environment: nothing is set, and the result says
    whether huge pages are on anyway (THP_MEM_ALLOC_ENABLE=1 set before the import)."""
    result = _python(ENV_SCRIPT, "after", env=preset)
    expected_env = {name: preset.get(name) for name in TORCH_VARIABLES}
    assert result == {"applied": applied, "imported_torch": False, "env": expected_env}, result


# Whether the mapping of a 64 MB tensor carries the MADV_HUGEPAGE advice ("hg" in /proc/self/smaps's VmFlags):
# torch's CPU allocator asks for it when THP_MEM_ALLOC_ENABLE=1 was in the environment at its first allocation.
# argv[1]: call set_torch_environment "before" or "after" torch's import.
HUGE_SCRIPT = """
import json, sys
from pipeline.host import set_torch_environment
if sys.argv[1] == "before":
    applied = set_torch_environment()
import torch
if sys.argv[1] == "after":
    applied = set_torch_environment()
x = torch.empty(16 * 2**20).fill_(1.0)
address, flags = x.data_ptr(), None
with open("/proc/self/smaps") as f:
    inside = False
    for line in f:
        head = line.split()[0]
        if not head.endswith(":"):
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            flags = line.split()[1:]
print(json.dumps({"applied": applied, "advised": "hg" in flags, "page_aligned": address % 4096 == 0}))
"""


@pytest.mark.skipif(
    not os.path.isdir("/sys/kernel/mm/transparent_hugepage"), reason="a kernel with transparent huge pages"
)
@pytest.mark.parametrize(
    "when, preset, advised",
    [("before", {}, True), ("before", {"THP_MEM_ALLOC_ENABLE": "0"}, False), ("after", {}, False)],
    ids=["before-torch", "thp-off", "after-torch"],
)
def test_set_torch_environment_has_torch_ask_for_huge_pages(when, preset, advised):
    """Called before torch's import, set_torch_environment has torch page-align a large tensor and advise the
    kernel to back it with 2 MB pages (whether the kernel does is its transparent-huge-page mode's business, not
    checked here); the environment's THP_MEM_ALLOC_ENABLE=0 turns that off, and a call after torch's import is too
    late and says so."""
    result = _python(HUGE_SCRIPT, when, env=preset)
    assert result["applied"] is advised and result["advised"] is advised, result
    if advised:
        assert result["page_aligned"], result
