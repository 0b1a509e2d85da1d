// The one portability layer of the kernel bodies: with nvcc it is CUDA itself; with
// MMKERNELS_EMULATOR the same kernel source compiles as host C++ against the emulator's shim
// (csrc/emulator/shim.h). No torch header, here or in any .cuh that includes it.
//
// Kernel code goes through these few helpers where the emulator must see an access:
// shared memory (sload / sstore), and the PTX instructions of ptx.cuh.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(MMKERNELS_EMULATOR)
#include "../emulator/shim.h"
#define MMK_DEVICE inline
#define MMK_HOST_DEVICE inline
#define MMK_DYNAMIC_SMEM(name) unsigned char* name = ::mmk_emu::dynamic_smem()
#define MMK_UNROLL
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define MMK_DEVICE __device__ __forceinline__
#define MMK_HOST_DEVICE __host__ __device__ __forceinline__
#define MMK_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define MMK_UNROLL _Pragma("unroll")
#endif

namespace mmkernels::cuda {

using bf16 = __nv_bfloat16;
using f16 = __half;

// Shared-memory loads and stores.
template <typename T>
MMK_DEVICE T sload(const T* p) {
#if defined(MMKERNELS_EMULATOR)
  ::mmk_emu::smem_read(p, sizeof(T), "shared load");
#endif
  return *p;
}

template <typename T>
MMK_DEVICE void sstore(T* p, T v) {
#if defined(MMKERNELS_EMULATOR)
  ::mmk_emu::smem_write(p, sizeof(T), "shared store");
#endif
  *p = v;
}

// Fused multiply-add in the accumulation type (float stays float on the host too).
MMK_DEVICE float mmk_fma(float a, float b, float c) {
#if defined(MMKERNELS_EMULATOR)
  return std::fma(a, b, c);
#else
  return __fmaf_rn(a, b, c);
#endif
}
MMK_DEVICE double mmk_fma(double a, double b, double c) {
#if defined(MMKERNELS_EMULATOR)
  return std::fma(a, b, c);
#else
  return __fma_rn(a, b, c);
#endif
}

// Element conversions to and from the accumulation type.
MMK_DEVICE float to_float(float v) { return v; }
MMK_DEVICE float to_float(bf16 v) { return __bfloat162float(v); }
MMK_DEVICE float to_float(f16 v) { return __half2float(v); }
MMK_DEVICE double to_double(double v) { return v; }

template <typename T>
struct Convert;
template <>
struct Convert<float> {
  MMK_DEVICE static float from(float v) { return v; }
};
template <>
struct Convert<double> {
  MMK_DEVICE static double from(double v) { return v; }
};
template <>
struct Convert<bf16> {
  MMK_DEVICE static bf16 from(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Convert<f16> {
  MMK_DEVICE static f16 from(float v) { return __float2half_rn(v); }
};

// The accumulation type of an element type: double for double, float otherwise.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename T>
MMK_DEVICE typename AccOf<T>::type to_acc(T v) {
  if constexpr (sizeof(T) == 8) return to_double(v);
  else return to_float(v);
}

// 16-bit bit patterns, for packing mma operands.
MMK_DEVICE uint16_t bits_of(bf16 v) {
  uint16_t u;
  __builtin_memcpy(&u, &v, 2);
  return u;
}
MMK_DEVICE uint16_t bits_of(f16 v) {
  uint16_t u;
  __builtin_memcpy(&u, &v, 2);
  return u;
}

}  // namespace mmkernels::cuda
