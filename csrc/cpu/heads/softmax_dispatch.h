// softmax_subset: one subset's softmax-regression loss and gradient, by the kernel family for
// its class count, in the widest instruction set this CPU runs (isa.h).
//
// Families: rows in vector lanes for C <= 16 with AVX-512, else C <= 8 (softmax_lanes.h),
// classes in 16 or 32 padded lanes for the rest up to C = 32 (softmax_padded.h), the generic
// body above (softmax_generic.h). Each family is compiled three times, for SSE2, AVX2+FMA and
// AVX-512, and picked at run time.
#pragma once

#include "isa.h"
#include "softmax_kernels.h"
#include "softmax_generic.h"
#include "softmax_lanes.h"
#include "softmax_padded.h"

#include <cstdint>

namespace mmkernels::cpu {

template <typename T>
MMK_INLINE void softmax_subset_lanes_any(const T* z, int64_t ld, int64_t n, int64_t H,
                                         int64_t C, const T* wt, const T* b, const int64_t* y,
                                         const T* sw, double* loss, double* gw, double* gb) {
  switch (C) {
#define MMK_LANES_CASE(K) \
  case K: return softmax_subset_lanes<T, K>(z, ld, n, H, wt, b, y, sw, loss, gw, gb);
    MMK_LANES_CASE(1) MMK_LANES_CASE(2) MMK_LANES_CASE(3) MMK_LANES_CASE(4)
    MMK_LANES_CASE(5) MMK_LANES_CASE(6) MMK_LANES_CASE(7) MMK_LANES_CASE(8)
    MMK_LANES_CASE(9) MMK_LANES_CASE(10) MMK_LANES_CASE(11) MMK_LANES_CASE(12)
    MMK_LANES_CASE(13) MMK_LANES_CASE(14) MMK_LANES_CASE(15) MMK_LANES_CASE(16)
#undef MMK_LANES_CASE
    default: return softmax_subset_body<T>(z, ld, n, H, C, wt, b, y, sw, loss, gw, gb);
  }
}

template <typename T>
MMK_INLINE void softmax_subset_any(const T* z, int64_t ld, int64_t n, int64_t H, int64_t C,
                                   const T* w, const T* b, const int64_t* y, const T* sw,
                                   double* loss, double* gw, double* gb) {
  switch (padded_lanes(C)) {
    case 16: return softmax_subset_padded<T, 16>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
    case 32: return softmax_subset_padded<T, 32>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
    default: return softmax_subset_lanes_any<T>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
  }
}

template <typename T>
void softmax_subset_sse2(const T* z, int64_t ld, int64_t n, int64_t H, int64_t C, const T* w,
                         const T* b, const int64_t* y, const T* sw, double* loss, double* gw,
                         double* gb) {
  softmax_subset_any<T>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
}

#if MMK_HAVE_AVX2_CLONE
template <typename T>
MMK_AVX2 void softmax_subset_avx2(const T* z, int64_t ld, int64_t n, int64_t H, int64_t C,
                                  const T* w, const T* b, const int64_t* y, const T* sw,
                                  double* loss, double* gw, double* gb) {
  softmax_subset_any<T>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
}

template <typename T>
MMK_AVX512 void softmax_subset_avx512(const T* z, int64_t ld, int64_t n, int64_t H, int64_t C,
                                      const T* w, const T* b, const int64_t* y, const T* sw,
                                      double* loss, double* gw, double* gb) {
  softmax_subset_any<T>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
}
#endif

template <typename T>
void softmax_subset(const T* z, int64_t ld, int64_t n, int64_t H, int64_t C, const T* w,
                    const T* b, const int64_t* y, const T* sw, double* loss, double* gw,
                    double* gb) {
#if MMK_HAVE_AVX2_CLONE
  if (cpu_has_avx512()) {
    softmax_subset_avx512<T>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
    return;
  }
  if (cpu_has_avx2_fma()) {
    softmax_subset_avx2<T>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
    return;
  }
#endif
  softmax_subset_sse2<T>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
}

}  // namespace mmkernels::cpu
