// The CPU engine's GEMMs (gemm_engine.h) as loops over blocks of rows around oneDNN's brgemm
// ukernel (ATen's cpublas::brgemm, which PyTorch's CPU flash attention uses), for bfloat16 and
// float32 inputs, with float32 results.
//
// Why not one MKL call per GEMM, as for float64:
// - bfloat16: the engine sums the modalities' partial products in float32, so its GEMMs must
//   return float32. PyTorch's bfloat16 mm rounds its result to bfloat16, and ATen's
//   bf16 x bf16 -> f32 gemm is not exported; the ukernel multiplies bfloat16 on AMX (B packed
//   in its VNNI layout) and writes float32.
// - both: a GEMM over a modality's present rows needs them gathered, and a gradient over them
//   scattered back; as passes over whole tensors those copies go through memory twice.
//   Here each block of rows is gathered into, converted in, and scattered from cache.
// - bands: the forward's T_k and the backward's R_k are made and used band of rows by band of
//   rows in cache (RowProjector, BackwardPass); the backward computes grad_x_k and
//   grad_stack_k in the same pass over a band.
//
// Only the present rows enter a weight gradient, whatever the absent rows of x hold (NaN).
// Sums over rows run in fixed tasks whose partial sums are added in task order.
//
// The ukernels exist where oneDNN packs bfloat16 for them, i.e. on CPUs with AMX
// (cpublas::could_pack, also false while torch.backends.mkldnn is disabled); elsewhere the
// engine uses MKL and converts bfloat16 to float32.
#pragma once

#include "row_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MMKERNELS_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace mmkernels::cpu::blocked {

using at::BFloat16;

constexpr int64_t kRowBlock = 64;     // rows of A (and C) per ukernel call
constexpr int64_t kColBlock = 64;     // columns of B per block: the widest bfloat16 packing
constexpr int64_t kDepthBlock = 256;  // rows of R_k and x_k per block of the backward pass
constexpr int64_t kDepthStep = 32;    // a weight-gradient block's depth is padded to this

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Whether the engine's bfloat16 and float32 GEMMs run here.
inline bool available() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(MMKERNELS_AVX512_BF16)
  return at::native::cpublas::could_pack(at::kBFloat16);
#else
  return false;
#endif
}

template <typename T>
constexpr bool is_bf16 = std::is_same_v<T, BFloat16>;

// The depth of a GEMM is padded to pairs in bfloat16 (VNNI).
template <typename T>
int64_t padded(int64_t k) {
  return is_bf16<T> ? round_up(k, 2) : k;
}

#if defined(MMKERNELS_AVX512_BF16)

// AVX512-BF16 is on every CPU with AMX, and available() requires AMX.
MMKERNELS_AVX512_BF16 inline void to_bf16_avx512(const float* src, BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(dst + i, m,
                             (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i)));
  }
}

// A[c * lda + i] = rows[i][c] for c < ncols, i < count: `count` float32 rows transposed.
// Gathers column c of 16 rows at a time; the 16 rows' cache lines serve the next columns.
template <typename T>
MMKERNELS_AVX512_BF16 void transpose_avx512(const float* const* rows, int64_t count,
                                            int64_t ncols, T* A, int64_t lda) {
  for (int64_t i0 = 0; i0 < count; i0 += 16) {
    const int64_t n = std::min<int64_t>(16, count - i0);
    const __mmask16 m = (__mmask16)((1u << n) - 1);
    alignas(64) int32_t off[16] = {0};
    bool near = true;  // offsets from the group's first row fit the gather's 32 bits
    for (int64_t i = 0; i < n; ++i) {
      const int64_t d = rows[i0 + i] - rows[i0];
      near = near && d >= INT32_MIN && d <= INT32_MAX;
      off[i] = (int32_t)d;
    }
    if (!near) {
      for (int64_t c = 0; c < ncols; ++c)
        for (int64_t i = 0; i < n; ++i) A[c * lda + i0 + i] = static_cast<T>(rows[i0 + i][c]);
      continue;
    }
    const __m512i vidx = _mm512_load_si512(off);
    for (int64_t c = 0; c < ncols; ++c) {
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, vidx, rows[i0] + c, 4);
      if constexpr (is_bf16<T>)
        _mm256_mask_storeu_epi16(A + c * lda + i0, m, (__m256i)_mm512_cvtneps_pbh(v));
      else
        _mm512_mask_storeu_ps(A + c * lda + i0, m, v);
    }
  }
}

#endif

// dst = src in T (bfloat16: rounded to nearest even).
template <typename T>
void from_float(const float* src, T* dst, int64_t n) {
  if constexpr (is_bf16<T>) {
#if defined(MMKERNELS_AVX512_BF16)
    to_bf16_avx512(src, dst, n);
#else
    for (int64_t i = 0; i < n; ++i) dst[i] = BFloat16(src[i]);
#endif
  } else {
    std::memcpy(dst, src, n * sizeof(float));
  }
}

template <typename T>
void transpose(const float* const* rows, int64_t count, int64_t ncols, T* A, int64_t lda) {
#if defined(MMKERNELS_AVX512_BF16)
  transpose_avx512(rows, count, ncols, A, lda);
#else
  for (int64_t c = 0; c < ncols; ++c)
    for (int64_t i = 0; i < count; ++i) A[c * lda + i] = static_cast<T>(rows[i][c]);
#endif
}

// bfloat16 B rows in the VNNI layout ([depth, width] -> [depth / 2][ld][2]): row pairs
// interleaved. rows[i] points at row i's first column of the block; depth is even.
inline void pack_vnni(const BFloat16* const* rows, int64_t depth, int64_t width, int64_t ld,
                      BFloat16* out) {
  auto* dst = reinterpret_cast<uint16_t*>(out);
  for (int64_t p = 0; p < depth; p += 2, dst += 2 * ld) {
    const auto* a = reinterpret_cast<const uint16_t*>(rows[p]);
    const auto* b = reinterpret_cast<const uint16_t*>(rows[p + 1]);
    for (int64_t n = 0; n < width; ++n) {
      dst[2 * n] = a[n];
      dst[2 * n + 1] = b[n];
    }
  }
}

// Releases the calling thread's tile state at the end of its share of a parallel region.
struct TileRelease {
  ~TileRelease() { at::native::cpublas::brgemm_release(true); }
};

// C = A @ B, A [m, Kp] with leading dimension lda, B packed, C float32 with ldc.
template <typename T>
class PackedB;

template <typename T>
void multiply(int64_t m, const T* A, int64_t lda, const PackedB<T>& B, float* C, int64_t ldc,
              bool add = false) {
  for (int64_t j = 0; j < B.blocks(); ++j)
    at::native::cpublas::brgemm(m, B.width(j), B.Kp, lda, B.ld(j), ldc, add, A, B.block(j),
                                C + j * kColBlock, is_bf16<T>);
}

// B [K, N] as the ukernel reads it, in T: K padded (padded<T>) with zero rows; in bfloat16 the
// columns in blocks of kColBlock, each packed with leading dimension round_up(width, 16).
template <typename T>
class PackedB {
 public:
  // b: [K, N] in any floating dtype and strides (bfloat16 values convert exactly).
  explicit PackedB(const at::Tensor& b)
      : K(b.size(0)), Kp(padded<T>(b.size(0))), N(b.size(1)) {
    const auto dtype = c10::CppTypeToScalarType<T>::value;
    at::Tensor src = at::zeros({Kp, N}, b.options().dtype(dtype));
    src.narrow(0, 0, K).copy_(b);
    if constexpr (!is_bf16<T>) {
      data_ = src;
      return;
    }
    data_ = at::zeros({blocks() * Kp * kColBlock}, src.options());
    if (Kp == 0) return;  // nothing to pack, and the packing refuses an empty depth
    for (int64_t j = 0; j < blocks(); ++j)
      at::native::cpublas::pack(Kp, width(j), N, ld(j), dtype, dtype,
                                src.data_ptr<T>() + j * kColBlock,
                                data_.data_ptr<T>() + j * Kp * kColBlock);
  }

  const int64_t K, Kp, N;
  int64_t blocks() const { return (N + kColBlock - 1) / kColBlock; }
  int64_t width(int64_t j) const { return std::min(kColBlock, N - j * kColBlock); }
  int64_t ld(int64_t j) const { return is_bf16<T> ? round_up(width(j), 16) : N; }
  const T* block(int64_t j) const {
    return data_.data_ptr<T>() + j * kColBlock * (is_bf16<T> ? Kp : 1);
  }

 private:
  at::Tensor data_;
};

// x's rows [i0, i0 + m) (rows[i] when listed) as A with leading dimension Kp: in place when
// they are consecutive and need no padding, else copied into `scratch` ([kRowBlock, Kp]).
template <typename T>
const T* load_rows(const T* x, int64_t d, int64_t Kp, const int64_t* rows, int64_t i0,
                   int64_t m, T* scratch) {
  if (!rows && d == Kp) return x + i0 * d;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t r = rows ? rows[i0 + i] : i0 + i;
    std::memcpy(scratch + i * Kp, x + r * d, d * sizeof(T));
    if (Kp > d) scratch[i * Kp + d] = T(0.f);
  }
  return scratch;
}

// Row i of x (x[rows[i]] when rows are listed) times w^T, for the row ranges a caller asks for:
// the engine's forward runs it band by band, each band's results still in cache when its
// epilogue reads them. x [B, d] in T contiguous, w [ncols, d] in any floating dtype.
template <typename T>
class RowProjector {
 public:
  RowProjector(const at::Tensor& x, const int64_t* rows, const at::Tensor& w)
      : B_(w.t()), x_(x.data_ptr<T>()), d_(x.size(1)), rows_(rows) {}

  // Scratch (in T) one call needs.
  int64_t scratch_size() const { return kRowBlock * B_.Kp; }

  // out[i - i0] = row i @ w^T for i in [i0, i1); out float32 with leading dimension ldo.
  void operator()(int64_t i0, int64_t i1, float* out, int64_t ldo, T* scratch) const {
    if (B_.N == 0) return;
    if (B_.Kp == 0) {  // no depth (d = 0): empty sums, and the ukernel refuses an empty depth
      for (int64_t i = i0; i < i1; ++i) std::fill(out + (i - i0) * ldo, out + (i - i0) * ldo + B_.N, 0.f);
      return;
    }
    for (int64_t s = i0; s < i1; s += kRowBlock) {
      const int64_t m = std::min(kRowBlock, i1 - s);
      multiply(m, load_rows(x_, d_, B_.Kp, rows_, s, m, scratch), B_.Kp, B_, out + (s - i0) * ldo,
               ldo);
    }
  }

 private:
  PackedB<T> B_;
  const T* x_;
  int64_t d_;
  const int64_t* rows_;
};

// Columns of R per group in the backward: a group's rows of R [kDepthBlock, kColGroup] and its
// weight-gradient block [kColGroup, d] stay in cache while the band is multiplied.
constexpr int64_t kColGroup = 512;

struct BackwardParts {
  at::Tensor grad_stack;  // [ncols, d] float32
  at::Tensor row_sum;     // [ncols] float32: the sums of R's rows, undefined unless asked for
};

// Uninitialised scratch (a std::vector would zero it on every call).
template <typename T>
struct Scratch {
  explicit Scratch(int64_t n) : data(new T[std::max<int64_t>(n, 1)]) {}
  T* get() const { return data.get(); }
  std::unique_ptr<T[]> data;
};

// The backward of one modality, band of rows by band of rows (R [n, ncols] float32, row i
// standing for sample x_i = index[i], or i when index is null). The engine runs every
// modality's pass over the same band of samples before the next, so the band's rows of
// grad_out and out are read from memory once for all modalities. R need not exist in memory:
// `source(i0, m, c0, c1, buf, &ld)` returns a pointer to its rows [i0, i0 + m), columns
// [c0, c1), with leading dimension ld, either into R itself or into buf ([m, c1 - c0], which it
// then fills), so R can be built band by band in cache.
// - grad_x, when given ([B, d] in T, contiguous): grad_x[x_i] = R[i] @ w, and zeros in the
//   samples no R row stands for;
// - grad_stack: the sum over the present rows i of R[i]^T x[x_i] (zeros when need_w is
//   false), present meaning listed in index, else mask[x_i * K + k] (all when mask is null);
//   in float32 a transposed view of a [d, ncols] sum;
// - row_sum (need_sum): the sum of R's rows.
// Each task sums into its own partials; finish() adds them in task order.
template <typename T>
class BackwardPass {
 public:
  BackwardPass(int64_t ncols, const at::Tensor& w, const at::Tensor& x, const int64_t* index,
               const bool* mask, int64_t K, int64_t k, at::Tensor* grad_x, bool need_w,
               bool need_sum, int64_t tasks)
      : ncols_(ncols), d_(x.size(1)), K_(K), k_(k), index_(index), mask_(mask),
        x_(x.data_ptr<T>()), gx_(grad_x && d_ > 0 ? grad_x->template data_ptr<T>() : nullptr),
        need_w_(need_w && d_ > 0), need_sum_(need_sum), zeros_(d_, T(0.f)) {
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    // float32 sums grad_stack^T ([d, ncols]; see band()), bfloat16 grad_stack itself.
    parts_ = is_bf16<T> ? at::zeros({need_w_ ? tasks : 1, ncols, d_}, f32)
                        : at::zeros({need_w_ ? tasks : 1, d_, ncols}, f32);
    sums_ = at::zeros({need_sum ? tasks : 1, ncols}, f32);
    if (gx_)
      for (int64_t g = 0; g < groups(); ++g)
        W_.emplace_back(w.narrow(0, g * kColGroup, group_cols(g)));
  }

  // Scratch one task needs for this pass.
  struct Buffers {
    Buffers(int64_t gc, int64_t d)
        : r(kDepthBlock * gc), cb(kDepthBlock * d), a(kRowBlock * padded<T>(gc)),
          At(gc * kDepthBlock), Bx(kDepthBlock * (round_up(d, 16) + kColBlock)) {}
    Scratch<float> r, cb;
    Scratch<T> a, At, Bx;
    std::vector<const float*> r_rows = std::vector<const float*>(kDepthBlock);
    std::vector<const T*> x_rows = std::vector<const T*>(kDepthBlock);
    std::vector<int64_t> present = std::vector<int64_t>(kDepthBlock);
  };
  Buffers buffers() const { return Buffers(std::min(kColGroup, ncols_), d_); }

  // R's rows [i0, i1) (at most kDepthBlock), standing for the samples in [b0, b1), in task t.
  template <typename Source>
  void band(Source&& source, int64_t t, int64_t i0, int64_t i1, int64_t b0, int64_t b1,
            Buffers& buf) const {
    const int64_t nrows = i1 - i0, d = d_;
    if (nrows == 0 || ncols_ == 0) {  // no R row, or rows without columns: zero gradients
      if (gx_) std::fill(gx_ + b0 * d, gx_ + b1 * d, T(0.f));
      return;
    }
    if (gx_ && index_) {  // zeros in the band's samples that no R row stands for
      int64_t next = b0;
      for (int64_t i = i0; i < i1; ++i) {
        std::fill(gx_ + next * d, gx_ + index_[i] * d, T(0.f));
        next = index_[i] + 1;
      }
      std::fill(gx_ + next * d, gx_ + b1 * d, T(0.f));
    }
    // float32: the weight gradient as grad_stack^T += x^T R, A = the band's rows of x
    // transposed ([d, nrows], zero where k is absent) and B = R's rows as they are, so R is
    // never transposed and the ukernel's rows are x's few columns.
    // bfloat16: grad_stack += R^T x, B = the band's present rows of x in the VNNI layout, packed
    // once for every group, and A = each group's present rows of R transposed.
    int64_t count = 0, depth = 0;
    if constexpr (!is_bf16<T>) {
      if (need_w_) {
        for (int64_t i = 0; i < nrows; ++i) buf.x_rows[i] = x_ + sample(i0 + i) * d;
        transpose(buf.x_rows.data(), nrows, d, buf.Bx.get(), nrows);
        for (int64_t i = 0; i < nrows; ++i) {
          if (index_ || !mask_ || mask_[sample(i0 + i) * K_ + k_]) {
            ++count;
            continue;
          }
          for (int64_t c = 0; c < d; ++c) buf.Bx.get()[c * nrows + i] = 0.f;
        }
      }
    } else if (need_w_) {
      for (int64_t i = 0; i < nrows; ++i) {
        const int64_t b = sample(i0 + i);
        if (index_ || !mask_ || mask_[b * K_ + k_]) {
          buf.present[count] = i;
          buf.x_rows[count++] = x_ + b * d;
        }
      }
      depth = round_up(count, kDepthStep);
      for (int64_t i = count; i < depth; ++i) buf.x_rows[i] = zeros_.data();
      for (int64_t n0 = 0; n0 < d; n0 += kColBlock) {
        const int64_t width = std::min(kColBlock, d - n0), ld = round_up(width, 16);
        std::vector<const T*> cols(depth);
        for (int64_t i = 0; i < depth; ++i) cols[i] = buf.x_rows[i] + (i < count ? n0 : 0);
        pack_vnni(cols.data(), depth, width, ld, buf.Bx.get() + n0 * depth);
      }
    }
    // grad_x accumulates over the groups in float32: in place when it is float32 and not
    // scattered, else in a band buffer converted (and scattered) once the band is done.
    const bool direct_x = !is_bf16<T> && !index_;
    float* C = parts_[need_w_ ? t : 0].template data_ptr<float>();
    float* sum = sums_[need_sum_ ? t : 0].template data_ptr<float>();
    for (int64_t g = 0; g < groups(); ++g) {
      const int64_t c0 = g * kColGroup, gc = group_cols(g);
      int64_t ld = gc;
      const float* Rg = source(i0, nrows, c0, c0 + gc, buf.r.get(), &ld);
      if (need_sum_)
        for (int64_t i = 0; i < nrows; ++i) {
          const float* r = Rg + i * ld;
          if (!rows::add_into(sum + c0, r, gc))
            for (int64_t c = 0; c < gc; ++c) sum[c0 + c] += r[c];
        }
      if (gx_) {
        const int64_t Kw = padded<T>(gc);  // grad_x's depth
        for (int64_t s0 = 0; s0 < nrows; s0 += kRowBlock) {
          const int64_t m = std::min(kRowBlock, nrows - s0);
          const T* A;
          int64_t lda = ld;
          if constexpr (is_bf16<T>) {
            for (int64_t i = 0; i < m; ++i) {
              from_float(Rg + (s0 + i) * ld, buf.a.get() + i * Kw, gc);
              if (Kw > gc) buf.a.get()[i * Kw + gc] = T(0.f);
            }
            A = buf.a.get();
            lda = Kw;
          } else {
            A = Rg + s0 * ld;
          }
          float* dst = direct_x ? reinterpret_cast<float*>(gx_) + (i0 + s0) * d
                                : buf.cb.get() + s0 * d;
          multiply(m, A, lda, W_[g], dst, d, /*add=*/g > 0);
        }
      }
      if (count == 0) continue;
      if constexpr (!is_bf16<T>) {
        for (int64_t n0 = 0; n0 < gc; n0 += kColBlock)
          at::native::cpublas::brgemm(d, std::min(kColBlock, gc - n0), nrows, nrows, ld, ncols_,
                                      true, buf.Bx.get(), Rg + n0, C + c0 + n0, false);
        continue;
      }
      // A = the group's present rows of R transposed, [gc, depth], zero in the padding.
      for (int64_t i = 0; i < count; ++i) buf.r_rows[i] = Rg + buf.present[i] * ld;
      transpose(buf.r_rows.data(), count, gc, buf.At.get(), depth);
      for (int64_t c = 0; c < gc; ++c)
        std::fill(buf.At.get() + c * depth + count, buf.At.get() + (c + 1) * depth, T(0.f));
      for (int64_t n0 = 0; n0 < d; n0 += kColBlock)
        at::native::cpublas::brgemm(gc, std::min(kColBlock, d - n0), depth, depth,
                                    round_up(std::min(kColBlock, d - n0), 16), d, true,
                                    buf.At.get(), buf.Bx.get() + n0 * depth, C + c0 * d + n0,
                                    true);
    }
    if (gx_ && !direct_x)
      for (int64_t i = 0; i < nrows; ++i)
        from_float(buf.cb.get() + i * d, gx_ + sample(i0 + i) * d, d);
  }

  // The partials of every task added in task order.
  BackwardParts finish() const {
    BackwardParts r{parts_[0], need_sum_ ? sums_[0] : at::Tensor()};
    for (int64_t t = 1; t < parts_.size(0); ++t) r.grad_stack.add_(parts_[t]);
    for (int64_t t = 1; need_sum_ && t < sums_.size(0); ++t) r.row_sum.add_(sums_[t]);
    if (!is_bf16<T>) r.grad_stack = r.grad_stack.t();  // [ncols, d], strided
    return r;
  }

 private:
  int64_t groups() const { return (ncols_ + kColGroup - 1) / kColGroup; }
  int64_t group_cols(int64_t g) const { return std::min(kColGroup, ncols_ - g * kColGroup); }
  int64_t sample(int64_t i) const { return index_ ? index_[i] : i; }

  int64_t ncols_, d_, K_, k_;
  const int64_t* index_;
  const bool* mask_;
  const T* x_;
  T* gx_;
  bool need_w_, need_sum_;
  std::vector<T> zeros_;  // the depth padding of B
  at::Tensor parts_, sums_;
  std::vector<PackedB<T>> W_;  // w's rows of each column group, as B of grad_x = R @ w
};

}  // namespace mmkernels::cpu::blocked
