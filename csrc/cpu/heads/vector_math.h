// 64-byte lane vectors (GCC vector extensions) and their exp and log, for the rows-in-lanes
// softmax kernel (softmax_lanes.h): a polynomial exp with Cody-Waite reduction (Cephes' float
// polynomial, a degree-13 Taylor series for float64) and Cephes' logf.
#pragma once

#include "isa.h"

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace mmkernels::cpu {

// One 64-byte vector of T (16 float32 or 8 float64 lanes), its unaligned twin, and the integer
// vector of the same lanes (comparison masks, exponent bits).
template <typename T>
struct Lanes {
  static constexpr int L = 64 / static_cast<int>(sizeof(T));
  typedef T V __attribute__((vector_size(64)));
  typedef T VU __attribute__((vector_size(64), aligned(sizeof(T))));  // unaligned loads
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I M __attribute__((vector_size(64)));
};

// exp of x <= ~0 (x is a logit minus the row maximum); underflow clamps near the denormals.
template <typename T>
MMK_INLINE void vexp(const typename Lanes<T>::V& xin, typename Lanes<T>::V& out) {
  using V = typename Lanes<T>::V;
  using M = typename Lanes<T>::M;
  if constexpr (sizeof(T) == 4) {
    V x = xin < T(-87) ? V{} + T(-87) : xin;
    x = x > T(88) ? V{} + T(88) : x;
    const V t = x * T(1.44269504088896341);
    const V k = (t + T(12582912.0f)) - T(12582912.0f);  // round to nearest
    const V r = (x - k * T(0.693359375)) - k * T(-2.12194440e-4);
    V p = V{} + T(1.9875691500E-4);
    p = p * r + T(1.3981999507E-3);
    p = p * r + T(8.3334519073E-3);
    p = p * r + T(4.1665795894E-2);
    p = p * r + T(1.6666665459E-1);
    p = p * r + T(5.0000001201E-1);
    const V e = p * (r * r) + r + T(1);
    const M bits = (__builtin_convertvector(k, M) + 127) << 23;
    V scale;
    __builtin_memcpy(&scale, &bits, sizeof(V));
    out = e * scale;
  } else {
    V x = xin < T(-708) ? V{} + T(-708) : xin;
    x = x > T(709) ? V{} + T(709) : x;
    const V t = x * T(1.4426950408889634074);
    const V k = (t + T(6755399441055744.0)) - T(6755399441055744.0);
    const V r = (x - k * T(6.93145751953125E-1)) - k * T(1.42860682030941723212E-6);
    // Taylor to r^13 / 13!: |r| <= 0.347, truncation error < 1e-17 relative.
    V p = V{} + T(1.0 / 6227020800.0);
    const double inv_fact[] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                               1.0 / 362880.0,    1.0 / 40320.0,    1.0 / 5040.0,
                               1.0 / 720.0,       1.0 / 120.0,      1.0 / 24.0,
                               1.0 / 6.0,         0.5,              1.0,
                               1.0};
    for (double f : inv_fact) p = p * r + T(f);
    const M bits = (__builtin_convertvector(k, M) + 1023) << 52;
    V scale;
    __builtin_memcpy(&scale, &bits, sizeof(V));
    out = p * scale;
  }
}

// log of x > 0 normal (a softmax denominator, >= 1): Cephes' logf polynomial for float32,
// the scalar std::log per lane for float64.
template <typename T>
MMK_INLINE void vlog(const typename Lanes<T>::V& xin, typename Lanes<T>::V& out) {
  using V = typename Lanes<T>::V;
  using M = typename Lanes<T>::M;
  if constexpr (sizeof(T) == 4) {
    M bits;
    __builtin_memcpy(&bits, &xin, sizeof(V));
    M e = ((bits >> 23) & 0xff) - 126;
    const M mant = (bits & 0x807fffff) | 0x3f000000;  // x = mant * 2^e, mant in [0.5, 1)
    V x;
    __builtin_memcpy(&x, &mant, sizeof(V));
    const M small = x < T(0.707106781186547524);
    e = small ? e - 1 : e;
    x = small ? x + x - T(1) : x - T(1);
    const V z = x * x;
    V p = V{} + T(7.0376836292E-2);
    p = p * x + T(-1.1514610310E-1);
    p = p * x + T(1.1676998740E-1);
    p = p * x + T(-1.2420140846E-1);
    p = p * x + T(1.4249322787E-1);
    p = p * x + T(-1.6668057665E-1);
    p = p * x + T(2.0000714765E-1);
    p = p * x + T(-2.4999993993E-1);
    p = p * x + T(3.3333331174E-1);
    p = p * x * z;
    const V ef = __builtin_convertvector(e, V);
    p += ef * T(-2.12194440e-4);
    p += z * T(-0.5);
    out = x + p + ef * T(0.693359375);
  } else {
    for (int l = 0; l < Lanes<T>::L; ++l) out[l] = std::log(xin[l]);
  }
}

}  // namespace mmkernels::cpu
