// The rows-in-lanes softmax-regression kernel, for C <= 16 classes (the usual heads).
#pragma once

#include "isa.h"
#include "vector_math.h"

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace mmkernels::cpu {

// The padded kernel (softmax_padded.h) puts classes in the lanes: 8 lanes for 6 classes, a
// broadcast per multiply-add, and one scalar exp per class and row. This one runs one 64-byte
// vector (16 float32 or 8 float64 lanes) along h for the logits and the gradient, and along
// rows for the softmax:
// * logits: for each row and class, a vector of partial dot products over h (the FMAs read Z
//   row-major, as stored); the L partial vectors of a class over L rows are folded into one
//   vector of L row logits by a log2(L)-level shuffle tree (lane j ends up holding the sum of
//   input bitrev(j), so rows are placed at bit-reversed slots).
// * softmax, loss, d = p - onehot: on those row vectors, with a polynomial exp (Cody-Waite
//   reduction; Cephes' float polynomial, a degree-13 Taylor series for float64).
// * gradient: gw[c, h-vector] += d[row, c] * z[row, h-vector], the accumulators held in
//   registers over a block of rows (C x HC vectors at a time).
// Measured 5-7x the padded kernel's rate at H = 128, C = 6 (AVX-512).

template <int L>
constexpr int bitrev(int j) {
  int r = 0;
  for (int b = 1; b < L; b <<= 1, j >>= 1) r = (r << 1) | (j & 1);
  return r;
}

// One level of the fold: out lane block q (size B) = sum of blocks 2(q/2) and 2(q/2)+1 of
// a (q even) or b (q odd). Lane j of the shuffle takes input lane fold_index(j) of a:b.
template <typename T, int B, bool HI>
constexpr int fold_index(int j) {
  constexpr int L = Lanes<T>::L;
  const int q = j / B, o = j % B, blk = (q / 2) * 2 + (HI ? 1 : 0);
  return (q % 2 ? L : 0) + blk * B + o;
}

#if defined(__clang__)
// Clang has no __builtin_shuffle; __builtin_shufflevector takes the lanes as constants.
template <typename T, int B, bool HI, int... J>
MMK_INLINE typename Lanes<T>::V fold_shuffle(const typename Lanes<T>::V& a,
                                             const typename Lanes<T>::V& b,
                                             std::integer_sequence<int, J...>) {
  return __builtin_shufflevector(a, b, fold_index<T, B, HI>(J)...);
}

template <typename T, int B>
MMK_INLINE void fold_levels(typename Lanes<T>::V* v, int count) {
  using Seq = std::make_integer_sequence<int, Lanes<T>::L>;
  for (int k = 0; k < count / 2; ++k)
    v[k] = fold_shuffle<T, B, false>(v[2 * k], v[2 * k + 1], Seq{}) +
           fold_shuffle<T, B, true>(v[2 * k], v[2 * k + 1], Seq{});
  if constexpr (B > 1) fold_levels<T, B / 2>(v, count / 2);
}
#else
template <typename T, int B, bool HI>
MMK_INLINE typename Lanes<T>::M fold_mask() {
  constexpr int L = Lanes<T>::L;
  typename Lanes<T>::M m;
  for (int j = 0; j < L; ++j) m[j] = fold_index<T, B, HI>(j);
  return m;
}

template <typename T, int B>
MMK_INLINE void fold_levels(typename Lanes<T>::V* v, int count) {
  const auto lo = fold_mask<T, B, false>(), hi = fold_mask<T, B, true>();
  for (int k = 0; k < count / 2; ++k)
    v[k] = __builtin_shuffle(v[2 * k], v[2 * k + 1], lo) +
           __builtin_shuffle(v[2 * k], v[2 * k + 1], hi);
  if constexpr (B > 1) fold_levels<T, B / 2>(v, count / 2);
}
#endif

// One subset, rows [0, n): loss (float64, without the penalty), gw [C, H] and gb [C] (float64,
// added to). wt is W transposed: [C, H].
template <typename T, int C>
MMK_INLINE void softmax_subset_lanes(const T* z, int64_t ld, int64_t n, int64_t H, const T* wt,
                                     const T* b, const int64_t* y, const T* sw, double* loss,
                                     double* gw, double* gb) {
  using V = typename Lanes<T>::V;
  using VU = typename Lanes<T>::VU;
  constexpr int L = Lanes<T>::L;
  // Register budget (32 zmm): the logits hold R rows x C class accumulators (two rows while
  // 2C + 3 fit, one above 12 classes), the gradient C x HC accumulators (HC = 1 above 12).
  constexpr int R = C <= 12 ? 2 : 1;
  constexpr int HC = C > 12 ? 1 : 24 / C >= 16 ? 16 : 24 / C >= 8 ? 8 : 24 / C >= 4 ? 4 : 2;
  constexpr int64_t FLUSH = 256;  // rows between float32 -> float64 flushes
  const int64_t NV = H / L, Hv = NV * L, Ht = H - Hv;
  // Workspace: row partial sums [C][L], gradient accumulators [C][NV] (vectors), bias
  // accumulators [C], gradient tail [C][Ht], d [C][L] and weights [L] (scalars).
  // (std::vector<V> would not honour V's 64-byte alignment: the attribute is dropped on
  // template arguments.)
  std::vector<char> raw((C * L + C * NV + C + 1) * sizeof(V));
  V* part = reinterpret_cast<V*>((reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t(63));
  V* gacc = part + C * L;
  V* bacc = gacc + C * NV;
  std::vector<T> sbuf(C * Ht + C * L + L, T(0));
  T* gtail = sbuf.data();
  T* dbuf = gtail + C * Ht;
  T* wbuf = dbuf + C * L;
  for (int64_t j = 0; j < C * NV + C; ++j) gacc[j] = V{};
  double total = 0;
#define load(p) (*reinterpret_cast<const VU*>(p))
  for (int64_t i0 = 0; i0 < n; i0 += L) {
    const int nb = static_cast<int>(std::min<int64_t>(L, n - i0));
    const T* zb = z + i0 * ld;
    // Logits: partial vectors over h, R rows at a time (R C independent FMA chains).
    int r = 0;
    for (; R == 2 && r + 2 <= nb; r += 2) {
      const T* z0 = zb + r * ld;
      const T* z1 = z0 + ld;
      V a0[C], a1[C];
      for (int c = 0; c < C; ++c) a0[c] = a1[c] = V{};
      // Z streams from memory here (the gradient re-reads it from cache): fetch the rows two
      // blocks ahead (prefetches never fault past the end). A separate loop: inside the FMA
      // loop they made GCC spill the accumulators.
      for (int64_t v = 0; v < NV; ++v) {
        __builtin_prefetch(z0 + 2 * L * ld + v * L);
        __builtin_prefetch(z1 + 2 * L * ld + v * L);
      }
      for (int64_t v = 0; v < NV; ++v) {
        const V x0 = load(z0 + v * L), x1 = load(z1 + v * L);
        for (int c = 0; c < C; ++c) {
          const V w = load(wt + c * H + v * L);
          a0[c] += x0 * w;
          a1[c] += x1 * w;
        }
      }
      for (int c = 0; c < C; ++c) {
        part[c * L + bitrev<L>(r)] = a0[c];
        part[c * L + bitrev<L>(r + 1)] = a1[c];
      }
    }
    for (; r < nb; ++r) {
      const T* z0 = zb + r * ld;
      V a0[C];
      for (int c = 0; c < C; ++c) a0[c] = V{};
      for (int64_t v = 0; v < NV; ++v) {
        const V x0 = load(z0 + v * L);
        for (int c = 0; c < C; ++c) a0[c] += x0 * load(wt + c * H + v * L);
      }
      for (int c = 0; c < C; ++c) part[c * L + bitrev<L>(r)] = a0[c];
    }
    for (; r < L; ++r)
      for (int c = 0; c < C; ++c) part[c * L + bitrev<L>(r)] = V{};
    V lg[C];
    for (int c = 0; c < C; ++c) {
      fold_levels<T, L / 2>(part + c * L, L);
      lg[c] = part[c * L] + b[c];
    }
    if (Ht > 0)
      for (int rr = 0; rr < nb; ++rr)
        for (int c = 0; c < C; ++c) {
          T s = 0;
          for (int64_t h = Hv; h < H; ++h) s += zb[rr * ld + h] * wt[c * H + h];
          lg[c][rr] += s;
        }
    // Softmax over classes, per row lane; rows past nb get weight 0.
    for (int l = 0; l < L; ++l) wbuf[l] = l < nb ? (sw ? sw[i0 + l] : T(1)) : T(0);
    V m = lg[0];
    for (int c = 1; c < C; ++c) m = m > lg[c] ? m : lg[c];
    V e[C];
    V sum = V{};
    for (int c = 0; c < C; ++c) {
      vexp<T>(lg[c] - m, e[c]);
      sum += e[c];
    }
    // Loss w (lse - logit[y]) and d = w (p - onehot(y)), on lane vectors (label 0 and weight
    // 0 past nb).
    using M = typename Lanes<T>::M;
    M yv = M{};
    for (int l = 0; l < nb; ++l) yv[l] = static_cast<typename Lanes<T>::I>(y[i0 + l]);
    const V wv = load(wbuf);
    const V scale = wv / sum;
    V lse;
    vlog<T>(sum, lse);
    lse += m;
    V ly = V{};
    for (int c = 0; c < C; ++c) {
      const M is = yv == c;
      ly = is ? lg[c] : ly;
      const V pc = e[c] * scale;
      const V d = is ? pc - wv : pc;
      *reinterpret_cast<VU*>(dbuf + c * L) = d;
      bacc[c] += d;
    }
    const V lv = wv * (lse - ly);
    double block_loss = 0;
    for (int l = 0; l < L; ++l) block_loss += static_cast<double>(lv[l]);
    total += block_loss;
    // Gradient: HC vectors of h for all classes in registers over the block's rows.
    int64_t v0 = 0;
    for (; v0 + HC <= NV; v0 += HC) {
      V g[C][HC];
      for (int c = 0; c < C; ++c)
        for (int j = 0; j < HC; ++j) g[c][j] = gacc[c * NV + v0 + j];
      for (int rr = 0; rr < nb; ++rr) {
        const T* zr = zb + rr * ld + v0 * L;
        V x[HC];
        for (int j = 0; j < HC; ++j) x[j] = load(zr + j * L);
        for (int c = 0; c < C; ++c) {
          const T d = dbuf[c * L + rr];
          for (int j = 0; j < HC; ++j) g[c][j] += d * x[j];
        }
      }
      for (int c = 0; c < C; ++c)
        for (int j = 0; j < HC; ++j) gacc[c * NV + v0 + j] = g[c][j];
    }
    for (; v0 < NV; ++v0) {
      V g[C];
      for (int c = 0; c < C; ++c) g[c] = gacc[c * NV + v0];
      for (int rr = 0; rr < nb; ++rr) {
        const V x = load(zb + rr * ld + v0 * L);
        for (int c = 0; c < C; ++c) g[c] += dbuf[c * L + rr] * x;
      }
      for (int c = 0; c < C; ++c) gacc[c * NV + v0] = g[c];
    }
    if (Ht > 0)
      for (int rr = 0; rr < nb; ++rr)
        for (int c = 0; c < C; ++c) {
          const T d = dbuf[c * L + rr];
          for (int64_t h = 0; h < Ht; ++h) gtail[c * Ht + h] += d * zb[rr * ld + Hv + h];
        }
    if ((i0 + L) % FLUSH == 0 || i0 + L >= n) {  // float32 partial sums into float64
      for (int c = 0; c < C; ++c) {
        for (int64_t v = 0; v < NV; ++v) {
          for (int l = 0; l < L; ++l) gw[c * H + v * L + l] += gacc[c * NV + v][l];
          gacc[c * NV + v] = V{};
        }
        for (int64_t h = 0; h < Ht; ++h) {
          gw[c * H + Hv + h] += gtail[c * Ht + h];
          gtail[c * Ht + h] = T(0);
        }
        double s = 0;
        for (int l = 0; l < L; ++l) s += bacc[c][l];
        gb[c] += s;
        bacc[c] = V{};
      }
    }
  }
#undef load
  *loss = total;
}

}  // namespace mmkernels::cpu
