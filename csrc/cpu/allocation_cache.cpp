// A caching CPU allocator for large tensors (mmkernels.cpu_memory).
//
// ATen's default CPU allocator is malloc, and glibc serves every block above its mmap
// threshold (at most 32 MiB) with a fresh mapping that it unmaps on free. A training step
// whose activations and gradients are hundreds of MB each then page-faults every byte of
// them on every step; the kernel zero-fills each 4 KiB page on first touch, which costs about
// as much as the GEMM that writes the tensor. This allocator keeps freed large blocks (up to a
// byte limit) and hands them out again for requests of about the same size, as the CUDA
// caching allocator does on the GPU. Small blocks go to malloc as before (its bins reuse them).
#include "mmkernels/allocation_cache.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <pthread.h>

#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>

namespace mmkernels {
namespace {

constexpr size_t kLargest = size_t(1) << 20;  // blocks below this stay malloc's
constexpr size_t kGranule = size_t(1) << 16;  // sizes rounded up to it, so near sizes share
// A cached block serves a request up to this fraction smaller (the rest is unused room).
constexpr size_t kSlackDivisor = 8;

class AllocationCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* p = n < kLargest ? c10::alloc_cpu(n) : take_or_allocate(n);
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    if (count) std::memcpy(dest, src, count);
  }

  void set_limit(size_t limit) {
    std::lock_guard<std::mutex> hold(mutex_);
    limit_ = limit;
    trim_locked(limit);
  }

  AllocationCacheStats stats() {
    std::lock_guard<std::mutex> hold(mutex_);
    return stats_;
  }

  static AllocationCache& instance() {
    // Never destroyed: tensors may be freed during interpreter shutdown, after static
    // destructors would have run.
    static auto* cache = new AllocationCache();
    return *cache;
  }

  // fork() keeps only the calling thread: a child must not inherit a held lock.
  void before_fork() { mutex_.lock(); }
  void after_fork() { mutex_.unlock(); }

 private:
  static void release(void* p) { instance().give_back(p); }

  void* take_or_allocate(size_t n) {
    const size_t size = (n + kGranule - 1) / kGranule * kGranule;
    {
      std::lock_guard<std::mutex> hold(mutex_);
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first - size <= size / kSlackDivisor) {
        void* p = it->second;
        live_.emplace(p, it->first);
        stats_.cached_bytes -= it->first;
        free_.erase(it);
        ++stats_.hits;
        return p;
      }
      ++stats_.misses;
    }
    void* p = c10::alloc_cpu(size);
    std::lock_guard<std::mutex> hold(mutex_);
    live_.emplace(p, size);
    return p;
  }

  void give_back(void* p) {
    if (p == nullptr) return;
    std::unique_lock<std::mutex> hold(mutex_);
    const auto it = live_.find(p);
    if (it == live_.end()) {  // a small block: malloc's
      hold.unlock();
      c10::free_cpu(p);
      return;
    }
    const size_t size = it->second;
    live_.erase(it);
    if (size <= limit_) {
      // Room for it: the largest cached blocks go first (a block above the limit is freed and
      // leaves the cache as it is).
      trim_locked(limit_ - size);
      free_.emplace(size, p);
      stats_.cached_bytes += size;
      return;
    }
    hold.unlock();
    c10::free_cpu(p);
  }

  // Frees cached blocks, largest first, until at most `keep` bytes stay cached.
  void trim_locked(size_t keep) {
    while (stats_.cached_bytes > keep && !free_.empty()) {
      auto last = std::prev(free_.end());
      stats_.cached_bytes -= last->first;
      c10::free_cpu(last->second);
      free_.erase(last);
    }
  }

  std::mutex mutex_;
  size_t limit_ = 0;
  std::multimap<size_t, void*> free_;        // cached blocks by size
  std::unordered_map<void*, size_t> live_;   // handed-out large blocks and their sizes
  AllocationCacheStats stats_;
};

}  // namespace

bool set_allocation_cache(int64_t limit_bytes) {
  TORCH_CHECK_VALUE(limit_bytes >= 0, "set_allocation_cache: limit_bytes must be >= 0, got ",
            limit_bytes);
  static std::once_flag forked;
  std::call_once(forked, [] {
    pthread_atfork([] { AllocationCache::instance().before_fork(); },
                   [] { AllocationCache::instance().after_fork(); },
                   [] { AllocationCache::instance().after_fork(); });
  });
  static c10::Allocator* previous = nullptr;
  auto& cache = AllocationCache::instance();
  cache.set_limit(static_cast<size_t>(limit_bytes));
  if (limit_bytes == 0) {
    // Back to the allocator before ours; blocks still out come back through `release` and
    // are freed there.
    if (c10::GetCPUAllocator() == &cache) c10::SetCPUAllocator(previous);
    return false;
  }
  if (c10::GetCPUAllocator() != &cache) {
    previous = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&cache);
  }
  // Another library may hold the CPU allocator at a higher priority: report, don't fight.
  return c10::GetCPUAllocator() == &cache;
}

AllocationCacheStats allocation_cache_stats() { return AllocationCache::instance().stats(); }

}  // namespace mmkernels
