"""A caching CPU allocator for large tensors: freed blocks reused instead of page-faulted again.

ATen's CPU allocator is malloc, and glibc serves every block above its mmap threshold (at
most 32 MiB) with a fresh mapping that it unmaps on free. A training step whose activations
and gradients are hundreds of MB each (an all-subset ensemble's latents are [S, B, L]) then
page-faults every byte of them on every step, and the kernel zero-fills each page on first
touch: about as long as the GEMM that writes the tensor (BENCHMARKS.md, "A sweep cell as
modalities grow"). :func:`enable_allocation_cache` makes ATen allocate CPU tensors of 1 MiB
and more through a cache that keeps freed blocks, up to a byte limit, and hands them out again
for requests of about the same size, as PyTorch's caching allocator does on CUDA.

It is process-wide (every CPU tensor of the process, from any library), off by default, and
changes no numerical result; ``mmkernels sweep`` and ``reproduce`` turn it on. The cached
blocks stay the process's memory until :func:`disable_allocation_cache` or exit, so the memory
budget (mmkernels.memory, measured from the memory available) counts them as used; the default
limit is a quarter of the budget for that reason. PyTorch's profiler does not see allocations
made through it.
"""

from __future__ import annotations

from typing import NamedTuple

from mmkernels._native import native
from mmkernels.memory import memory_budget

__all__ = ["AllocationCacheStats", "allocation_cache_stats", "disable_allocation_cache",
           "enable_allocation_cache"]


class AllocationCacheStats(NamedTuple):
    cached_bytes: int  # freed large blocks held for reuse now
    hits: int  # large requests served from the cache
    misses: int  # large requests that went to malloc


def enable_allocation_cache(limit_bytes: int | None = None) -> bool:
    """Allocate large CPU tensors through the cache, keeping up to ``limit_bytes`` of freed
    blocks (default: a quarter of the memory budget, mmkernels.memory). Returns whether the
    cache is now ATen's CPU allocator (False if another library holds it at a higher
    priority). Calling it again only changes the limit."""
    if limit_bytes is None:
        budget, _ = memory_budget("cpu")
        limit_bytes = 4 * 2**30 if budget == float("inf") else int(budget // 4)
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes <= 0:
        raise ValueError(f"limit_bytes must be a positive int, got {limit_bytes!r}")
    return bool(native().set_allocation_cache(limit_bytes))


def disable_allocation_cache() -> None:
    """Back to the previous CPU allocator; the cached blocks are freed, and blocks still in
    use are freed when their tensors are."""
    native().set_allocation_cache(0)


def allocation_cache_stats() -> AllocationCacheStats:
    """The cache's bytes held and its hit and miss counts since the process started."""
    return AllocationCacheStats(*native().allocation_cache_stats())
