// The instruction sets the softmax kernels are compiled for, and which of them this CPU runs.
//
// The build flags target baseline x86-64 (SSE2); the kernels are compiled a second and third
// time for AVX2+FMA and AVX-512 (function target attributes) and picked at run time
// (softmax_dispatch.h). target_clones("arch=haswell") is not used: its resolver tests for that
// exact CPU model, not for its features, and picks SSE2 on newer Xeons.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#define MMK_HAVE_AVX2_CLONE 1
#define MMK_AVX2 __attribute__((target("avx2,fma")))
#define MMK_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))
#define MMK_INLINE __attribute__((always_inline)) inline
#else
#define MMK_HAVE_AVX2_CLONE 0
#define MMK_AVX2
#define MMK_AVX512
#define MMK_INLINE inline
#endif

namespace mmkernels::cpu {

inline bool cpu_has_avx512() {
#if MMK_HAVE_AVX2_CLONE
  static const bool ok = __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

inline bool cpu_has_avx2_fma() {
#if MMK_HAVE_AVX2_CLONE
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

}  // namespace mmkernels::cpu
