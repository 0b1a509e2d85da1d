// The emulator's runtime: fibers, the scheduler, the shared-memory shadow and cp.async.
#include "emulator.h"

#include <sys/mman.h>

#include <cstring>
#include <memory>
#include <sstream>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define MMK_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MMK_EMU_ASAN 1
#endif
#endif
#ifdef MMK_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#error "the emulator's fiber switch is written for x86-64"
#endif

// Saves the callee-saved registers and the stack pointer in *from, loads those of `to`.
extern "C" void mmk_emu_switch(void** from_sp, void* to_sp);
// A new fiber starts here: r12 holds its Fiber*, handed to mmk_emu_fiber_main.
extern "C" void mmk_emu_trampoline();
extern "C" void mmk_emu_fiber_main(void* fiber);

asm(R"(
.text
.globl mmk_emu_switch
.type mmk_emu_switch,@function
mmk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size mmk_emu_switch,.-mmk_emu_switch
.globl mmk_emu_trampoline
.type mmk_emu_trampoline,@function
mmk_emu_trampoline:
  movq %r12, %rdi
  call mmk_emu_fiber_main
  ud2
.size mmk_emu_trampoline,.-mmk_emu_trampoline
)");

namespace mmk_emu {
namespace {

constexpr size_t kStackBytes = 512 * 1024;
constexpr int kWarp = 32;

enum class Wait { none, barrier, collective, done };

struct PendingCopy {
  unsigned char* dst;
  std::vector<unsigned char> data;
  int group;
};

struct Fiber {
  ThreadView view;
  void* sp = nullptr;
  unsigned char* stack = nullptr;  // lowest usable address (a guard page lies below)
  Wait wait = Wait::none;
  int barrier_value = 0, barrier_result = 0;
  CollectiveOp op = nullptr;
  void* lane_data = nullptr;
  std::vector<PendingCopy> copies;
  int open_group = 0;  // index of the group cp.async adds to now
#ifdef MMK_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

// Per byte of shared memory: who touched it since the last barrier.
struct Shadow {
  uint32_t write_epoch = 0, read_epoch = 0;
  int32_t writer = -1, reader = -1;  // reader -2: several threads
  bool written = false, pending = false;
};

constexpr int32_t kManyReaders = -2;

struct Block {
  std::vector<Fiber> fibers;
  std::vector<unsigned char> smem;
  std::vector<Shadow> shadow;
  uint32_t epoch = 1;
  void* scheduler_sp = nullptr;
  Fiber* running = nullptr;
  const std::function<void()>* body = nullptr;
  std::string error;
  int collective_warp0 = -1;  // >= 0 while a warp collective runs (in the scheduler's context)
};

Block* g_block = nullptr;
Stats g_stats;
#ifdef MMK_EMU_ASAN
const void* g_main_bottom = nullptr;
size_t g_main_size = 0;
#endif

unsigned char* stack_pool(size_t fibers) {
  // One mapping reused by every launch; each stack has a PROT_NONE guard page below it.
  static unsigned char* pool = nullptr;
  static size_t pool_fibers = 0;
  const size_t page = 4096, span = kStackBytes + page;
  if (fibers > pool_fibers) {
    if (pool) {
#ifdef MMK_EMU_ASAN
      // Frames left on the old stacks keep their redzones poisoned: clear the shadow before
      // the pages go back (the next mapping there, maybe Python's heap, must start clean).
      for (size_t i = 0; i < pool_fibers; ++i) ASAN_UNPOISON_MEMORY_REGION(pool + i * span + page, kStackBytes);
#endif
      munmap(pool, pool_fibers * span);
    }
    void* p = mmap(nullptr, fibers * span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED) throw EmulatorError("emulator: cannot map fiber stacks");
    pool = static_cast<unsigned char*>(p);
    pool_fibers = fibers;
    for (size_t i = 0; i < fibers; ++i) mprotect(pool + i * span, page, PROT_NONE);
  }
  return pool;
}

std::string who(const Fiber& f) {
  std::ostringstream os;
  os << "block (" << f.view.block_idx.x << "," << f.view.block_idx.y << "," << f.view.block_idx.z
     << ") thread (" << f.view.thread_idx.x << "," << f.view.thread_idx.y << ","
     << f.view.thread_idx.z << ")";
  return os.str();
}

void switch_to_scheduler(Fiber& f, bool finished) {
#ifdef MMK_EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, g_main_bottom, g_main_size);
#else
  (void)finished;
#endif
  ++g_stats.switches;
  mmk_emu_switch(&f.sp, g_block->scheduler_sp);
#ifdef MMK_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

void resume(Fiber& f) {
  g_block->collective_warp0 = -1;
  g_block->running = &f;
#ifdef MMK_EMU_ASAN
  void* scheduler_fake = nullptr;
  __sanitizer_start_switch_fiber(&scheduler_fake, f.stack, kStackBytes);
#endif
  ++g_stats.switches;
  mmk_emu_switch(&g_block->scheduler_sp, f.sp);
#ifdef MMK_EMU_ASAN
  __sanitizer_finish_switch_fiber(scheduler_fake, nullptr, nullptr);
#endif
  g_block->running = nullptr;
}

Fiber& self() {
  if (!g_block || !g_block->running) throw EmulatorError("emulator: device code called outside a launch");
  return *g_block->running;
}

void land_copies(Fiber& f, int keep_groups);

}  // namespace
}  // namespace mmk_emu

extern "C" void mmk_emu_fiber_main(void* fiber) {
  using namespace mmk_emu;
  auto& f = *static_cast<Fiber*>(fiber);
#ifdef MMK_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_main_bottom, &g_main_size);
#endif
  (*g_block->body)();
  if (!f.copies.empty()) fail("thread exited with cp.async copies in flight (no cp.async.wait_group 0)");
  f.wait = Wait::done;
  switch_to_scheduler(f, true);
  __builtin_unreachable();
}

namespace mmk_emu {

const ThreadView& current() { return self().view; }

unsigned char* dynamic_smem() {
  self();
  return g_block->smem.data();
}

Stats& stats() { return g_stats; }

void collective_lane(int lane) {
  if (!g_block || g_block->collective_warp0 < 0) throw EmulatorError("collective_lane outside a collective");
  g_block->running = &g_block->fibers[g_block->collective_warp0 + lane];
}

void fail(const std::string& message) {
  if (g_block && g_block->collective_warp0 >= 0) {
    // Inside a warp collective: we are on the scheduler's own stack, so throw.
    throw EmulatorError(who(*g_block->running) + ": " + message);
  }
  Fiber& f = self();
  if (g_block->error.empty()) g_block->error = who(f) + ": " + message;
  // Never resumed again: the launch is abandoned (kernel code holds no resources).
  f.wait = Wait::done;
  switch_to_scheduler(f, true);
  __builtin_unreachable();
}

int block_barrier(int value) {
  Fiber& f = self();
  f.wait = Wait::barrier;
  f.barrier_value = value;
  switch_to_scheduler(f, false);
  return f.barrier_result;
}

void warp_collective(CollectiveOp op, void* lane_data) {
  Fiber& f = self();
  f.wait = Wait::collective;
  f.op = op;
  f.lane_data = lane_data;
  switch_to_scheduler(f, false);
}

bool is_smem(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  const auto& s = g_block->smem;
  return c >= s.data() && c + bytes <= s.data() + s.size();
}

namespace {

size_t smem_offset(const void* p, size_t bytes, const char* what) {
  if (!is_smem(p, bytes)) {
    std::ostringstream os;
    os << what << ": " << bytes << " bytes at " << p << " lie outside the block's "
       << g_block->smem.size() << " bytes of shared memory";
    fail(os.str());
  }
  return static_cast<size_t>(static_cast<const unsigned char*>(p) - g_block->smem.data());
}

void race(const char* kind, const char* what, size_t offset, int other) {
  std::ostringstream os;
  os << what << ": " << kind << " race on shared byte " << offset << " with thread " << other
     << " (no __syncthreads between the two accesses)";
  fail(os.str());
}

void check_write(Shadow& sh, int me, const char* what, size_t offset, uint32_t epoch) {
  if (sh.write_epoch == epoch && sh.writer != me) race("write-after-write", what, offset, sh.writer);
  if (sh.read_epoch == epoch && sh.reader != me && sh.reader != -1)
    race("write-after-read", what, offset, sh.reader);
}

}  // namespace

void smem_read(const void* p, size_t bytes, const char* what) {
  Fiber& f = self();
  const size_t off = smem_offset(p, bytes, what);
  const uint32_t epoch = g_block->epoch;
  for (size_t i = 0; i < bytes; ++i) {
    Shadow& sh = g_block->shadow[off + i];
    if (sh.pending) {
      std::ostringstream os;
      os << what << ": reads shared byte " << off + i << " while a cp.async to it (thread "
         << sh.writer << ") has not been waited for";
      fail(os.str());
    }
    if (!sh.written) {
      std::ostringstream os;
      os << what << ": reads shared byte " << off + i
         << ", which no thread has written yet (a missing barrier or cp.async wait?)";
      fail(os.str());
    }
    if (sh.write_epoch == epoch && sh.writer != f.view.linear)
      race("read-after-write", what, off + i, sh.writer);
    if (sh.read_epoch == epoch && sh.reader != f.view.linear) sh.reader = kManyReaders;
    else sh.reader = f.view.linear;
    sh.read_epoch = epoch;
  }
}

void smem_write(void* p, size_t bytes, const char* what) {
  Fiber& f = self();
  const size_t off = smem_offset(p, bytes, what);
  const uint32_t epoch = g_block->epoch;
  for (size_t i = 0; i < bytes; ++i) {
    Shadow& sh = g_block->shadow[off + i];
    if (sh.pending) {
      std::ostringstream os;
      os << what << ": writes shared byte " << off + i << " while a cp.async to it is in flight";
      fail(os.str());
    }
    check_write(sh, f.view.linear, what, off + i, epoch);
    sh.write_epoch = epoch;
    sh.writer = f.view.linear;
    sh.written = true;
  }
}

void cp_async(void* smem_dst, const void* gmem_src, int cp_bytes, int src_bytes) {
  Fiber& f = self();
  if (cp_bytes != 4 && cp_bytes != 8 && cp_bytes != 16) fail("cp.async: cp-size must be 4, 8 or 16");
  if (src_bytes < 0 || src_bytes > cp_bytes) fail("cp.async: src-size must lie in [0, cp-size]");
  if (reinterpret_cast<uintptr_t>(smem_dst) % cp_bytes != 0 ||
      (src_bytes > 0 && reinterpret_cast<uintptr_t>(gmem_src) % cp_bytes != 0))
    fail("cp.async: addresses must be aligned to cp-size");
  const size_t off = smem_offset(smem_dst, cp_bytes, "cp.async");
  PendingCopy c{static_cast<unsigned char*>(smem_dst), std::vector<unsigned char>(cp_bytes, 0),
                f.open_group};
  if (src_bytes > 0) std::memcpy(c.data.data(), gmem_src, src_bytes);  // ASan checks this read
  const uint32_t epoch = g_block->epoch;
  for (int i = 0; i < cp_bytes; ++i) {
    Shadow& sh = g_block->shadow[off + i];
    if (sh.pending) fail("cp.async: two copies in flight to one shared byte");
    check_write(sh, f.view.linear, "cp.async", off + i, epoch);
    sh.pending = true;
    sh.writer = f.view.linear;
  }
  f.copies.push_back(std::move(c));
}

void cp_async_commit() { ++self().open_group; }

void cp_async_wait(int pending_allowed) {
  Fiber& f = self();
  land_copies(f, pending_allowed);
}

namespace {

void land_copies(Fiber& f, int keep_groups) {
  // Groups are numbered in commit order; the newest `keep_groups` committed ones stay.
  const int first_kept = f.open_group - keep_groups;
  const uint32_t epoch = g_block->epoch;
  std::vector<PendingCopy> left;
  for (auto& c : f.copies) {
    if (c.group >= first_kept) {
      left.push_back(std::move(c));
      continue;
    }
    std::memcpy(c.dst, c.data.data(), c.data.size());
    const size_t off = static_cast<size_t>(c.dst - g_block->smem.data());
    for (size_t i = 0; i < c.data.size(); ++i) {
      Shadow& sh = g_block->shadow[off + i];
      sh.pending = false;
      sh.written = true;
      sh.write_epoch = epoch;
      sh.writer = f.view.linear;
    }
  }
  f.copies = std::move(left);
}

std::string describe(const Fiber& f) {
  switch (f.wait) {
    case Wait::barrier: return "__syncthreads";
    case Wait::collective: return "a warp collective";
    case Wait::done: return "exited";
    default: return "running";
  }
}

// Releases whatever barrier can complete; false when none can (a deadlock).
bool release(Block& b) {
  const int n = (int)b.fibers.size();
  bool any_waiting = false, all_at_barrier = true;
  for (auto& f : b.fibers) {
    if (f.wait == Wait::done) continue;
    any_waiting = true;
    if (f.wait != Wait::barrier) all_at_barrier = false;
  }
  if (!any_waiting) return true;
  bool progressed = false;
  // Warp collectives first: a warp whose live lanes all wait at one.
  for (int w0 = 0; w0 < n; w0 += kWarp) {
    const int w1 = std::min(n, w0 + kWarp);
    bool all = true, none = true;
    CollectiveOp op = nullptr;
    for (int i = w0; i < w1; ++i) {
      auto& f = b.fibers[i];
      if (f.wait == Wait::collective) {
        none = false;
        if (op && f.op != op) {
          b.error = who(f) + ": lanes of one warp wait at different warp collectives (divergence)";
          return false;
        }
        op = f.op;
      } else {
        all = false;
      }
    }
    if (none) continue;
    if (!all) continue;  // the other lanes may still arrive
    if (w1 - w0 != kWarp) {
      b.error = who(b.fibers[w0]) + ": warp collective in a partial warp (blockDim not a multiple of 32)";
      return false;
    }
    void* lanes[kWarp];
    for (int i = 0; i < kWarp; ++i) lanes[i] = b.fibers[w0 + i].lane_data;
    b.running = &b.fibers[w0];  // collective_lane() moves this to the lane being served
    b.collective_warp0 = w0;
    ++g_stats.collectives;
    op(lanes);
    b.collective_warp0 = -1;
    b.running = nullptr;
    for (int i = w0; i < w1; ++i) b.fibers[i].wait = Wait::none;
    progressed = true;
  }
  if (progressed) return true;
  if (all_at_barrier) {
    int any = 0;
    for (auto& f : b.fibers)
      if (f.wait == Wait::barrier) any |= f.barrier_value ? 1 : 0;
    for (auto& f : b.fibers)
      if (f.wait == Wait::barrier) {
        f.wait = Wait::none;
        f.barrier_result = any;
      }
    ++b.epoch;
    ++g_stats.barriers;
    return true;
  }
  std::ostringstream os;
  os << "deadlock:";
  for (auto& f : b.fibers)
    if (f.wait != Wait::done) os << " [" << who(f) << ": " << describe(f) << "]";
  for (auto& f : b.fibers)
    if (f.wait == Wait::done) {
      os << " (some threads exited while others wait)";
      break;
    }
  b.error = os.str();
  return false;
}

}  // namespace

void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  if (g_block) throw EmulatorError("emulator: launch from inside a launch");
  const int n = (int)(block.x * block.y * block.z);
  if (n <= 0 || n > 1024) throw EmulatorError("emulator: a block has 1 to 1024 threads");
  // The default dynamic shared-memory limit of a launch (more needs cudaFuncSetAttribute,
  // which the kernels do not call).
  if (smem_bytes > 48 * 1024) throw EmulatorError("emulator: more than 48 KiB of dynamic shared memory");
  unsigned char* pool = stack_pool(n);
  Block b;
  b.body = &body;
  b.fibers.resize(n);
  b.smem.assign(smem_bytes, 0xff);  // NaN in every float type, should a read slip through
  b.shadow.assign(smem_bytes, Shadow{});
  g_block = &b;
  struct Reset {
    ~Reset() { g_block = nullptr; }
  } reset;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        ++g_stats.blocks;
        std::fill(b.smem.begin(), b.smem.end(), 0xff);
        std::fill(b.shadow.begin(), b.shadow.end(), Shadow{});
        b.epoch = 1;
        for (int i = 0; i < n; ++i) {
          Fiber& f = b.fibers[i];
          f = Fiber{};
          f.view.block_idx = dim3(bx, by, bz);
          f.view.grid_dim = grid;
          f.view.block_dim = block;
          f.view.thread_idx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          f.view.linear = i;
          f.stack = pool + i * (kStackBytes + 4096) + 4096;
#ifdef MMK_EMU_ASAN
          // A fiber of an earlier block may have left its frames' redzones poisoned.
          ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);
#endif
          // Initial frame: six callee-saved registers (r12 = the fiber), then the trampoline
          // as return address; 16-byte aligned at the trampoline's call.
          auto* top = reinterpret_cast<void**>(f.stack + kStackBytes);
          top -= 2;  // alignment padding
          *--top = reinterpret_cast<void*>(&mmk_emu_trampoline);
          *--top = nullptr;  // rbp
          *--top = nullptr;  // rbx
          *--top = &f;       // r12
          *--top = nullptr;  // r13
          *--top = nullptr;  // r14
          *--top = nullptr;  // r15
          f.sp = top;
          ++g_stats.threads;
        }
        for (;;) {
          for (auto& f : b.fibers) {
            if (f.wait != Wait::none) continue;
            resume(f);
            if (!b.error.empty()) throw EmulatorError(b.error);
          }
          bool done = true;
          for (auto& f : b.fibers) done = done && f.wait == Wait::done;
          if (done) break;
          if (!release(b)) throw EmulatorError(b.error);
        }
      }
}

}  // namespace mmk_emu
