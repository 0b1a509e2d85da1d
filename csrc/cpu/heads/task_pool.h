// run_tasks: a claim-by-counter task pool on ATen's inter-op threads, for the head-refit ops.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <thread>
#include <utility>

namespace mmkernels::cpu {

// Runs task(0..tasks-1) on at most `threads` threads, the caller's among them. Threads claim
// tasks from a shared counter, and the helpers come from ATen's inter-op pool (at::launch)
// rather than an OpenMP team: an OpenMP region ends in a barrier that waits for every team
// thread, so on a machine shared with other busy processes a helper that gets a CPU a
// scheduler time slice late (milliseconds) stalled every call. Here the caller runs whatever
// the helpers have not claimed and waits only for tasks a helper is running; a helper that
// starts after the last task was claimed finds nothing and returns (it touches only the
// shared, reference-counted counters). Results do not depend on which thread ran a task:
// each task has its own output slot, summed in task order afterwards.
//
// Exceptions: a task that throws (on any thread) stops the claiming of further tasks (the
// unclaimed ones are counted done at once); the caller still waits for every claimed task,
// so no helper runs a task after this frame is gone, then rethrows the first exception. (The
// inter-op pool would swallow a helper's exception; here it never leaves `work`.) If
// at::launch itself throws, the same: stop, wait for the claimed tasks, rethrow.
template <typename F>
void run_tasks(int64_t tasks, int64_t threads, const F& task) {
  if (tasks <= 1 || threads <= 1) {
    for (int64_t t = 0; t < tasks; ++t) task(t);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<bool> failed{false};
    std::exception_ptr error;  // written once, by the thread that set `failed`
    int64_t total = 0;
    // No further task is claimed; those never claimed count as done.
    void stop() {
      const int64_t first_unclaimed = next.exchange(total);
      if (first_unclaimed < total)
        done.fetch_add(total - first_unclaimed, std::memory_order_release);
    }
    void fail(std::exception_ptr e) {
      if (!failed.exchange(true)) error = std::move(e);
      stop();
    }
  };
  auto shared = std::make_shared<Shared>();
  shared->total = tasks;
  const std::function<void(int64_t)> run = [&task](int64_t t) { task(t); };
  // A helper may outlive this call: it holds `shared`, and dereferences `fn` (this frame's
  // `run`) only for a task it claimed, which this call waits for.
  auto work = [shared](const std::function<void(int64_t)>* fn) {
    for (int64_t t = shared->next.fetch_add(1); t < shared->total;
         t = shared->next.fetch_add(1)) {
      try {
        (*fn)(t);
      } catch (...) {
        shared->fail(std::current_exception());  // before this task's `done`: seen by the caller
      }
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  try {
    for (int64_t h = 1; h < std::min(threads, tasks); ++h)
      at::launch([work, fn = &run]() { work(fn); });
  } catch (...) {
    shared->fail(std::current_exception());
  }
  work(&run);
  while (shared->done.load(std::memory_order_acquire) < shared->total) std::this_thread::yield();
  if (shared->failed.load(std::memory_order_acquire)) std::rethrow_exception(shared->error);
}

}  // namespace mmkernels::cpu
