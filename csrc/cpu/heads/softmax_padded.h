// The padded softmax-regression kernel, for 17..32 classes: classes in the vector lanes.
#pragma once

#include "isa.h"
#include "softmax_generic.h"  // BLOCK

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace mmkernels::cpu {

// One subset for C <= CP with W padded to [H, CP] (zero columns past C): the logits of a row
// are H broadcast-FMAs over CP lanes, in four independent chains (no horizontal sums), and
// the gradient is H FMAs over the same lanes into gw [H, CP]. ~3x the throughput of the
// generic body at H = 64..128, C = 6.
// R rows at once: each W row loaded feeds R independent FMA chains (two per row, over even
// and odd h), and each gradient row is loaded and stored once per R rows instead of per row
// (one row at a time the kernel was bound by FMA latency and by stores).
template <typename T, int CP, int R>
MMK_INLINE void softmax_rows(const T* z, int64_t ld, int64_t i, int64_t H, int64_t C,
                             const T* wp, const T* b, const int64_t* y, const T* sw,
                             double& total, T* blk_w_raw, T* blk_b_raw) {
  typedef T V __attribute__((vector_size(CP * sizeof(T)), aligned(sizeof(T))));
  V* blk_w = reinterpret_cast<V*>(blk_w_raw);
  V* blk_b = reinterpret_cast<V*>(blk_b_raw);
  const V* wv = reinterpret_cast<const V*>(wp);
  const T* zr[R];
  for (int r = 0; r < R; ++r) zr[r] = z + (i + r) * ld;
  V a[R], a2[R], d[R];
  for (int r = 0; r < R; ++r) a[r] = a2[r] = V{};
  int64_t h = 0;
  for (; h + 2 <= H; h += 2) {
    const V w0 = wv[h], w1 = wv[h + 1];
    for (int r = 0; r < R; ++r) {
      a[r] += zr[r][h] * w0;
      a2[r] += zr[r][h + 1] * w1;
    }
  }
  if (h < H)
    for (int r = 0; r < R; ++r) a[r] += zr[r][h] * wv[h];
  for (int r = 0; r < R; ++r) {
    const V acc = a[r] + a2[r];
    T logit[CP];
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < C; ++c) {
      logit[c] = b[c] + acc[c];
      m = logit[c] > m ? logit[c] : m;
    }
    V e = {};
    T sum = 0;
    for (int64_t c = 0; c < C; ++c) {
      e[c] = std::exp(logit[c] - m);
      sum += e[c];
    }
    const int64_t yi = y[i + r];
    const T lse = m + std::log(sum), inv = T(1) / sum;
    const T wi = sw ? sw[i + r] : T(1);
    total += static_cast<double>(wi) * static_cast<double>(lse - logit[yi]);
    d[r] = (wi * inv) * e;  // padded lanes stay 0
    d[r][yi] -= wi;
    *blk_b += d[r];
  }
  for (int64_t hh = 0; hh < H; ++hh) {
    V g = blk_w[hh];
    for (int r = 0; r < R; ++r) g += zr[r][hh] * d[r];
    blk_w[hh] = g;
  }
}

template <typename T, int CP>
MMK_INLINE void softmax_subset_padded(const T* z, int64_t ld, int64_t n, int64_t H, int64_t C,
                                      const T* wp, const T* b, const int64_t* y, const T* sw,
                                      double* loss, double* gw, double* gb) {
  // Explicit GCC vectors of CP lanes (unaligned access allowed): left to itself the
  // auto-vectoriser interleaved the h and c loops with permutes and ran 3x slower.
  constexpr int R = 4;
  std::vector<T> buf(H * CP + CP, T(0));
  T* blk_w = buf.data();
  T* blk_b = blk_w + H * CP;
  double total = 0;
  int64_t i = 0;
  while (i < n) {
    // Flush the block partial sums into float64 every BLOCK rows.
    const int64_t stop = std::min(n, i + BLOCK);
    for (; i + R <= stop; i += R)
      softmax_rows<T, CP, R>(z, ld, i, H, C, wp, b, y, sw, total, blk_w, blk_b);
    for (; i < stop; ++i) softmax_rows<T, CP, 1>(z, ld, i, H, C, wp, b, y, sw, total, blk_w, blk_b);
    for (int64_t j = 0; j < H * CP; ++j) gw[j] += blk_w[j];
    for (int64_t c = 0; c < C; ++c) gb[c] += blk_b[c];
    std::fill(buf.begin(), buf.end(), T(0));
  }
  *loss = total;
}

}  // namespace mmkernels::cpu
