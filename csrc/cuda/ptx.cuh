// The PTX instructions the kernels use, as inline assembly on the device and as the emulator's
// implementations on the host (csrc/emulator/shim.h): mma.sync (m16n8k16 bf16/f16, m16n8k8
// tf32, float32 accumulators), ldmatrix, cp.async with zero fill, cvt.rna.tf32.
#pragma once

#include "device.cuh"

namespace mmkernels::cuda {

// D = A B + C on one warp's fragments (layouts: csrc/emulator/shim.h, from the PTX ISA).
MMK_DEVICE void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(MMKERNELS_EMULATOR)
  mmk_emu_ptx::mma(mmk_emu_ptx::MmaKind::bf16, d, a, b, d);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

MMK_DEVICE void mma_f16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(MMKERNELS_EMULATOR)
  mmk_emu_ptx::mma(mmk_emu_ptx::MmaKind::f16, d, a, b, d);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

MMK_DEVICE void mma_tf32_1688(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(MMKERNELS_EMULATOR)
  mmk_emu_ptx::mma(mmk_emu_ptx::MmaKind::tf32, d, a, b, d);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

MMK_DEVICE uint32_t to_tf32(float f) {
#if defined(MMKERNELS_EMULATOR)
  return mmk_emu_ptx::cvt_rna_tf32(f);
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(f));
  return r;
#endif
}

#if !defined(MMKERNELS_EMULATOR)
MMK_DEVICE uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// ldmatrix .x1 / .x2 / .x4 (Trans: .trans); `row` is this lane's row address.
template <int N, bool Trans>
MMK_DEVICE void ldmatrix(uint32_t (&r)[N], const void* row) {
#if defined(MMKERNELS_EMULATOR)
  mmk_emu_ptx::ldmatrix<N, Trans>(r, row);
#else
  const uint32_t a = smem_address(row);
  if constexpr (N == 4 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  else if constexpr (N == 4 && Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  else if constexpr (N == 2 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  else if constexpr (N == 2 && Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  else if constexpr (N == 1 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
#endif
}

// cp.async of Bytes (4, 8 or 16) from global to shared memory; only src_bytes are read, the
// rest of the destination is zero-filled (src_bytes = 0: nothing is read, all zero). This
// is how the kernels select masked-out rows and tails: a NaN in an absent row is never read.
template <int Bytes>
MMK_DEVICE void cp_async(void* smem_dst, const void* gmem_src, int src_bytes) {
#if defined(MMKERNELS_EMULATOR)
  ::mmk_emu::cp_async(smem_dst, gmem_src, Bytes, src_bytes);
#else
  const uint32_t d = smem_address(smem_dst);
  if constexpr (Bytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(gmem_src),
                 "r"(src_bytes));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(gmem_src),
                 "n"(Bytes), "r"(src_bytes));
#endif
}

MMK_DEVICE void cp_async_commit() {
#if defined(MMKERNELS_EMULATOR)
  ::mmk_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int Pending>
MMK_DEVICE void cp_async_wait() {
#if defined(MMKERNELS_EMULATOR)
  ::mmk_emu::cp_async_wait(Pending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
#endif
}

}  // namespace mmkernels::cuda
