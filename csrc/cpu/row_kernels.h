// The row kernels of the CPU engine's passes (gemm_engine.h: sums of GEMM results, bias,
// ReLU, rounding to bfloat16, the activation's gradient), in AVX-512 where the CPU has it.
//
// Why: the extension is compiled for the baseline x86-64 ISA, so the compiler's own loops run
// 4 floats wide and round to bfloat16 one element at a time; once the GEMMs run on AMX these
// memory-bound passes are the larger part of a forward with many subsets. Each kernel is
// compiled for AVX-512 by a target attribute and chosen at run time from the CPU's flags; it
// returns false where it does not apply (no AVX-512, another CPU), and the caller then runs
// its plain loop.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MMKERNELS_ROW_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define MMKERNELS_ROW_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace mmkernels::cpu::rows {

using c10::BFloat16;

#if defined(MMKERNELS_ROW_AVX512)

inline bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
}

inline bool has_avx512_bf16() {
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
}

MMKERNELS_ROW_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

MMKERNELS_ROW_AVX512 inline __m512 load_bf16(const BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// ReLU that keeps NaN (as `z < 0 ? 0 : z` does): max returns its second operand on NaN.
MMKERNELS_ROW_AVX512 inline __m512 relu(__m512 z) { return _mm512_max_ps(_mm512_setzero_ps(), z); }

MMKERNELS_ROW_AVX512 inline void add_avx512(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst + i),
                                                    _mm512_maskz_loadu_ps(m, src + i)));
  }
}

// z + bias (z alone without a bias: adding zeros would turn -0 into +0).
MMKERNELS_ROW_AVX512 inline __m512 biased(const float* z, const float* bias, __mmask16 m) {
  const __m512 v = _mm512_maskz_loadu_ps(m, z);
  return bias ? _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias)) : v;
}

MMKERNELS_ROW_AVX512 inline void store_avx512(float* out, const float* z, const float* bias,
                                              int64_t n, bool act) {
  // Whole aligned lines bypass the cache: out is not read again by the op, and a plain store
  // first reads each line it fills from memory. (The engine fences before its result is used.)
  if (n % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 64 == 0) {
    for (int64_t i = 0; i < n; i += 16) {
      const __m512 v = biased(z + i, bias ? bias + i : nullptr, (__mmask16)0xFFFF);
      _mm512_stream_ps(out + i, act ? relu(v) : v);
    }
    return;
  }
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 v = biased(z + i, bias ? bias + i : nullptr, m);
    _mm512_mask_storeu_ps(out + i, m, act ? relu(v) : v);
  }
}

MMKERNELS_ROW_AVX512_BF16 inline void store_avx512(BFloat16* out, const float* z,
                                                   const float* bias, int64_t n, bool act) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 v = biased(z + i, bias ? bias + i : nullptr, m);
    _mm256_mask_storeu_epi16(out + i, m, (__m256i)_mm512_cvtneps_pbh(act ? relu(v) : v));
  }
}

template <typename scalar_t>
MMKERNELS_ROW_AVX512 inline __m512 load_as_float(const scalar_t* p, __mmask16 m) {
  if constexpr (std::is_same_v<scalar_t, float>) return _mm512_maskz_loadu_ps(m, p);
  else return load_bf16(p, m);
}

// act'(out) * grad for the lanes m of grad and out: grad where out > 0 (relu), else grad.
template <typename scalar_t>
MMKERNELS_ROW_AVX512 inline __m512 activated_grad(const scalar_t* grad, const scalar_t* out,
                                                  __mmask16 m, bool act) {
  const __m512 g = load_as_float(grad, m);
  if (!act) return g;
  return _mm512_maskz_mov_ps(
      _mm512_cmp_ps_mask(load_as_float(out, m), _mm512_setzero_ps(), _CMP_GT_OQ), g);
}

template <typename scalar_t>
MMKERNELS_ROW_AVX512 inline void activation_grad_avx512(float* d, float* colsum,
                                                        const scalar_t* grad, const scalar_t* out,
                                                        int64_t n, bool act) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 g = activated_grad(grad + i, out + i, m, act);
    _mm512_mask_storeu_ps(d + i, m, g);
    _mm512_mask_storeu_ps(colsum + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, colsum + i), g));
  }
}

// d = act'(out) * grad, or d += that when accumulating (then the same additions, in the same
// order, as a store into a buffer followed by add_avx512).
template <typename scalar_t>
MMKERNELS_ROW_AVX512 inline void activation_grad_into_avx512(float* d, const scalar_t* grad,
                                                             const scalar_t* out, int64_t n,
                                                             bool act, bool accumulate) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    __m512 g = activated_grad(grad + i, out + i, m, act);
    if (accumulate) g = _mm512_add_ps(_mm512_maskz_loadu_ps(m, d + i), g);
    _mm512_mask_storeu_ps(d + i, m, g);
  }
}

#endif

// dst += src.
inline bool add_into(float* dst, const float* src, int64_t n) {
#if defined(MMKERNELS_ROW_AVX512)
  if (has_avx512()) return add_avx512(dst, src, n), true;
#endif
  return false;
}

// out = act(z + bias) (act(z) when bias is null), float32 or rounded to bfloat16.
inline bool store_activated(float* out, const float* z, const float* bias, int64_t n, bool relu) {
#if defined(MMKERNELS_ROW_AVX512)
  if (has_avx512()) return store_avx512(out, z, bias, n, relu), true;
#endif
  return false;
}
inline bool store_activated(BFloat16* out, const float* z, const float* bias, int64_t n,
                            bool relu) {
#if defined(MMKERNELS_ROW_AVX512)
  if (has_avx512_bf16()) return store_avx512(out, z, bias, n, relu), true;
#endif
  return false;
}

// Orders the calling thread's streaming stores (store_activated's) before what follows: a task
// calls it when its rows are done, before another thread may read them.
inline void store_fence() {
#if defined(MMKERNELS_ROW_AVX512)
  _mm_sfence();
#endif
}

// d = act'(out) * grad, colsum += d.
template <typename scalar_t>
inline bool activation_grad(float* d, float* colsum, const scalar_t* grad, const scalar_t* out,
                            int64_t n, bool relu) {
#if defined(MMKERNELS_ROW_AVX512)
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, BFloat16>)
    if (has_avx512()) return activation_grad_avx512(d, colsum, grad, out, n, relu), true;
#endif
  return false;
}

// d = act'(out) * grad (no column sums), or d += that when accumulating.
template <typename scalar_t>
inline bool activation_grad_into(float* d, const scalar_t* grad, const scalar_t* out, int64_t n,
                                 bool relu, bool accumulate) {
#if defined(MMKERNELS_ROW_AVX512)
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, BFloat16>)
    if (has_avx512()) return activation_grad_into_avx512(d, grad, out, n, relu, accumulate), true;
#endif
  return false;
}

}  // namespace mmkernels::cpu::rows
