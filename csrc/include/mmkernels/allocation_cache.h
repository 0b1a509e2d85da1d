// The caching CPU allocator for large tensors (csrc/cpu/allocation_cache.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

namespace mmkernels {

struct AllocationCacheStats {
  size_t cached_bytes = 0;  // freed large blocks held for reuse
  int64_t hits = 0;         // large requests served from the cache
  int64_t misses = 0;       // large requests that went to malloc
};

// limit_bytes > 0: ATen's CPU tensors are allocated through the cache, which keeps up to
// limit_bytes of freed large blocks; returns whether the cache is now the CPU allocator
// (false if another allocator holds it at a higher priority). 0: the previous allocator again,
// the cached blocks freed; returns false.
bool set_allocation_cache(int64_t limit_bytes);

AllocationCacheStats allocation_cache_stats();

}  // namespace mmkernels
