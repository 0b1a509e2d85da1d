// The memory budget of the fused ops: a call whose output and workspace would exceed it raises
// torch.OutOfMemoryError (a RuntimeError) stating the bytes needed and the budget, before it
// allocates anything, instead of being killed by the kernel's OOM killer halfway through.
//
// The budget, in bytes:
//   * MMKERNELS_MEMORY_BUDGET when set: a finite byte count with an optional K/M/G/T suffix
//     (powers of 1024; "8G", "8GB" and "8GiB" are the same), > 0; "off" or "none" (any case)
//     disables the check ("0" is an error, not "no limit"). Read at every call.
//   * otherwise, on the CPU: 80 % of the memory available now, the smaller of MemAvailable
//     (/proc/meminfo) and the room left in this process's cgroup and its parents: the limit
//     minus the usage less the reclaimable inactive page cache (v2 memory.max, memory.current,
//     inactive_file; v1 memory.limit_in_bytes, memory.usage_in_bytes, total_inactive_file);
//     no limit where neither can be read.
//   * otherwise, on a GPU: 90 % of the device's free memory plus what torch's caching
//     allocator holds unused (the hook is installed by the CUDA sources); no limit without it.
// Calls that need less than kAlwaysFits are never checked (no file is read for them).
#pragma once

#include <mmkernels/accumulation.h>
#include <mmkernels/fusion_plan.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>

namespace mmkernels {

constexpr double kAlwaysFits = 64.0 * (1 << 20);  // bytes
constexpr double kHostFraction = 0.8, kDeviceFraction = 0.9;

struct Budget {
  double bytes = std::numeric_limits<double>::infinity();  // infinity: no limit
  std::string source;                                       // where the figure comes from
};

// Free bytes on a non-CPU device, or a negative value when unknown (set by the CUDA sources).
using DeviceFreeFn = double (*)(const at::Device&);
inline DeviceFreeFn& device_free_hook() {
  static DeviceFreeFn fn = nullptr;
  return fn;
}

// "123", "64K", "8G", "8GiB", "1.5T" (powers of 1024); a negative value on a malformed or
// non-finite string ("inf", "nan", "1e400").
inline double parse_bytes(const std::string& text) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || !std::isfinite(v) || !(v >= 0)) return -1;
  std::string rest(end);
  while (!rest.empty() && std::isspace((unsigned char)rest.back())) rest.pop_back();
  for (auto& ch : rest) ch = (char)std::tolower((unsigned char)ch);
  if (rest.size() == 3 && rest.compare(1, 2, "ib") == 0) rest.resize(1);  // "GiB"
  else if (!rest.empty() && rest.back() == 'b') rest.pop_back();         // "GB", "B"
  double scale = 1;
  if (!rest.empty()) {
    if (rest.size() != 1) return -1;
    switch (rest[0]) {
      case 'k': scale = 1024.0; break;
      case 'm': scale = 1024.0 * 1024; break;
      case 'g': scale = 1024.0 * 1024 * 1024; break;
      case 't': scale = 1024.0 * 1024 * 1024 * 1024; break;
      default: return -1;
    }
  }
  const double bytes = v * scale;
  return std::isfinite(bytes) ? bytes : -1;
}

// The first number in a small file, or a negative value.
inline double read_number(const char* path) {
  FILE* f = std::fopen(path, "r");
  if (!f) return -1;
  char buf[64] = {0};
  const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  buf[n] = 0;
  char* end = nullptr;
  const double v = std::strtod(buf, &end);
  return end == buf ? -1 : v;  // "max" (no cgroup limit) reads as unknown
}

// The value of `key` in a "key value" file (memory.stat), or a negative value.
inline double read_stat(const char* path, const char* key) {
  FILE* f = std::fopen(path, "r");
  if (!f) return -1;
  double v = -1;
  char line[256];
  const size_t klen = std::strlen(key);
  while (std::fgets(line, sizeof(line), f)) {
    if (std::strncmp(line, key, klen) == 0 && line[klen] == ' ') {
      v = std::strtod(line + klen + 1, nullptr);
      break;
    }
  }
  std::fclose(f);
  return v;
}

// This process's cgroup path ("/a/b") from /proc/self/cgroup: the "0::" line (v2) or the
// line of the memory controller (v1); "" when not found.
inline std::string own_cgroup(bool v2) {
  FILE* f = std::fopen("/proc/self/cgroup", "r");
  if (!f) return "";
  std::string found;
  char line[1024];
  while (std::fgets(line, sizeof(line), f)) {
    std::string l(line);
    while (!l.empty() && (l.back() == '\n' || l.back() == '\r')) l.pop_back();
    const size_t a = l.find(':'), b = a == std::string::npos ? a : l.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string ctrl = l.substr(a + 1, b - a - 1);
    bool memory = false;  // v1: "4:memory:/x" or "4:cpu,memory:/x"
    for (size_t p = 0; p <= ctrl.size();) {
      const size_t q = std::min(ctrl.find(',', p), ctrl.size());
      memory = memory || ctrl.compare(p, q - p, "memory") == 0;
      p = q + 1;
    }
    if ((v2 && l.compare(0, a, "0") == 0 && ctrl.empty()) || (!v2 && memory)) {
      found = l.substr(b + 1);
      break;
    }
  }
  std::fclose(f);
  return found.empty() || found[0] != '/' ? "" : found;
}

// Bytes of host memory available to this process now, or a negative value when unknown.
inline double available_host_bytes() {
  double avail = -1;
  if (FILE* f = std::fopen("/proc/meminfo", "r")) {
    char line[256];
    while (std::fgets(line, sizeof(line), f)) {
      long long kb = 0;
      if (std::sscanf(line, "MemAvailable: %lld kB", &kb) == 1) {
        avail = (double)kb * 1024.0;
        break;
      }
    }
    std::fclose(f);
  }
  // The cgroup's room: limit minus usage, where usage counts page cache the kernel reclaims
  // before it would OOM-kill; the inactive file pages are left out of it. Every level from
  // this process's own cgroup up to the root is checked (a parent's limit binds too).
  auto room = [&avail](const std::string& dir, bool v2) {
    const double limit =
        read_number((dir + (v2 ? "/memory.max" : "/memory.limit_in_bytes")).c_str());
    double used = read_number((dir + (v2 ? "/memory.current" : "/memory.usage_in_bytes")).c_str());
    // cgroup v1 reports "no limit" as a huge number (about 2^63).
    if (!(limit > 0 && limit < 1e18 && used >= 0)) return;
    const double cache =
        read_stat((dir + "/memory.stat").c_str(), v2 ? "inactive_file" : "total_inactive_file");
    if (cache > 0) used = std::max(0.0, used - cache);
    const double left = std::max(0.0, limit - used);
    avail = avail < 0 ? left : std::min(avail, left);
  };
  for (const bool v2 : {true, false}) {
    const std::string root = v2 ? "/sys/fs/cgroup" : "/sys/fs/cgroup/memory";
    std::string path = own_cgroup(v2);  // "" when unknown; then the root alone
    while (!path.empty() && path != "/") {
      room(root + path, v2);
      path.resize(path.rfind('/'));
    }
    room(root, v2);
  }
  return avail;
}

inline Budget memory_budget(const at::Device& device) {
  Budget b;
  if (const char* env = std::getenv("MMKERNELS_MEMORY_BUDGET")) {
    const std::string text(env);
    std::string lower(text);
    for (auto& ch : lower) ch = (char)std::tolower((unsigned char)ch);
    if (lower == "off" || lower == "none") {
      b.source = "MMKERNELS_MEMORY_BUDGET=" + text + ": no limit";
      return b;
    }
    const double v = parse_bytes(text);
    TORCH_CHECK_VALUE(v > 0, "MMKERNELS_MEMORY_BUDGET must be a byte count such as 1073741824, "
                      "512M, 8G or 8GiB, finite and > 0 (or \"off\"), got \"", text, "\"");
    b.bytes = v;
    b.source = "MMKERNELS_MEMORY_BUDGET=" + text;
    return b;
  }
  if (device.is_cpu()) {
    const double avail = available_host_bytes();
    if (avail >= 0) {
      b.bytes = kHostFraction * avail;
      b.source = "80% of the memory available now";
    }
    return b;
  }
  if (device_free_hook()) {
    const double free = device_free_hook()(device);
    if (free >= 0) {
      b.bytes = kDeviceFraction * free;
      b.source = "90% of the free memory of " + device.str();
    }
  }
  return b;
}

inline std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (bytes >= 1024 && u < 6) {
    bytes /= 1024;
    ++u;
  }
  std::ostringstream os;
  os.precision(bytes < 10 ? 2 : 3);
  os << bytes << " " << units[u];
  return os.str();
}

inline std::string exact_bytes(double bytes) {
  std::ostringstream os;
  os.setf(std::ios::fixed);
  os.precision(0);
  os << bytes;
  return os.str();
}

// Raises torch.OutOfMemoryError when `needed` bytes exceed the budget of `device`.
inline void check_memory_budget(const char* op, double needed, const at::Device& device,
                                const std::string& what) {
  const bool forced = std::getenv("MMKERNELS_MEMORY_BUDGET") != nullptr;
  if (needed < kAlwaysFits && !forced) return;
  const Budget b = memory_budget(device);
  TORCH_CHECK_WITH(OutOfMemoryError, needed <= b.bytes, op, ": needs about ",
                   human_bytes(needed), " (", exact_bytes(needed), " bytes) for ", what,
                   ", more than the memory budget of ", human_bytes(b.bytes), " (",
                   exact_bytes(b.bytes), " bytes: ", b.source,
                   "). Split the batch (or the subsets) into smaller calls, or set "
                   "MMKERNELS_MEMORY_BUDGET (e.g. 64G, or off) to change the budget.");
}

// Bytes a fused op holds at once on top of its inputs: the output (forward) or the gradients
// (backward), the per-modality GEMM results, the accumulation-dtype copies of the inputs and
// weight stacks, and contiguous copies of strided inputs. An upper bound within a few percent;
// computed in double so that absurd sizes cannot overflow.
inline double fused_op_bytes(const FusionPlan& p, bool concat_first, bool backward,
                             at::TensorList xs, int64_t weight_numel, bool grads_contiguous,
                             const c10::optional<at::Tensor>& sample_mask) {
  const double elem = (double)xs[0].element_size();
  const double acc = (double)c10::elementSize(accumulation_dtype(xs[0].scalar_type()));
  const double B = (double)p.B, S = (double)p.S;
  const double width = (double)output_width(p, concat_first);
  double total = S * B * width * elem;  // the output, or grad_out's and out's dense copies
  if (backward) total = grads_contiguous ? 0.0 : 2 * S * B * width * elem;
  for (int64_t k = 0; k < p.K; ++k) {
    if (!p.modality_used(k)) continue;
    const double ncols = (double)p.nblocks(k) * (double)p.widths[k], d = (double)p.dims[k];
    total += B * ncols * acc + ncols * d * acc + B * d * acc;  // T_k or R_k, stack, x in acc
    if (!xs[k].is_contiguous()) total += B * d * elem;
    if (backward) total += B * d * (acc + elem) + ncols * d * acc;  // grad_x, grad of stack
  }
  if (backward) total += (double)weight_numel * (acc + elem);
  if (sample_mask.has_value()) {  // a dense copy of a strided mask; row lists of the gathers
    if (!sample_mask->is_contiguous()) total += B * (double)p.K;
    total += 2 * 8.0 * B * (double)p.K;
  }
  return total;
}

// Checks a fused op's call against the budget of the device of xs.
inline void check_fused_budget(const char* op, const FusionPlan& p, bool concat_first,
                               bool backward, at::TensorList xs, int64_t weight_numel,
                               bool grads_contiguous,
                               const c10::optional<at::Tensor>& sample_mask) {
  const double needed = fused_op_bytes(p, concat_first, backward, xs, weight_numel,
                                       grads_contiguous, sample_mask);
  const std::string what = (backward ? "the gradients of output " : "its output ") +
                           shape_str(output_shape(p, concat_first)) + " and its workspace";
  check_memory_budget(op, needed, xs[0].device(), what);
}

}  // namespace mmkernels
