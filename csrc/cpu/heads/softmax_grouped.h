// softmax_grouped: several softmax-regression problems that read the same rows of the same
// subset of Z at once: a cross-validation's folds, whose training rows overlap. Their
// weights side by side make the logits and the gradient two GEMMs of g C columns, on oneDNN's
// brgemm ukernel (ATen's cpublas::brgemm, float32), where the per-problem kernels
// (softmax_lanes.h) work on N = C columns. On one Sapphire Rapids core MKL's GEMM of a
// CV's shapes runs at 20-27 GFLOP/s with N = 10 and 59-81 with N = 40 (`mmkernels bench
// heads`, case d).
//
// Per chunk of kGroupRows rows (in L2): logits [rows, g C] = z W_cat; transposed, so that the
// softmax runs on vectors of 16 rows (the rows-in-lanes kernel's arithmetic); the gradient
// [g C, H] = d^T z. The gradient is summed over a chunk in float32 and then into float64, as
// the per-problem kernels do every 256 rows.
#pragma once

#include "isa.h"
#include "softmax_kernels.h"
#include "vector_math.h"

#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace mmkernels::cpu {

constexpr int64_t kGroupBlock = 64;  // rows per logits ukernel call, columns per gradient call

// The softmax of one chunk on the transposed logits lt [g C][kGroupRows] (row r of problem
// i, class c at lt[(i C + c) kGroupRows + r]), rows [0, nr): lt becomes d = w (p - onehot(y));
// adds each problem's loss to loss[i * stride] and its bias gradient to gb[i * stride * C].
MMK_AVX512 inline void softmax_grouped_chunk(float* lt, int64_t nr, int64_t g, int64_t C,
                                             const float* b, const int64_t* y, const float* sw,
                                             double* loss, double* gb, int64_t stride) {
  using V = Lanes<float>::V;
  using VU = Lanes<float>::VU;
  using M = Lanes<float>::M;
  constexpr int L = Lanes<float>::L;
  for (int64_t i = 0; i < g; ++i) {
    float* li = lt + i * C * kGroupRows;
    V bacc[16];
    for (int64_t c = 0; c < C; ++c) bacc[c] = V{};
    double total = 0;
    for (int64_t r0 = 0; r0 < nr; r0 += L) {
      const int nb = static_cast<int>(std::min<int64_t>(L, nr - r0));
      V wv = V{};
      M yv = M{};
      for (int l = 0; l < nb; ++l) {
        wv[l] = sw ? sw[r0 + l] : 1.0f;
        yv[l] = static_cast<int32_t>(y[r0 + l]);
      }
      V lg[16];
      for (int64_t c = 0; c < C; ++c) {
        lg[c] = *reinterpret_cast<const VU*>(li + c * kGroupRows + r0) + b[i * C + c];
        for (int l = nb; l < L; ++l) lg[c][l] = 0.0f;  // lanes past the chunk: weight 0
      }
      V m = lg[0];
      for (int64_t c = 1; c < C; ++c) m = m > lg[c] ? m : lg[c];
      V e[16];
      V sum = V{};
      for (int64_t c = 0; c < C; ++c) {
        vexp<float>(lg[c] - m, e[c]);
        sum += e[c];
      }
      const V scale = wv / sum;
      V lse;
      vlog<float>(sum, lse);
      lse += m;
      V ly = V{};
      for (int64_t c = 0; c < C; ++c) {
        const M is = yv == static_cast<int32_t>(c);
        ly = is ? lg[c] : ly;
        const V pc = e[c] * scale;
        const V d = is ? pc - wv : pc;
        *reinterpret_cast<VU*>(li + c * kGroupRows + r0) = d;
        bacc[c] += d;
      }
      const V lv = wv * (lse - ly);
      for (int l = 0; l < L; ++l) total += static_cast<double>(lv[l]);
    }
    loss[i * stride] += total;
    for (int64_t c = 0; c < C; ++c) {
      double s = 0;
      for (int l = 0; l < L; ++l) s += bacc[c][l];
      gb[i * stride * C + c] += s;
    }
  }
}

// g problems on rows [0, n) of one subset z (row stride ld, [n, H]), with weights w_cat
// [H, g C] (problem i's W [H, C] in columns i C .. i C + C - 1) and biases b [g, C]: adds
// problem i's loss (without the penalty) to loss[i * stride], its weight gradient [C, H]
// ([H, C] with h_major) to gw + i * stride * C * H and its bias gradient to gb + i * stride * C
// (float64).
MMK_AVX512 inline void softmax_grouped(const float* z, int64_t ld, int64_t n, int64_t H,
                                       int64_t C, int64_t g, const float* w_cat, const float* b,
                                       const int64_t* y, const float* sw, double* loss,
                                       double* gw, double* gb, int64_t stride, bool h_major) {
  const int64_t N = g * C;
  std::vector<float> logits(kGroupRows * N), lt(N * kGroupRows), grad(N * H);
  for (int64_t r0 = 0; r0 < n; r0 += kGroupRows) {
    const int64_t nr = std::min(kGroupRows, n - r0);
    const float* zr = z + r0 * ld;
    for (int64_t m0 = 0; m0 < nr; m0 += kGroupBlock)
      at::native::cpublas::brgemm(std::min(kGroupBlock, nr - m0), N, H, ld, N, N, false,
                                  zr + m0 * ld, w_cat, logits.data() + m0 * N, false);
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t j = 0; j < N; ++j) lt[j * kGroupRows + r] = logits[r * N + j];
    softmax_grouped_chunk(lt.data(), nr, g, C, b, y + r0, sw ? sw + r0 : nullptr, loss, gb,
                          stride);
    for (int64_t h0 = 0; h0 < H; h0 += kGroupBlock)
      at::native::cpublas::brgemm(N, std::min(kGroupBlock, H - h0), nr, kGroupRows, ld, H,
                                  false, lt.data(), zr + h0, grad.data() + h0, false);
    for (int64_t i = 0; i < g; ++i) {
      double* gi = gw + i * stride * C * H;
      const float* src = grad.data() + i * C * H;
      if (h_major)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t h = 0; h < H; ++h) gi[h * C + c] += src[c * H + h];
      else
        for (int64_t j = 0; j < C * H; ++j) gi[j] += src[j];
    }
  }
}

}  // namespace mmkernels::cpu
