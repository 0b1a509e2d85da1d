// The backward of both fused ops (no torch header): dZ = act'(out) * grad_out is formed in
// registers as the A tiles are built, never stored.
//  * grad_x_k = present_k * (R_k W_k): a tiled GEMM of the forward's family. R_k is the sum of
//    dZ over the subsets that use k (one weight shared), or the K loop walks the subsets'
//    dZ_s and weight blocks W_{s,k} by pointer (one weight per subset).
//  * grad_W_k = R_k^T (present_k x_k): the batch is split into chunks across blocks; each block
//    writes its partial tile to a workspace, and fused_reduce_kernel adds the partials in
//    split order (deterministic: no atomics). Absent rows of x_k are zero-filled as the tile
//    is copied (selected out: a NaN there never reaches grad_W).
//  * grad_b: per column, the sum of dZ over the rows (and subsets) the bias reaches, in the
//    same split-and-reduce scheme with finer chunks (one thread per column needs many blocks).
#pragma once

#include "fused_params.h"
#include "fused_tiles.cuh"

namespace mmkernels::cuda {

template <typename Elem>
MMK_DEVICE typename AccOf<Elem>::type grad_z(const BackwardParams& p, int64_t s, int64_t b,
                                             int64_t col) {
  using acc_t = typename AccOf<Elem>::type;
  const int64_t e = s * p.out_step + b * p.out_ld + col;
  const acc_t g = to_acc(static_cast<const Elem*>(p.grad_out)[e]);
  if (!p.relu) return g;
  return to_acc(static_cast<const Elem*>(p.out)[e]) > acc_t(0) ? g : acc_t(0);
}

// dZ summed over the subsets whose gradient reaches modality k's block (one shared weight),
// or subset s's alone (s >= 0).
template <typename Elem>
MMK_DEVICE typename AccOf<Elem>::type grad_rows(const BackwardParams& p, int64_t s, int k,
                                                int64_t b, int64_t col) {
  using acc_t = typename AccOf<Elem>::type;
  if (s >= 0) return grad_z<Elem>(p, s, b, col);
  acc_t v = acc_t(0);
  for (int64_t t = 0; t < p.S; ++t)
    if (subset_uses(p.subset_mask, p.K, t, k)) v += grad_z<Elem>(p, t, b, col);
  return v;
}

MMK_DEVICE bool any_subset_uses(const BackwardParams& p, int k) {
  for (int64_t t = 0; t < p.S; ++t)
    if (subset_uses(p.subset_mask, p.K, t, k)) return true;
  return false;
}

MMK_DEVICE int64_t next_user(const BackwardParams& p, int k, int64_t s) {
  while (s < p.S && !subset_uses(p.subset_mask, p.K, s, k)) ++s;
  return s;
}

template <class P>
struct GradXSmem {
  static constexpr int kHeader = (P::BM + 32) * 4;
  static constexpr int kA = P::template a_elems<false>() * (int)sizeof(typename P::elem);
  static constexpr int kB = P::template b_elems<true>() * (int)sizeof(typename P::elem);
  static constexpr int bytes() { return kHeader + P::STAGES * (kA + kB); }
};

// Loads one K step of grad_x: A = dZ rows (summed over subsets, or subset load_s's), formed
// in registers; B = W_{s,k} rows h via cp.async. Advances the cursor (load_s, load_h0).
template <class P>
MMK_DEVICE void grad_x_load(const BackwardParams& p, int tid, int k, int64_t m0, int n0,
                            int rows_left, int cols_left, const uint32_t* row_bits,
                            typename P::elem* a, typename P::elem* bs, int64_t& load_s,
                            int& load_h0) {
  using Elem = typename P::elem;
  using acc_t = typename P::acc_t;
  const int width = p.width[k];
  for (int i = tid; i < P::BM * P::BK; i += P::THREADS) {
    const int r = i / P::BK, c = i % P::BK, h = load_h0 + c;
    acc_t v = acc_t(0);
    if (r < rows_left && h < width && (sload(&row_bits[r]) & 1u))
      v = grad_rows<Elem>(p, load_s, k, m0 + r, p.dz_off[k] + h);
    sstore(&a[r * P::LD_K + c], Convert<Elem>::from(v));
  }
  const int64_t w_off = p.per_subset ? load_s * p.w_step[k] : 0;
  const Elem* b = static_cast<const Elem*>(p.w[k]) + w_off + (int64_t)load_h0 * p.ldw[k] + n0;
  copy_tile<Elem, P::BK, P::BN, P::LD_BN, P::THREADS>(tid, bs, b, p.ldw[k], width - load_h0,
                                                     cols_left, AllRows{}, p.vec_w[k]);
  load_h0 += P::BK;
  if (load_h0 >= width) {
    load_h0 = 0;
    if (p.per_subset) load_s = next_user(p, k, load_s + 1);
  }
}

template <class P, int FaultKind = kNoFault>
__global__ void __launch_bounds__(P::THREADS, 2) fused_grad_x_kernel(const BackwardParams p) {
  using Elem = typename P::elem;
  using acc_t = typename P::acc_t;
  MMK_DYNAMIC_SMEM(smem);
  auto* row_bits = reinterpret_cast<uint32_t*>(smem);
  auto* scratch = row_bits + P::BM;
  Elem* sA = reinterpret_cast<Elem*>(smem + GradXSmem<P>::kHeader);
  Elem* sB = reinterpret_cast<Elem*>(smem + GradXSmem<P>::kHeader + P::STAGES * GradXSmem<P>::kA);
  constexpr int A_ELEMS = P::template a_elems<false>(), B_ELEMS = P::template b_elems<true>();

  const int tid = threadIdx.x;
  // 32-bit index arithmetic: a 64-bit division is a call, with a stack frame.
  const unsigned n_tiles = (unsigned)p.gx_tile_start[p.K];
  const int64_t row_tile = blockIdx.x / n_tiles;
  const int ct = (int)(blockIdx.x % n_tiles);
  int k = 0;
  while (k + 1 < p.K && ct >= p.gx_tile_start[k + 1]) ++k;
  const int64_t m0 = row_tile * P::BM + (FaultKind == kOffByOneTile ? 1 : 0);
  const int n0 = (ct - p.gx_tile_start[k]) * P::BN;
  const int rows_left = (int)(p.B - m0 < P::BM ? p.B - m0 : P::BM);
  const int cols_left = p.dims[k] - n0, width = p.width[k];

  uint32_t mine = 0;
  for (int r = tid; r < P::BM; r += P::THREADS) {
    const bool on = r < rows_left &&
                    (p.sample_mask == nullptr || p.sample_mask[(m0 + r) * p.K + k] != 0);
    sstore(&row_bits[r], on ? 1u : 0u);
    mine |= on ? 1u : 0u;
  }
  const bool live = block_or<P::THREADS>(tid, mine, scratch) != 0;

  // Segments: the subsets s that use k (per-subset weights), or one summed segment.
  const int per_seg = (width + P::BK - 1) / P::BK;
  int64_t nseg = 0;
  if (live) {
    if (p.per_subset) {
      for (int64_t s = 0; s < p.S; ++s) nseg += subset_uses(p.subset_mask, p.K, s, k) ? 1 : 0;
    } else {
      nseg = any_subset_uses(p, k) ? 1 : 0;
    }
  }
  const int64_t steps = nseg * per_seg;

  acc_t acc[P::ACC];
  MMK_UNROLL
  for (int i = 0; i < P::ACC; ++i) acc[i] = acc_t(0);

  int64_t load_s = p.per_subset ? next_user(p, k, 0) : -1;
  int load_h0 = 0;
  MMK_UNROLL
  for (int s = 0; s < P::STAGES - 1; ++s) {
    if (s < steps) grad_x_load<P>(p, tid, k, m0, n0, rows_left, cols_left, row_bits, sA + s * A_ELEMS, sB + s * B_ELEMS, load_s, load_h0);
    cp_async_commit();
  }
  for (int64_t i = 0; i < steps; ++i) {
    cp_async_wait<P::STAGES - 2>();
    if (FaultKind != kSkipBarrier) __syncthreads();
    const int64_t j = i + P::STAGES - 1;
    if (j < steps) {
      const int st = (int)(j % P::STAGES);
      grad_x_load<P>(p, tid, k, m0, n0, rows_left, cols_left, row_bits, sA + st * A_ELEMS, sB + st * B_ELEMS, load_s, load_h0);
    }
    cp_async_commit();
    const int stage = (int)(i % P::STAGES);
    P::template compute<false, true>(tid, sA + stage * A_ELEMS, sB + stage * B_ELEMS, acc);
  }
  cp_async_wait<0>();

  Elem* gx = static_cast<Elem*>(p.gx[k]);
  MMK_UNROLL
  for (int i = 0; i < P::ACC; ++i) {
    int r, c;
    P::coord(tid, i, r, c);
    if (r >= rows_left || c >= cols_left) continue;
    const acc_t v = (sload(&row_bits[r]) & 1u) ? acc[i] : acc_t(0);
    gx[(m0 + r) * p.dims[k] + n0 + c] = Convert<Elem>::from(v);
  }
}

template <class P>
struct GradWSmem {
  static constexpr int kA = P::template a_elems<true>() * (int)sizeof(typename P::elem);
  static constexpr int kB = P::template b_elems<true>() * (int)sizeof(typename P::elem);
  static constexpr int bytes() { return P::STAGES * (kA + kB); }
};

// Loads one K step (BK batch rows from load_b0) of a grad_W partial: A = dZ^T rows formed in
// registers ([b][h]); B = x_k rows via cp.async, absent rows zero-filled, never read.
template <class P>
MMK_DEVICE void grad_w_load(const BackwardParams& p, int tid, int k, int64_t s_sel, int h0,
                            int j0, int64_t c1, typename P::elem* a, typename P::elem* bs,
                            int64_t& load_b0) {
  using Elem = typename P::elem;
  using acc_t = typename P::acc_t;
  const int width = p.width[k];
  for (int i = tid; i < P::BK * P::BM; i += P::THREADS) {
    const int r = i / P::BM, c = i % P::BM;
    const int64_t b = load_b0 + r;
    const int h = h0 + c;
    acc_t v = acc_t(0);
    if (b < c1 && h < width && (p.sample_mask == nullptr || p.sample_mask[b * p.K + k] != 0))
      v = grad_rows<Elem>(p, s_sel, k, b, p.dz_off[k] + h);
    sstore(&a[r * P::LD_AM + c], Convert<Elem>::from(v));
  }
  const Elem* x = static_cast<const Elem*>(p.x[k]) + load_b0 * p.ldx[k] + j0;
  copy_tile<Elem, P::BK, P::BN, P::LD_BN, P::THREADS>(tid, bs, x, p.ldx[k], (int)(c1 - load_b0),
                                                     p.dims[k] - j0,
                                                     MaskRows{p.sample_mask, load_b0, p.K, k},
                                                     p.vec_x[k]);
  load_b0 += P::BK;
}

// One partial tile of grad_W: rows h (BM) and columns j (BN) of a weight group's modality-k
// block, summed over one batch chunk.
template <class P, int FaultKind = kNoFault>
__global__ void __launch_bounds__(P::THREADS, 2) fused_grad_w_kernel(const BackwardParams p) {
  using Elem = typename P::elem;
  using acc_t = typename P::acc_t;
  MMK_DYNAMIC_SMEM(smem);
  Elem* sA = reinterpret_cast<Elem*>(smem);
  Elem* sB = reinterpret_cast<Elem*>(smem + P::STAGES * GradWSmem<P>::kA);
  constexpr int A_ELEMS = P::template a_elems<true>(), B_ELEMS = P::template b_elems<true>();

  const int tid = threadIdx.x;
  const unsigned tiles = (unsigned)p.gw_tile_start[p.K];
  const unsigned per_split = (unsigned)p.n_wgroups * tiles;
  const int split = (int)(blockIdx.x / per_split);
  const unsigned rem = blockIdx.x % per_split;
  const int64_t wg = rem / tiles;
  const int t = (int)(rem % tiles);
  int k = 0;
  while (k + 1 < p.K && t >= p.gw_tile_start[k + 1]) ++k;
  const int width = p.width[k];
  const int nh = (width + P::BM - 1) / P::BM;
  const int local = t - p.gw_tile_start[k];
  const int h0 = (local % nh) * P::BM + (FaultKind == kOffByOneTile ? 1 : 0);
  const int j0 = (local / nh) * P::BN;
  const int64_t c0 = (int64_t)split * p.chunk;
  const int64_t c1 = c0 + p.chunk < p.B ? c0 + p.chunk : p.B;
  const int64_t nrows = c1 > c0 ? c1 - c0 : 0;

  const bool used = p.per_subset ? subset_uses(p.subset_mask, p.K, wg, k) : any_subset_uses(p, k);
  const int64_t steps = used ? (nrows + P::BK - 1) / P::BK : 0;
  const int64_t s_sel = p.per_subset ? wg : -1;

  acc_t acc[P::ACC];
  MMK_UNROLL
  for (int i = 0; i < P::ACC; ++i) acc[i] = acc_t(0);

  int64_t load_b0 = c0;
  MMK_UNROLL
  for (int s = 0; s < P::STAGES - 1; ++s) {
    if (s < steps) grad_w_load<P>(p, tid, k, s_sel, h0, j0, c1, sA + s * A_ELEMS, sB + s * B_ELEMS, load_b0);
    cp_async_commit();
  }
  for (int64_t i = 0; i < steps; ++i) {
    cp_async_wait<P::STAGES - 2>();
    if (FaultKind != kSkipBarrier) __syncthreads();
    const int64_t j = i + P::STAGES - 1;
    if (j < steps) {
      const int st = (int)(j % P::STAGES);
      grad_w_load<P>(p, tid, k, s_sel, h0, j0, c1, sA + st * A_ELEMS, sB + st * B_ELEMS, load_b0);
    }
    cp_async_commit();
    const int stage = (int)(i % P::STAGES);
    P::template compute<true, true>(tid, sA + stage * A_ELEMS, sB + stage * B_ELEMS, acc);
  }
  cp_async_wait<0>();

  acc_t* ws = static_cast<acc_t*>(p.ws) + (int64_t)split * p.split_elems + p.gw_off[k] +
              wg * p.gw_group_step[k];
  MMK_UNROLL
  for (int i = 0; i < P::ACC; ++i) {
    int r, c;
    P::coord(tid, i, r, c);
    if (h0 + r >= width || j0 + c >= p.dims[k]) continue;
    ws[(int64_t)(h0 + r) * p.gw_ld[k] + j0 + c] = acc[i];
  }
}

constexpr int kBiasThreads = 256;

// One partial of grad_b: thread = one column of dZ, summed over one batch chunk.
template <typename Elem>
__global__ void __launch_bounds__(kBiasThreads) fused_grad_b_kernel(const BackwardParams p) {
  using acc_t = typename AccOf<Elem>::type;
  const unsigned ncol_blocks = (unsigned)((p.out_ld + kBiasThreads - 1) / kBiasThreads);
  const unsigned per_split = (unsigned)p.n_bgroups * ncol_blocks;
  const int split = (int)(blockIdx.x / per_split);
  const unsigned rem = blockIdx.x % per_split;
  const int64_t bg = rem / ncol_blocks;
  const int64_t col = (int64_t)(rem % ncol_blocks) * kBiasThreads + threadIdx.x;
  if (col >= p.out_ld) return;
  int k = 0;
  if (p.late)
    while (k + 1 < p.K && col >= p.dz_off[k + 1]) ++k;
  const int64_t c0 = (int64_t)split * p.chunk_b;
  const int64_t c1 = c0 + p.chunk_b < p.B ? c0 + p.chunk_b : p.B;
  acc_t acc = acc_t(0);
  for (int64_t b = c0; b < c1; ++b) {
    // project_concat: the bias reaches only present blocks (a select, not a product).
    if (p.late && p.sample_mask != nullptr && p.sample_mask[b * p.K + k] == 0) continue;
    if (p.per_subset) {
      if (!p.late || subset_uses(p.subset_mask, p.K, bg, k)) acc += grad_z<Elem>(p, bg, b, col);
    } else {
      for (int64_t s = 0; s < p.S; ++s)
        if (!p.late || subset_uses(p.subset_mask, p.K, s, k)) acc += grad_z<Elem>(p, s, b, col);
    }
  }
  acc_t* ws = static_cast<acc_t*>(p.ws) + p.b_base + (int64_t)split * p.b_split_elems;
  ws[p.gb_off[k] + bg * p.gb_group_step[k] + (col - p.dz_off[k])] = acc;
}

constexpr int kReduceThreads = 256;

// grad = sum over splits, in split order, of the partials; cast to the gradient's dtype.
template <typename Elem>
__global__ void __launch_bounds__(kReduceThreads) fused_reduce_kernel(const ReduceParams r) {
  using acc_t = typename AccOf<Elem>::type;
  const acc_t* ws = static_cast<const acc_t*>(r.ws);
  for (int64_t e = (int64_t)blockIdx.x * kReduceThreads + threadIdx.x; e < r.total;
       e += (int64_t)gridDim.x * kReduceThreads) {
    int seg = 0;
    int64_t i = e;
    while (seg + 1 < r.nseg && i >= r.seg_len[seg]) i -= r.seg_len[seg++];
    const acc_t* src = ws + r.seg_src[seg] + i;
    acc_t v = acc_t(0);
    for (int s = 0; s < r.seg_nsplit[seg]; ++s) v += src[(int64_t)s * r.seg_stride[seg]];
    static_cast<Elem*>(r.seg_dst[seg])[i] = Convert<Elem>::from(v);
  }
}

}  // namespace mmkernels::cuda
