// The generic softmax-regression kernel, for any class count (used above 32 classes): per row
// of Z, C dot products for the logits, softmax, then C axpys into the gradient.
//
// The class count C is small (a head), so a GEMM with N = C runs far below peak in BLAS (MKL
// takes ~0.4 ms for 1024 x 128 x 6). Instead each row of Z is used twice while it sits in L1:
// C dot products for the logits (LANES independent accumulators, so the compiler vectorises
// without reassociating), softmax, then C axpys into the gradient. Z is read from memory once.
// The gradient is summed in BLOCK-row blocks in the compute dtype, then into float64.
#pragma once

#include "isa.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace mmkernels::cpu {

constexpr int64_t LANES = 16;
constexpr int64_t BLOCK = 256;

// One subset: loss (float64, without the penalty), gw_t [C, H] and gb [C] (float64, summed).
template <typename T>
MMK_INLINE void softmax_subset_body(const T* z, int64_t ld, int64_t n, int64_t H, int64_t C,
                                    const T* wt, const T* b, const int64_t* y, const T* sw,
                                    double* loss, double* gw_t, double* gb) {
  const int64_t Hv = H / LANES * LANES;
  // Raw pointers, taken once: in the target_clones copies std::vector's members are not
  // inlined (different target), and a call per element access was the bottleneck.
  std::vector<T> buf(3 * C + C * H, T(0));
  T* logit = buf.data();
  T* prob = logit + C;
  T* blk_b = prob + C;
  T* blk_w = blk_b + C;
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T* __restrict__ zi = z + i * ld;
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < C; ++c) {
      const T* __restrict__ wc = wt + c * H;
      T a[LANES] = {};
      for (int64_t h0 = 0; h0 < Hv; h0 += LANES)
        for (int64_t l = 0; l < LANES; ++l) a[l] += zi[h0 + l] * wc[h0 + l];
      T v = b[c];
      for (int64_t l = 0; l < LANES; ++l) v += a[l];
      for (int64_t h = Hv; h < H; ++h) v += zi[h] * wc[h];
      logit[c] = v;
      m = std::max(m, v);
    }
    T sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += (prob[c] = std::exp(logit[c] - m));
    const T lse = m + std::log(sum), inv = T(1) / sum;
    const T wi = sw ? sw[i] : T(1);
    total += static_cast<double>(wi) * static_cast<double>(lse - logit[y[i]]);
    for (int64_t c = 0; c < C; ++c) {
      const T d = wi * (prob[c] * inv - (c == y[i] ? T(1) : T(0)));
      blk_b[c] += d;
      T* __restrict__ g = blk_w + c * H;
      for (int64_t h = 0; h < H; ++h) g[h] += d * zi[h];
    }
    if ((i + 1) % BLOCK == 0 || i + 1 == n) {
      for (int64_t j = 0; j < C * H; ++j) gw_t[j] += blk_w[j];
      for (int64_t c = 0; c < C; ++c) gb[c] += blk_b[c];
      for (int64_t j = 0; j < C * H; ++j) blk_w[j] = T(0);
      for (int64_t c = 0; c < C; ++c) blk_b[c] = T(0);
    }
  }
  *loss = total;
}

}  // namespace mmkernels::cpu
