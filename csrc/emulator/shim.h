// The CUDA language as host C++, for the emulator: what csrc/cuda/device.cuh needs when the
// kernels are compiled without nvcc (MMKERNELS_EMULATOR). Thread and block indices come from
// the running fiber; barriers, warp collectives, shared memory and cp.async go through the
// emulator's runtime (emulator.h); bfloat16 and float16 are bit-exact software types.
#pragma once

#include "emulator.h"

#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict

#define threadIdx (::mmk_emu::current().thread_idx)
#define blockIdx (::mmk_emu::current().block_idx)
#define blockDim (::mmk_emu::current().block_dim)
#define gridDim (::mmk_emu::current().grid_dim)

using mmk_emu::dim3;

inline void __syncthreads() { ::mmk_emu::block_barrier(0); }
inline int __syncthreads_or(int predicate) { return ::mmk_emu::block_barrier(predicate != 0); }

// ---- 16-bit floating point types ---------------------------------------------------------------

struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};

inline uint32_t mmk_float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float mmk_bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float __bfloat162float(__nv_bfloat16 h) { return mmk_bits_float(uint32_t(h.bits) << 16); }

// Round to nearest even, as cvt.rn.bf16.f32; NaN stays NaN (quiet).
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = mmk_float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(rounded >> 16)};
}

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  if (exp == 0x1f) return mmk_bits_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    // subnormal or zero: man * 2^-24
    const float v = std::ldexp(float(man), -24);
    return sign ? -v : v;
  }
  return mmk_bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest even, as cvt.rn.f16.f32, with subnormals and overflow to infinity.
inline __half __float2half_rn(float f) {
  const uint32_t u = mmk_float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return {uint16_t(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: infinity
  if (a < 0x38800000u) {
    // below the smallest normal (2^-14): a multiple of 2^-24, rounded to nearest even
    const double v = std::fabs((double)f) * 16777216.0;  // exact
    double r = std::nearbyint(v);                         // current mode: nearest even
    return {uint16_t(sign | uint16_t(r))};
  }
  const uint32_t exp = (a >> 23) - 112u, man = a & 0x7fffffu;
  uint32_t h = (exp << 10) | (man >> 13);
  const uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return {uint16_t(sign | h)};
}

// ---- warp shuffles and votes -------------------------------------------------------------------

namespace mmk_emu_detail {

struct Shuffle32 {
  uint32_t value;
  int src;  // source lane, resolved per lane before the collective
  uint32_t result;
};

inline void shuffle_op(void* const* lanes) {
  uint32_t values[32];
  for (int i = 0; i < 32; ++i) values[i] = static_cast<Shuffle32*>(lanes[i])->value;
  for (int i = 0; i < 32; ++i) {
    auto* l = static_cast<Shuffle32*>(lanes[i]);
    l->result = values[l->src & 31];
  }
}

struct Vote {
  int predicate;
  uint32_t ballot;
};

inline void vote_op(void* const* lanes) {
  uint32_t ballot = 0;
  for (int i = 0; i < 32; ++i)
    if (static_cast<Vote*>(lanes[i])->predicate) ballot |= 1u << i;
  for (int i = 0; i < 32; ++i) static_cast<Vote*>(lanes[i])->ballot = ballot;
}

inline void require_full_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) ::mmk_emu::fail(std::string(what) + ": only full-warp masks are emulated");
}

inline int lane_id() { return ::mmk_emu::current().linear & 31; }

template <typename T>
T shuffle(unsigned mask, T v, int src_lane, const char* what) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 32- or 64-bit values");
  require_full_mask(mask, what);
  if constexpr (sizeof(T) == 4) {
    Shuffle32 s{0, src_lane, 0};
    std::memcpy(&s.value, &v, 4);
    ::mmk_emu::warp_collective(&shuffle_op, &s);
    T out;
    std::memcpy(&out, &s.result, 4);
    return out;
  } else {
    uint32_t half[2];
    std::memcpy(half, &v, 8);
    half[0] = shuffle(mask, half[0], src_lane, what);
    half[1] = shuffle(mask, half[1], src_lane, what);
    T out;
    std::memcpy(&out, half, 8);
    return out;
  }
}

}  // namespace mmk_emu_detail

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return mmk_emu_detail::shuffle(mask, v, mmk_emu_detail::lane_id() ^ lane_mask, "__shfl_xor_sync");
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane) {
  return mmk_emu_detail::shuffle(mask, v, src_lane, "__shfl_sync");
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  mmk_emu_detail::require_full_mask(mask, "__ballot_sync");
  mmk_emu_detail::Vote v{predicate != 0, 0};
  ::mmk_emu::warp_collective(&mmk_emu_detail::vote_op, &v);
  return v.ballot;
}

inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  return __ballot_sync(mask, predicate) == 0xffffffffu;
}

// ---- the PTX instructions csrc/cuda/ptx.cuh wraps ------------------------------------------------

namespace mmk_emu_ptx {

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lanes 8i..8i+7 give the row
// addresses of matrix i; lane l receives, of matrix i, the two b16 elements at row l/4,
// columns 2(l%4) and 2(l%4)+1 (with .trans: rows 2(l%4), 2(l%4)+1 of column l/4).
struct Ldmatrix {
  const void* row;
  int count;
  bool trans;
  uint32_t out[4];
};

inline void ldmatrix_op(void* const* lanes) {
  auto* l0 = static_cast<Ldmatrix*>(lanes[0]);
  const int count = l0->count;
  const bool trans = l0->trans;
  uint16_t m[4][8][8];
  for (int i = 0; i < count; ++i)
    for (int r = 0; r < 8; ++r) {
      const int lane = 8 * i + r;
      auto* l = static_cast<Ldmatrix*>(lanes[lane]);
      if (l->count != count || l->trans != trans)
        ::mmk_emu::fail("ldmatrix: lanes disagree on .x or .trans");
      if (reinterpret_cast<uintptr_t>(l->row) % 16 != 0) {
        ::mmk_emu::collective_lane(lane);
        ::mmk_emu::fail("ldmatrix: a row address is not 16-byte aligned");
      }
      ::mmk_emu::collective_lane(lane);
      ::mmk_emu::smem_read(l->row, 16, "ldmatrix");
      std::memcpy(m[i][r], l->row, 16);
    }
  for (int lane = 0; lane < 32; ++lane) {
    auto* l = static_cast<Ldmatrix*>(lanes[lane]);
    for (int i = 0; i < count; ++i) {
      uint16_t lo, hi;
      if (!trans) {
        lo = m[i][lane / 4][2 * (lane % 4)];
        hi = m[i][lane / 4][2 * (lane % 4) + 1];
      } else {
        lo = m[i][2 * (lane % 4)][lane / 4];
        hi = m[i][2 * (lane % 4) + 1][lane / 4];
      }
      l->out[i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}

template <int N, bool Trans>
inline void ldmatrix(uint32_t (&r)[N], const void* row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  Ldmatrix l{row, N, Trans, {0, 0, 0, 0}};
  ::mmk_emu::warp_collective(&ldmatrix_op, &l);
  for (int i = 0; i < N; ++i) r[i] = l.out[i];
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 and
// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, with the fragment layouts of the PTX
// ISA (g = lane / 4, t = lane % 4):
//   m16n8k16 A: a[j] holds (row g + 8 (j % 2), cols 2t + 8 (j / 2) + {0, 1})
//            B: b[j] holds (rows 2t + 8 j + {0, 1}, col g)
//   m16n8k8  A: a[j] holds (row g + 8 (j % 2), col t + 4 (j / 2))   (one tf32 each)
//            B: b[j] holds (row t + 4 j, col g)
//   C, D:    c[j] holds (row g + 8 (j / 2), col 2t + j % 2)
// Products are exact and summed in double, then rounded once to float: as accurate as the
// hardware or more, which the tests' tolerances allow for.
enum class MmaKind { bf16, f16, tf32 };

struct Mma {
  MmaKind kind;
  uint32_t a[4], b[2];
  float c[4], d[4];
};

inline float b16_value(uint16_t bits, MmaKind kind) {
  return kind == MmaKind::bf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
}

// The tensor cores read only the 19 high bits of a tf32 operand.
inline float tf32_value(uint32_t bits) { return mmk_bits_float(bits & 0xffffe000u); }

inline void mma_op(void* const* lanes) {
  const MmaKind kind = static_cast<Mma*>(lanes[0])->kind;
  const int K = kind == MmaKind::tf32 ? 8 : 16;
  double A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    auto* l = static_cast<Mma*>(lanes[lane]);
    if (l->kind != kind) ::mmk_emu::fail("mma.sync: lanes disagree on the operand type");
    const int g = lane / 4, t = lane % 4;
    if (kind == MmaKind::tf32) {
      for (int j = 0; j < 4; ++j) A[g + 8 * (j % 2)][t + 4 * (j / 2)] = tf32_value(l->a[j]);
      for (int j = 0; j < 2; ++j) B[t + 4 * j][g] = tf32_value(l->b[j]);
    } else {
      for (int j = 0; j < 4; ++j)
        for (int h = 0; h < 2; ++h)
          A[g + 8 * (j % 2)][2 * t + 8 * (j / 2) + h] = b16_value(uint16_t(l->a[j] >> (16 * h)), kind);
      for (int j = 0; j < 2; ++j)
        for (int h = 0; h < 2; ++h)
          B[2 * t + 8 * j + h][g] = b16_value(uint16_t(l->b[j] >> (16 * h)), kind);
    }
    for (int j = 0; j < 4; ++j) C[g + 8 * (j / 2)][2 * t + j % 2] = l->c[j];
  }
  for (int lane = 0; lane < 32; ++lane) {
    auto* l = static_cast<Mma*>(lanes[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int j = 0; j < 4; ++j) {
      const int row = g + 8 * (j / 2), col = 2 * t + j % 2;
      double acc = C[row][col];
      for (int k = 0; k < K; ++k) acc += A[row][k] * B[k][col];
      l->d[j] = static_cast<float>(acc);
    }
  }
}

inline void mma(MmaKind kind, float (&d)[4], const uint32_t (&a)[4], const uint32_t* b,
                const float (&c)[4]) {
  Mma m{kind, {a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}, {0, 0, 0, 0}};
  ::mmk_emu::warp_collective(&mma_op, &m);
  for (int j = 0; j < 4; ++j) d[j] = m.d[j];
}

// cvt.rna.tf32.f32: round to the nearest tf32 (10-bit mantissa), ties away from zero.
inline uint32_t cvt_rna_tf32(float f) {
  const uint32_t u = mmk_float_bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // Inf, NaN unchanged
  return (u + 0x1000u) & 0xffffe000u;
}

}  // namespace mmk_emu_ptx
