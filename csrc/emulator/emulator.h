// A host emulator of the CUDA execution model, for running the kernels of csrc/cuda/*.cuh as
// host C++ (no GPU): every CUDA thread of a block is a fiber; a deterministic scheduler runs
// each fiber until it blocks (at __syncthreads or at a warp-collective instruction: shuffles,
// votes, ldmatrix, mma.sync) and releases a barrier once every live thread it concerns has
// arrived. Shared memory is a host array with a shadow that records, per byte, who wrote and
// read it since the last barrier, so a missing barrier is reported as a race instead of
// silently passing; cp.async copies land only at cp.async.wait_group.
//
// Errors (races, deadlocks, divergent collectives, out-of-bounds shared memory, misaligned
// ldmatrix rows) abort the launch: launch() throws EmulatorError naming the block and thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>

namespace mmk_emu {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct EmulatorError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// What the kernel code of one thread sees (threadIdx, blockIdx, ...).
struct ThreadView {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  int linear = 0;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
};

const ThreadView& current();
unsigned char* dynamic_smem();

// Runs body once per thread of every block of the grid (blocks in order, one at a time).
void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);

// ---- called by the shim (csrc/emulator/shim.h) from inside a fiber ---------------------------

// Block barrier; returns the OR of every thread's `value` (so __syncthreads_or too).
int block_barrier(int value);

// A warp collective: every lane of the calling warp deposits `lane_data`; when all 32 have
// arrived, `op(lanes)` runs once (lanes[i] = lane i's pointer) and every lane resumes. All
// lanes must call the same op (else: divergent collective), and full warps are required.
using CollectiveOp = void (*)(void* const* lanes);
void warp_collective(CollectiveOp op, void* lane_data);
// Inside a collective op: attribute the next shared-memory accesses to this lane of the warp.
void collective_lane(int lane);

// Checked shared-memory accesses; `what` names the access in an error.
void smem_read(const void* p, size_t bytes, const char* what);
void smem_write(void* p, size_t bytes, const char* what);
bool is_smem(const void* p, size_t bytes);

// cp.async: the copy is staged now (src_bytes read, the rest zero) and lands in shared memory
// when a cp.async.wait_group of this thread covers its group.
void cp_async(void* smem_dst, const void* gmem_src, int cp_bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending_allowed);

[[noreturn]] void fail(const std::string& message);

// Counters, for tests of the emulator and for the "how much did it run" log.
struct Stats {
  long long blocks = 0, threads = 0, barriers = 0, collectives = 0, switches = 0;
};
Stats& stats();

}  // namespace mmk_emu
