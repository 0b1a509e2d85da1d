"""The CPU allocation cache: large freed tensors reused without page faults, nothing else
changed (values, small tensors, fork, turning it off)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocates and fills a 256 MiB tensor five times (the sizes vary by a few KiB, as a partial
# batch's would); prints the minor page faults of the last four, then the cache's counters.
_PROBE = """
import resource, sys, torch
from mmkernels import cpu_memory
if sys.argv[1] == "cache":
    assert cpu_memory.enable_allocation_cache(2**30)
n = 64 * 2**20
torch.empty(n).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(4):
    t = torch.empty(n - 1000 * i).fill_(float(i))
    assert float(t[-1]) == float(i)
    del t
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
      *cpu_memory.allocation_cache_stats())
"""


def _probe(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True)
    return [int(v) for v in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counts of Linux")
def test_freed_large_tensors_are_reused_without_page_faults() -> None:
    pages = 4 * 256 * 2**20 // 4096  # four 256 MiB tensors in 4 KiB pages
    faults, cached, hits, misses = _probe("default")
    assert faults > pages // 600  # a fresh mapping each time (fewer faults with huge pages)
    assert (cached, hits, misses) == (0, 0, 0)
    faults, cached, hits, misses = _probe("cache")
    assert faults < pages // 1000
    assert (hits, misses) == (4, 1) and cached >= 256 * 2**20 - 4000 * 4


def _in_subprocess(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120).stdout


def test_values_small_tensors_limit_and_off() -> None:
    out = _in_subprocess("""
import torch
from mmkernels import cpu_memory as cm
assert cm.enable_allocation_cache(8 * 2**20)
a = torch.arange(3 * 2**20, dtype=torch.float32)      # 12 MiB: above the limit when freed
b = torch.ones(1000)                                    # small: malloc's
assert a.sum().item() == sum(range(3 * 2**20)) and b.sum().item() == 1000
del a, b
print(cm.allocation_cache_stats().cached_bytes)         # 12 MiB > 8 MiB limit: not kept
c = torch.zeros(2**20)                                  # 4 MiB, kept when freed
del c
print(cm.allocation_cache_stats().cached_bytes)
e = torch.zeros(3 * 2**20)                              # above the limit again: freed, and
del e                                                   # c's block stays cached
print(cm.allocation_cache_stats().cached_bytes)
d = torch.empty(2**20)                                  # reuses c's block...
d.zero_()
assert d.abs().sum().item() == 0                        # ...and torch.empty's contract holds
cm.disable_allocation_cache()
del d                                                   # freed through the cache, not kept
print(cm.allocation_cache_stats().cached_bytes, torch.ones(2**20).sum().item())
""").split()
    assert out == ["0", str(4 * 2**20), str(4 * 2**20), "0", str(float(2**20))]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_allocates() -> None:
    out = _in_subprocess("""
import os, torch
from mmkernels import cpu_memory as cm
torch.set_num_threads(1)  # an OpenMP team in the parent hangs a forked child (not ours)
cm.enable_allocation_cache(2**30)
keep = torch.ones(2**20)
pid = os.fork()
if pid == 0:
    t = torch.full((2**21,), 2.0)
    os._exit(0 if t.sum().item() == 2.0 * 2**21 and keep.sum().item() == 2**20 else 1)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
""")
    assert out.split() == ["0"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1G"])
def test_a_bad_limit_is_refused(bad: object) -> None:
    from mmkernels.cpu_memory import enable_allocation_cache

    with pytest.raises(ValueError, match="limit_bytes must be a positive int"):
        enable_allocation_cache(bad)  # type: ignore[arg-type]
