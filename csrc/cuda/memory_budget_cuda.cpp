// The memory budget's figure for a GPU (csrc/include/mmkernels/memory_budget.h): free device
// memory plus what torch's caching allocator holds reserved but unused (torch can hand that
// out without asking the driver). Installed when the library loads.
#include <mmkernels/memory_budget.h>

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace mmkernels::cuda {
namespace {

double cuda_free_bytes(const at::Device& device) {
  if (!device.is_cuda()) return -1;
  // torch.device("cuda") has no index (-1): it means the current device.
  const c10::DeviceIndex index =
      device.has_index() ? device.index() : c10::cuda::current_device();
  const c10::cuda::CUDAGuard guard(index);
  size_t free = 0, total = 0;
  if (cudaMemGetInfo(&free, &total) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the error: the budget is then unknown, not fatal
    return -1;
  }
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(index);
  const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  const double cached = (double)stats.reserved_bytes[all].current -
                        (double)stats.allocated_bytes[all].current;
  return (double)free + std::max(0.0, cached);
}

const bool kBudgetHookInstalled = [] {
  device_free_hook() = &cuda_free_bytes;
  return true;
}();

}  // namespace
}  // namespace mmkernels::cuda
