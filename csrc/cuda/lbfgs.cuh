// The kernel of mmkernels::lbfgs_direction on CUDA (no torch header; the host emulator runs this
// source).
//
// One block per problem row i (a block loops over rows when k exceeds the grid), its threads
// striding over the row's P elements; q (then r) lives in the output row, each element owned by
// one thread for the whole launch, so only the dot products need the block: a butterfly in each
// warp, then the warps' sums in warp order (fixed order, no atomics: the result depends on the
// shapes alone). Each pass over the row applies the previous pair's pending update and takes
// the next pair's dot product together, so q is read once per pair, not twice. A row is one
// block's so that the recursion's 2m dependent dot products need no grid-wide step; the price:
// fewer problems than multiprocessors leave some idle.
//
// The pair pointers ride in the kernel's parameters, kLbfgsPairs per launch. Longer histories
// take several launches in stream order: the first loop over chunks of pairs newest -> oldest
// (stage forward, the alphas to a workspace), the oldest chunk's both loops and the scaling in
// between (stage turn, its alphas in shared memory), then the second loop over the other
// chunks oldest -> newest (stage backward); the launch holding pair 0 last writes d = -r.
#pragma once

#include "device.cuh"

#include <cstdint>
#include <limits>

namespace mmkernels::cuda {

constexpr int kLbfgsPairs = 32;        // pairs per launch
constexpr int kLbfgsMaxThreads = 256;  // 8 warps; fewer for short rows (lbfgs_threads)
constexpr int kLbfgsWarps = kLbfgsMaxThreads / 32;
constexpr int kLbfgsBlocksPerSm = 32;  // the most resident blocks of an sm_80 / sm_90 SM
constexpr int kLbfgsBatch = 4;         // elements per thread whose loads are in flight at once

enum LbfgsStage : int32_t { kLbfgsForward = 0, kLbfgsTurn = 1, kLbfgsBackward = 2 };

struct LbfgsParams {
  int64_t k, P;
  const void* src;    // [k, P]: q when the launch starts (grad for the first, else out)
  void* out;          // [k, P]: q or r when it ends; d = -r after the launch holding pair 0
  const void* gamma;  // [k]
  const void* diag;   // [k, P], or null (the identity)
  void* alpha;        // [m, k]: the alphas of the forward stages, read by the backward ones
  int32_t stage;      // LbfgsStage
  int32_t pairs;      // pairs of this launch, 0..kLbfgsPairs (0 only when m = 0)
  int64_t first;      // the index (newest first) of its pair 0
  const void* s[kLbfgsPairs];    // pair first + t at t
  const void* y[kLbfgsPairs];
  const void* rho[kLbfgsPairs];  // [n_t] each
  const int64_t* rows;           // [m, k]: problem i's row of pair j; null: row i
  int64_t n[kLbfgsPairs];        // rows of pair t (for the range test)
};

// Problem i's row of pair t of the launch; -1 when it is out of range (the problem's direction
// is then NaN: a kernel cannot raise, and reading the row would be out of bounds).
MMK_DEVICE int64_t lbfgs_pair_row(const LbfgsParams& p, int t, int64_t i) {
  if (!p.rows) return i;
  const int64_t r = p.rows[(p.first + t) * p.k + i];
  return r >= 0 && r < p.n[t] ? r : -1;
}

// Shared memory: the turn's alphas and two sets of warp sums (lbfgs_block_sum).
template <typename T>
constexpr int64_t lbfgs_smem_bytes() {
  return (kLbfgsPairs + 2 * kLbfgsWarps) * (int64_t)sizeof(T);
}

// Threads per block: whole warps, no more than the row has elements (up to 8 warps), so that
// short rows leave room for more resident problems.
inline int lbfgs_threads(int64_t P) {
  const int64_t warps = (P + 31) / 32;
  return 32 * (int)(warps < kLbfgsWarps ? (warps > 0 ? warps : 1) : kLbfgsWarps);
}

// The block's sum of v, the same in every thread. The warp sums alternate between two slots so
// that one barrier per call suffices: a thread writes a slot again only after the next call's
// barrier, which every thread reaches after reading this call's sums.
template <typename T>
MMK_DEVICE T lbfgs_block_sum(T v, T* red, int& slot) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  T* sums = red + slot * kLbfgsWarps;
  slot ^= 1;
  if (threadIdx.x % 32 == 0) sstore(&sums[threadIdx.x / 32], v);
  __syncthreads();
  const int warps = (int)(blockDim.x / 32);
  T total = T(0);
  for (int w = 0; w < warps; ++w) total += sload(&sums[w]);
  return total;
}

// One row of the launch: where q is read (src: the launch's input at first, then dst).
template <typename T>
struct LbfgsRow {
  const T* src;
  T* dst;
  const T* diag;  // null: the identity
  T gamma;
  int64_t P;
};

// What one pass does to each element v of the row, in this order: v += coef * upd[e] (the
// previous pair's update, when upd), v = v * gamma * diag[e] (scale), v = -v (negate); and
// the dot product it returns, of dot[e] and the new v (when dot).
template <typename T>
struct LbfgsPass {
  const T* upd = nullptr;
  T coef = T(0);
  bool scale = false, negate = false;
  const T* dot = nullptr;
};

template <typename T>
MMK_DEVICE T lbfgs_pass(LbfgsRow<T>& row, const LbfgsPass<T>& pass, T* red, int& slot) {
  // A pass that only reads (the backward stage's first) need not write q back.
  const bool writes = pass.upd || pass.scale || pass.negate || row.src != row.dst;
  const int64_t step = blockDim.x;
  T part = T(0);
  for (int64_t e0 = threadIdx.x; e0 < row.P; e0 += kLbfgsBatch * step) {
    // The batch's loads all go out before its first store (which they could not pass: dst
    // may be src), so that a thread has several in flight: with one block per problem,
    // what each block keeps in flight bounds the bandwidth.
    T v[kLbfgsBatch], u[kLbfgsBatch], w[kLbfgsBatch], g[kLbfgsBatch];
    MMK_UNROLL
    for (int j = 0; j < kLbfgsBatch; ++j) {
      const int64_t e = e0 + j * step;
      const bool in = e < row.P;
      v[j] = in ? row.src[e] : T(0);
      u[j] = in && pass.upd ? pass.upd[e] : T(0);
      w[j] = in && pass.dot ? pass.dot[e] : T(0);
      g[j] = in && pass.scale && row.diag ? row.diag[e] : T(1);
    }
    MMK_UNROLL
    for (int j = 0; j < kLbfgsBatch; ++j) {
      if (pass.upd) v[j] = mmk_fma(pass.coef, u[j], v[j]);
      if (pass.scale) v[j] = v[j] * row.gamma * g[j];
      if (pass.negate) v[j] = -v[j];
      const int64_t e = e0 + j * step;
      if (writes && e < row.P) row.dst[e] = v[j];
      part = mmk_fma(w[j], v[j], part);
    }
  }
  row.src = row.dst;
  return pass.dot ? lbfgs_block_sum(part, red, slot) : T(0);
}

template <typename T>
__global__ void __launch_bounds__(kLbfgsMaxThreads)
lbfgs_kernel(LbfgsParams p) {
  MMK_DYNAMIC_SMEM(smem);
  T* alphas = reinterpret_cast<T*>(smem);  // [kLbfgsPairs], the turn stage's
  T* red = alphas + kLbfgsPairs;           // [2][kLbfgsWarps]
  T* alpha_ws = static_cast<T*>(p.alpha);
  int slot = 0;
  const int n = p.pairs;
  for (int64_t i = blockIdx.x; i < p.k; i += gridDim.x) {
    const int64_t at = i * p.P;
    LbfgsRow<T> row{static_cast<const T*>(p.src) + at, static_cast<T*>(p.out) + at,
                    p.diag ? static_cast<const T*>(p.diag) + at : nullptr,
                    static_cast<const T*>(p.gamma)[i], p.P};
    // A pair's row out of range poisons the direction (the later launches then carry the
    // NaN through). The rows are read again where they are used: an array of them indexed by
    // a run-time t would live in local memory.
    bool bad = false;
    for (int t = 0; t < n; ++t) bad = bad || lbfgs_pair_row(p, t, i) < 0;
    if (bad) {
      for (int64_t e = threadIdx.x; e < p.P; e += blockDim.x)
        row.dst[e] = std::numeric_limits<T>::quiet_NaN();
      continue;
    }
    LbfgsPass<T> pass;  // carries each pair's update into the pass of the next
    if (p.stage != kLbfgsBackward) {
      // The first loop, newest pair first: a_t = rho_t s_t.q, then q -= a_t y_t.
      for (int t = 0; t < n; ++t) {
        const int64_t r = lbfgs_pair_row(p, t, i);
        pass.dot = static_cast<const T*>(p.s[t]) + r * p.P;
        const T a = static_cast<const T*>(p.rho[t])[r] * lbfgs_pass(row, pass, red, slot);
        if (threadIdx.x == 0) {
          if (p.stage == kLbfgsTurn) sstore(&alphas[t], a);
          else alpha_ws[(p.first + t) * p.k + i] = a;
        }
        pass = LbfgsPass<T>{};
        pass.upd = static_cast<const T*>(p.y[t]) + r * p.P;
        pass.coef = -a;
      }
      if (p.stage == kLbfgsForward) {
        lbfgs_pass(row, pass, red, slot);
        continue;
      }
      pass.scale = true;  // r = gamma diag q, ahead of the second loop's first dot product
    }
    // The second loop, oldest pair first: beta_t = rho_t y_t.r, then r += (a_t - beta_t) s_t.
    for (int t = n - 1; t >= 0; --t) {
      const int64_t r = lbfgs_pair_row(p, t, i);
      pass.dot = static_cast<const T*>(p.y[t]) + r * p.P;
      const T beta = static_cast<const T*>(p.rho[t])[r] * lbfgs_pass(row, pass, red, slot);
      const T a = p.stage == kLbfgsTurn ? sload(&alphas[t]) : alpha_ws[(p.first + t) * p.k + i];
      pass = LbfgsPass<T>{};
      pass.upd = static_cast<const T*>(p.s[t]) + r * p.P;
      pass.coef = a - beta;
    }
    pass.negate = p.first == 0;
    lbfgs_pass(row, pass, red, slot);
  }
}

}  // namespace mmkernels::cuda
