// bfloat16 GEMMs with float32 results on AMX, for the CPU engine (gemm_engine.h).
//
// The engine sums the modalities' partial products in float32, so its bfloat16 GEMMs must
// return float32: PyTorch's bfloat16 mm rounds its result to bfloat16, and ATen's
// bf16 x bf16 -> f32 gemm is not exported. oneDNN's brgemm ukernel is (ATen's
// cpublas::brgemm, which PyTorch's CPU flash attention uses): it multiplies a block of rows of
// A (bfloat16, row-major) by a B packed in AMX's VNNI layout and writes or accumulates
// float32. This file holds the blocking loops around it, each loading its operands block by
// block so that gathers and conversions happen in cache, never as passes over whole tensors:
// - row_blocks: C[i] = A[i] @ B over blocks of rows in parallel; the forward (A = rows of x_k,
//   gathered) and grad_x (A = R_k converted from float32, C converted and scattered);
// - weight_grad: the sum of R_k[r]^T x_k[r] over a list of rows (the present ones only), in
//   fixed tasks whose partial sums are added in task order.
// Packing for the ukernel needs AMX (cpublas::could_pack, which is also false while
// torch.backends.mkldnn is disabled); without it the engine converts to float32 and calls MKL.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MMKERNELS_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace mmkernels::cpu::bf16 {

using at::BFloat16;

constexpr int64_t kRowBlock = 64;     // rows of A (and C) per ukernel call
constexpr int64_t kColBlock = 64;     // columns of B per packed block: the widest the packing takes
constexpr int64_t kDepthBlock = 256;  // rows of R_k and x_k summed per call of the weight gradient
constexpr int64_t kDepthStep = 32;    // a block's depth is padded to this (one AMX tile row)

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Whether the bfloat16 GEMMs run on AMX here.
inline bool amx_available() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(MMKERNELS_AVX512_BF16)
  return at::native::cpublas::could_pack(at::kBFloat16);
#else
  return false;
#endif
}

#if defined(MMKERNELS_AVX512_BF16)

// Conversions with AVX512-BF16, which every CPU with AMX has (so only called on the AMX path).
MMKERNELS_AVX512_BF16 inline void to_bf16(const float* src, BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  if (i < n) {
    const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(dst + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i)));
  }
}

// A[c * lda + i] = rows[i][c] for c < ncols, i < count: the transpose of `count` float32 rows,
// in bfloat16. Gathers 16 rows' column c at a time, over 16-column groups so the 16 rows'
// cache lines are reused by the next column.
MMKERNELS_AVX512_BF16 inline void transpose_to_bf16(const float* const* rows, int64_t count,
                                                     int64_t ncols, BFloat16* A, int64_t lda) {
  for (int64_t i0 = 0; i0 < count; i0 += 16) {
    const int64_t n = std::min<int64_t>(16, count - i0);
    const __mmask16 m = (__mmask16)((1u << n) - 1);
    // Offsets from the group's first row; rows far apart (a huge tensor) go element by element.
    alignas(64) int32_t off[16] = {0};
    bool near = true;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t d = rows[i0 + i] - rows[i0];
      near = near && d >= INT32_MIN && d <= INT32_MAX;
      off[i] = (int32_t)d;
    }
    if (!near) {
      for (int64_t c = 0; c < ncols; ++c)
        for (int64_t i = 0; i < n; ++i) A[c * lda + i0 + i] = BFloat16(rows[i0 + i][c]);
      continue;
    }
    const __m512i vidx = _mm512_load_si512(off);
    const float* base = rows[i0];
    for (int64_t c = 0; c < ncols; ++c) {
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, vidx, base + c, 4);
      _mm256_mask_storeu_epi16(A + c * lda + i0, m, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

#else

inline void to_bf16(const float* src, BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = BFloat16(src[i]);
}
inline void transpose_to_bf16(const float* const* rows, int64_t count, int64_t ncols,
                              BFloat16* A, int64_t lda) {
  for (int64_t c = 0; c < ncols; ++c)
    for (int64_t i = 0; i < count; ++i) A[c * lda + i] = BFloat16(rows[i][c]);
}

#endif

// The VNNI layout of a block of B ([depth, width] -> [depth / 2][ld][2]): row pairs interleaved.
// `rows[i]` points at B's row i at the block's first column; a missing second row is zero.
inline void pack_rows(const BFloat16* const* rows, int64_t depth, int64_t width, int64_t ld,
                      BFloat16* out) {
  auto* dst = reinterpret_cast<uint16_t*>(out);
  for (int64_t p = 0; p < depth; p += 2, dst += 2 * ld) {
    const auto* a = reinterpret_cast<const uint16_t*>(rows[p]);
    if (p + 1 < depth) {
      const auto* b = reinterpret_cast<const uint16_t*>(rows[p + 1]);
      for (int64_t n = 0; n < width; ++n) {
        dst[2 * n] = a[n];
        dst[2 * n + 1] = b[n];
      }
    } else {
      for (int64_t n = 0; n < width; ++n) {
        dst[2 * n] = a[n];
        dst[2 * n + 1] = 0;
      }
    }
  }
}

// B [K, N] as the ukernel reads it: bfloat16, K padded to even with zero rows, the columns in
// blocks of kColBlock, each packed with leading dimension round_up(width, 16).
class PackedB {
 public:
  // b: [K, N] in any floating dtype and strides (bfloat16 values convert exactly).
  explicit PackedB(const at::Tensor& b) : K(b.size(0)), Kp(round_up(b.size(0), 2)), N(b.size(1)) {
    at::Tensor src = at::zeros({Kp, N}, b.options().dtype(at::kBFloat16));
    src.narrow(0, 0, K).copy_(b);
    data_ = at::zeros({blocks() * Kp * kColBlock}, src.options());
    const BFloat16* s = src.data_ptr<BFloat16>();
    for (int64_t j = 0; j < blocks(); ++j)
      at::native::cpublas::pack(Kp, width(j), N, ld(j), at::kBFloat16, at::kBFloat16,
                                s + j * kColBlock, data_.data_ptr<BFloat16>() + j * Kp * kColBlock);
  }

  const int64_t K, Kp, N;
  int64_t blocks() const { return (N + kColBlock - 1) / kColBlock; }
  int64_t width(int64_t j) const { return std::min(kColBlock, N - j * kColBlock); }
  int64_t ld(int64_t j) const { return round_up(width(j), 16); }
  const BFloat16* block(int64_t j) const { return data_.data_ptr<BFloat16>() + j * Kp * kColBlock; }

 private:
  at::Tensor data_;
};

// Releases the tile state of the calling thread at the end of a parallel region.
struct TileRelease {
  ~TileRelease() { at::native::cpublas::brgemm_release(true); }
};

// C[i] = A[i] @ B for i in [0, M), over blocks of kRowBlock rows on the threads (a block holds
// at least kMinRows rows' work per task, as in the engine).
// - load(i0, m, scratch) returns rows [i0, i0 + m) of A as bfloat16 with leading dimension
//   B.Kp, either in place or written into `scratch` ([kRowBlock, Kp]);
// - dest(i0, scratch) returns where C's rows go (leading dimension B.N), e.g. `scratch`;
// - store(i0, m, c) is called when they are there.
template <typename Load, typename Dest, typename Store>
void row_blocks(int64_t M, const PackedB& B, Load&& load, Dest&& dest, Store&& store) {
  if (M == 0 || B.N == 0) return;
  constexpr int64_t kMinRows = 512;
  const int64_t nblocks = (M + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, nblocks, std::max<int64_t>(1, kMinRows / kRowBlock), [&](int64_t b0, int64_t b1) {
    TileRelease release;
    std::vector<BFloat16> a_scratch(kRowBlock * B.Kp);
    std::vector<float> c_scratch(kRowBlock * B.N);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kRowBlock, m = std::min(kRowBlock, M - i0);
      const BFloat16* a = load(i0, m, a_scratch.data());
      float* c = dest(i0, c_scratch.data());
      for (int64_t j = 0; j < B.blocks(); ++j)
        at::native::cpublas::brgemm(m, B.width(j), B.Kp, B.Kp, B.ld(j), B.N, false, a,
                                    B.block(j), c + j * kColBlock, true);
      store(i0, m, c);
    }
  });
}

// Rows of x ([*, d] bfloat16, contiguous) as A with leading dimension Kp: in place when they
// are consecutive and d is even, else copied into `scratch` with a zero pad column.
inline const BFloat16* load_rows(const BFloat16* x, int64_t d, int64_t Kp, const int64_t* rows,
                                 int64_t i0, int64_t m, BFloat16* scratch) {
  if (!rows && d == Kp) return x + i0 * d;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t r = rows ? rows[i0 + i] : i0 + i;
    std::memcpy(scratch + i * Kp, x + r * d, d * sizeof(BFloat16));
    if (Kp > d) scratch[i * Kp + d] = BFloat16(0.f);
  }
  return scratch;
}

// T[i] = x[rows ? rows[i] : i] @ w^T for i in [0, T.size(0)): x [B, d] bfloat16 contiguous,
// w [ncols, d] (any floating dtype), T [n, ncols] float32 contiguous.
inline void project_rows(const at::Tensor& x, const int64_t* rows, const at::Tensor& w,
                         at::Tensor& T) {
  const PackedB B(w.t());
  const int64_t d = x.size(1);
  const BFloat16* xp = x.data_ptr<BFloat16>();
  float* tp = T.data_ptr<float>();
  row_blocks(
      T.size(0), B,
      [&](int64_t i0, int64_t m, BFloat16* s) { return load_rows(xp, d, B.Kp, rows, i0, m, s); },
      [&](int64_t i0, float*) { return tp + i0 * B.N; }, [](int64_t, int64_t, float*) {});
}

// grad_x[rows ? rows[i] : i] = bfloat16(R[i] @ w) for i in [0, R.size(0)): R [n, ncols] float32
// contiguous, w [ncols, d], grad_x [B, d] bfloat16 contiguous; other rows are not written.
inline void input_grad_rows(const at::Tensor& R, const at::Tensor& w, const int64_t* rows,
                            at::Tensor& grad_x) {
  const PackedB B(w);
  const int64_t ncols = R.size(1), d = B.N;
  const float* rp = R.data_ptr<float>();
  BFloat16* gp = grad_x.data_ptr<BFloat16>();
  row_blocks(
      R.size(0), B,
      [&](int64_t i0, int64_t m, BFloat16* s) {
        for (int64_t i = 0; i < m; ++i) {
          to_bf16(rp + (i0 + i) * ncols, s + i * B.Kp, ncols);
          if (B.Kp > ncols) s[i * B.Kp + ncols] = BFloat16(0.f);
        }
        return static_cast<const BFloat16*>(s);
      },
      [](int64_t, float* s) { return s; },
      [&](int64_t i0, int64_t m, float* c) {
        for (int64_t i = 0; i < m; ++i)
          to_bf16(c + i * d, gp + (rows ? rows[i0 + i] : i0 + i) * d, d);
      });
}

// grad_x [B, d] bfloat16 with row index[i] (row i when index is undefined) = R[i] @ w, and
// zeros in every other row: R [n, ncols] float32 contiguous, w [ncols, d], index sorted.
inline at::Tensor input_grad(const at::Tensor& R, const at::Tensor& w, const at::Tensor& index,
                             int64_t B) {
  const int64_t d = w.size(1);
  at::Tensor grad_x = at::empty({B, d}, R.options().dtype(at::kBFloat16));
  const int64_t* rows = index.defined() ? index.data_ptr<int64_t>() : nullptr;
  if (rows) {  // the gaps between the listed rows
    BFloat16* g = grad_x.data_ptr<BFloat16>();
    int64_t next = 0;
    for (int64_t i = 0; i <= R.size(0); ++i) {
      const int64_t r = i < R.size(0) ? rows[i] : B;
      std::fill(g + next * d, g + r * d, BFloat16(0.f));
      next = r + 1;
    }
  }
  input_grad_rows(R, w, rows, grad_x);
  return grad_x;
}

// The rows b of a [B, K] mask whose column k is set, or none when every row's is.
inline std::vector<int64_t> present_rows(const bool* mask, int64_t B, int64_t K, int64_t k) {
  std::vector<int64_t> rows;
  if (!mask) return rows;
  for (int64_t b = 0; b < B; ++b)
    if (mask[b * K + k]) rows.push_back(b);
  if ((int64_t)rows.size() == B) rows.clear();
  return rows;
}

// sum over i of R[r_i]^T x[x_i] ([ncols, d] float32), for i in [0, n): R [*, ncols] float32,
// x [*, d] bfloat16, both contiguous; r_i = rrow[i] (i when null), x_i likewise. Rows not
// listed never enter the sum, whatever they hold. The rows are split into at most `tasks`
// fixed ranges, summed separately and added in task order.
inline at::Tensor weight_grad(const at::Tensor& R, const at::Tensor& x, const int64_t* rrow,
                              const int64_t* xrow, int64_t n, int64_t tasks) {
  const int64_t ncols = R.size(1), d = x.size(1);
  tasks = std::max<int64_t>(1, std::min(tasks, n / kDepthBlock));
  at::Tensor parts = at::empty({tasks, ncols, d}, R.options());
  if (n == 0 || ncols == 0 || d == 0) return parts[0].zero_();
  const float* rp = R.data_ptr<float>();
  const BFloat16* xp = x.data_ptr<BFloat16>();
  const std::vector<BFloat16> zeros(kColBlock, BFloat16(0.f));  // the depth padding of B

  auto task = [&](int64_t t) {
    TileRelease release;
    float* C = parts[t].data_ptr<float>();
    std::vector<BFloat16> A(ncols * kDepthBlock), Bj(kDepthBlock * kColBlock);
    std::vector<const float*> r_rows(kDepthBlock);
    std::vector<const BFloat16*> x_rows(kDepthBlock);
    const int64_t i_begin = t * n / tasks, i_end = (t + 1) * n / tasks;
    for (int64_t i0 = i_begin; i0 < i_end; i0 += kDepthBlock) {
      const int64_t count = std::min(kDepthBlock, i_end - i0);
      const int64_t depth = round_up(count, kDepthStep);
      for (int64_t i = 0; i < count; ++i)
        r_rows[i] = rp + (rrow ? rrow[i0 + i] : i0 + i) * ncols;
      // A = R's rows transposed, [ncols, depth], zero in the padding columns.
      transpose_to_bf16(r_rows.data(), count, ncols, A.data(), depth);
      if (depth > count)
        for (int64_t c = 0; c < ncols; ++c)
          std::fill(A.data() + c * depth + count, A.data() + (c + 1) * depth, BFloat16(0.f));
      for (int64_t n0 = 0; n0 < d; n0 += kColBlock) {
        const int64_t width = std::min(kColBlock, d - n0), ld = round_up(width, 16);
        for (int64_t i = 0; i < depth; ++i)
          x_rows[i] = i < count ? xp + (xrow ? xrow[i0 + i] : i0 + i) * d + n0 : zeros.data();
        pack_rows(x_rows.data(), depth, width, ld, Bj.data());
        at::native::cpublas::brgemm(ncols, width, depth, depth, ld, d, /*add_C=*/i0 > i_begin,
                                    A.data(), Bj.data(), C + n0, true);
      }
    }
  };
  if (tasks == 1) {
    task(0);
    return parts[0];
  }
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) task(t);
  });
  at::Tensor sum = parts[0];
  for (int64_t t = 1; t < tasks; ++t) sum.add_(parts[t]);  // in task order: deterministic
  return sum;
}

}  // namespace mmkernels::cpu::bf16
