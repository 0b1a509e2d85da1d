// The softmax-regression kernels that softmax_regression.cpp calls, compiled once in
// softmax_kernels.cpp (their three instruction-set copies take minutes to compile; the op
// around them does not need them recompiled).
#pragma once

#include "isa.h"

#include <c10/util/Exception.h>

#include <cstdint>

namespace mmkernels::cpu {

// Lanes of the padded layout for C classes; 0 = the [C, H] layout (the rows-in-lanes kernel,
// or the generic body above 32). The op lays the weights out by it. With AVX-512 the padded
// kernel at 9..16 classes (16 lanes) wasted up to 7/16 of each vector and ran a scalar exp
// per class and row: at C = 10 it took 1.8x the rows-in-lanes kernel's time per class at C = 8,
// so rows-in-lanes takes up to 16 classes there. Without AVX-512 (16 vector registers, not
// 32) its 9..16-class accumulators would spill, and that case has not been measured: those
// CPUs keep the padded kernel.
inline int64_t padded_lanes(int64_t C) {
  if (C <= 8) return 0;
  if (C <= 16) return cpu_has_avx512() ? 0 : 16;
  return C <= 32 ? 32 : 0;
}

// One subset's loss (float64, without the penalty; assigned) and gradient (added to gw, in
// padded_lanes(C)'s layout, and gb), rows [0, n) of z (row stride ld). softmax_dispatch.h.
template <typename T>
void softmax_subset(const T* z, int64_t ld, int64_t n, int64_t H, int64_t C, const T* w,
                    const T* b, const int64_t* y, const T* sw, double* loss, double* gw,
                    double* gb);
extern template void softmax_subset<float>(const float*, int64_t, int64_t, int64_t, int64_t,
                                           const float*, const float*, const int64_t*,
                                           const float*, double*, double*, double*);
extern template void softmax_subset<double>(const double*, int64_t, int64_t, int64_t, int64_t,
                                            const double*, const double*, const int64_t*,
                                            const double*, double*, double*, double*);

constexpr int64_t kGroupWidth = 64;  // at most this many logits per row (g C) in a group
constexpr int64_t kGroupRows = 256;  // rows of Z per chunk (0.5 MiB at H = 512)

// Whether softmax_group runs here for C classes (softmax_grouped.h).
bool softmax_grouped_available(int64_t C);

// g >= 2 problems of one subset at once, float32, w [g, H, C] (the op's layout): adds problem
// i's loss to loss[i * stride], its gradient [C, H] ([H, C] with h_major) to
// gw + i * stride * C * H and its bias gradient to gb + i * stride * C (float64).
void softmax_group(const float* z, int64_t ld, int64_t n, int64_t H, int64_t C, int64_t g,
                   const float* w, const float* b, const int64_t* y, const float* sw,
                   double* loss, double* gw, double* gb, int64_t stride, bool h_major);
// (float64 has none: the op groups no float64 problems.)
inline void softmax_group(const double*, int64_t, int64_t, int64_t, int64_t, int64_t,
                          const double*, const double*, const int64_t*, const double*, double*,
                          double*, double*, int64_t, bool) {
  TORCH_INTERNAL_ASSERT(false, "softmax_group: no grouped kernel for float64");
}

}  // namespace mmkernels::cpu
