// The forward of both fused ops as one tiled GEMM per output tile (no torch header).
//
// A block owns a BM x BN tile of output rows and columns. Its K loop walks the modality blocks
// by pointer: for each live modality k, the tiles of x_k (A, rows masked as they are copied:
// absent rows are zero-filled, never read) and of modality k's weight block (B). A modality
// is live in a tile when some row of the tile has it (decided on the device, per block) and
// the block's subset uses it. Products accumulate in registers (float32, float64 for
// float64); the epilogue adds the bias, applies the activation, and writes the output once.
//
// Work per block (ForwardParams):
//  * one output (item_subsets / no subsets): concat_project with per-subset or shared weight
//    (one subset per grid group), project_concat with per-subset weights (column groups are
//    the modalities);
//  * emit_all: one weight under every subset. Concat keeps one accumulator set per modality
//    (NK = K <= 4) and emits every subset's sum of them; project_concat emits its one
//    modality's product to every subset (zeros where the subset lacks it).
#pragma once

#include "fused_params.h"
#include "fused_tiles.cuh"

namespace mmkernels::cuda {

template <class P>
struct ForwardSmem {
  // [row_bits: BM words][scratch: 32 words][A stages][B stages]
  static constexpr int kHeader = (P::BM + 32) * 4;
  static constexpr int kA = P::template a_elems<false>() * (int)sizeof(typename P::elem);
  static constexpr int kB = P::template b_elems<false>() * (int)sizeof(typename P::elem);
  static constexpr int bytes() { return kHeader + P::STAGES * (kA + kB); }
};

template <class P, int NK, int FaultKind = kNoFault>
__global__ void __launch_bounds__(P::THREADS, P::MIN_BLOCKS)
    fused_forward_kernel(const ForwardParams p) {
  using Elem = typename P::elem;
  using acc_t = typename P::acc_t;
  MMK_DYNAMIC_SMEM(smem);
  auto* row_bits = reinterpret_cast<uint32_t*>(smem);
  auto* scratch = row_bits + P::BM;
  Elem* sA = reinterpret_cast<Elem*>(smem + ForwardSmem<P>::kHeader);
  Elem* sB = reinterpret_cast<Elem*>(smem + ForwardSmem<P>::kHeader + P::STAGES * ForwardSmem<P>::kA);
  constexpr int A_ELEMS = P::template a_elems<false>(), B_ELEMS = P::template b_elems<false>();

  const int tid = threadIdx.x;
  // 32-bit index arithmetic: a 64-bit division is a call, with a stack frame.
  const unsigned per_row = (unsigned)p.n_groups * (unsigned)p.n_coltiles;
  const int64_t row_tile = blockIdx.x / per_row;
  const int group = (int)((blockIdx.x % per_row) / (unsigned)p.n_coltiles);
  const int ct = (int)(blockIdx.x % (unsigned)p.n_coltiles);
  int cg = 0;
  while (cg + 1 < p.n_colgroups && ct >= p.col_tile_start[cg + 1]) ++cg;
  const int64_t m0 = row_tile * P::BM + (FaultKind == kOffByOneTile ? 1 : 0);
  const int n0 = (ct - p.col_tile_start[cg]) * P::BN;
  const int rows_left = (int)(p.B - m0 < P::BM ? p.B - m0 : P::BM);
  const int cols_left = p.width[cg] - n0;
  const int64_t s_item = p.item_subsets ? group : 0;

  // Which modalities each row of the tile has, and which are live anywhere in the tile.
  uint32_t mine = 0;
  for (int r = tid; r < P::BM; r += P::THREADS) {
    uint32_t bits = 0;
    if (r < rows_left) {
      if (p.sample_mask == nullptr) {
        bits = (1u << p.K) - 1u;
      } else {
        const uint8_t* m = p.sample_mask + (m0 + r) * p.K;
        for (int k = 0; k < p.K; ++k) bits |= (m[k] ? 1u : 0u) << k;
      }
    }
    sstore(&row_bits[r], bits);
    mine |= bits;
  }
  const uint32_t tile_live = block_or<P::THREADS>(tid, mine, scratch);  // (a barrier inside)

  // The live segments of the K loop: modalities (concat) or this column group's modality.
  uint32_t segs = 0;
  for (int k = 0; k < p.K; ++k) {
    const bool wanted = p.late ? k == cg : true;
    const bool used = !p.item_subsets || subset_uses(p.subset_mask, p.K, s_item, k);
    if (wanted && used && ((tile_live >> k) & 1u)) segs |= 1u << k;
  }
  int steps = 0;
  for (int k = 0; k < p.K; ++k)
    if ((segs >> k) & 1u) steps += (p.dims[k] + P::BK - 1) / P::BK;

  acc_t acc[NK][P::ACC];
  MMK_UNROLL
  for (int q = 0; q < NK; ++q)
    MMK_UNROLL
    for (int i = 0; i < P::ACC; ++i) acc[q][i] = acc_t(0);

  // Step cursors: (modality, k0) of the next tile to load and of the next to compute.
  int load_k = 0, load_k0 = 0, comp_k = 0, comp_k0 = 0;
  auto next_live = [&](int k) {
    while (k < p.K && !((segs >> k) & 1u)) ++k;
    return k;
  };
  load_k = comp_k = next_live(0);
  auto load_step = [&](int stage) {
    const int k = load_k;
    const int64_t w_off = p.per_subset ? s_item * p.w_step[k] : 0;
    const Elem* a = static_cast<const Elem*>(p.x[k]) + m0 * p.ldx[k] + load_k0;
    const Elem* b = static_cast<const Elem*>(p.w[k]) + w_off + (int64_t)n0 * p.ldw[k] + load_k0;
    copy_tile<Elem, P::BM, P::BK, P::LD_K, P::THREADS>(tid, sA + stage * A_ELEMS, a, p.ldx[k],
                                                      rows_left, p.dims[k] - load_k0,
                                                      RowBits{row_bits, k}, p.vec_x[k]);
    copy_tile<Elem, P::BN, P::BK, P::LD_K, P::THREADS>(tid, sB + stage * B_ELEMS, b, p.ldw[k],
                                                      cols_left, p.dims[k] - load_k0, AllRows{},
                                                      p.vec_w[k]);
    load_k0 += P::BK;
    if (load_k0 >= p.dims[k]) {
      load_k0 = 0;
      load_k = next_live(k + 1);
    }
  };

  MMK_UNROLL
  for (int s = 0; s < P::STAGES - 1; ++s) {
    if (s < steps) load_step(s);
    cp_async_commit();
  }
  for (int i = 0; i < steps; ++i) {
    cp_async_wait<P::STAGES - 2>();
    if (FaultKind != kSkipBarrier) __syncthreads();
    const int j = i + P::STAGES - 1;
    if (j < steps) load_step(j % P::STAGES);
    cp_async_commit();
    const int stage = i % P::STAGES;
    const int set = NK == 1 ? 0 : comp_k;
    MMK_UNROLL
    for (int q = 0; q < NK; ++q)
      if (q == set)
        P::template compute<false, false>(tid, sA + stage * A_ELEMS, sB + stage * B_ELEMS, acc[q]);
    comp_k0 += P::BK;
    if (comp_k0 >= p.dims[comp_k]) {
      comp_k0 = 0;
      comp_k = next_live(comp_k + 1);
    }
  }
  cp_async_wait<0>();

  // Epilogue: every output this tile contributes to.
  const int bias_cg = p.late ? cg : 0;
  const Elem* bias = static_cast<const Elem*>(p.bias[bias_cg]);
  const int64_t n_emit = p.emit_all ? p.S : 1;
  for (int64_t e = 0; e < n_emit; ++e) {
    const int64_t s = p.emit_all ? e : s_item;
    Elem* out = static_cast<Elem*>(p.out) + (p.has_subsets ? s * p.out_step : 0);
    const Elem* bias_s = bias ? bias + (p.per_subset ? s * p.bias_step[bias_cg] : 0) : nullptr;
    uint32_t combo = 1;  // the accumulator sets summed into this output
    if (NK > 1) {
      combo = 0;
      for (int q = 0; q < NK && q < p.K; ++q)
        if (subset_uses(p.subset_mask, p.K, s, q) && ((segs >> q) & 1u)) combo |= 1u << q;
    }
    const bool block_used = !p.late || subset_uses(p.subset_mask, p.K, s, cg);
    auto value = [&](int i, int r, int c) {
      acc_t v = bias_s ? to_acc(bias_s[n0 + c]) : acc_t(0);
      MMK_UNROLL
      for (int q = 0; q < NK; ++q)
        if ((combo >> q) & 1u) v += acc[q][i];
      if (p.relu && v < acc_t(0)) v = acc_t(0);
      // project_concat: an absent block is exactly zero (the bias must not leak); a select.
      if (p.late && !(block_used && ((sload(&row_bits[r]) >> cg) & 1u))) v = acc_t(0);
      return Convert<Elem>::from(v);
    };
    // Tensor-core accumulators come in column pairs (c, c + 1): one 2-element store each when
    // the output rows allow it.
    const bool pairs = P::kPairs && p.out_ld % 2 == 0 && p.col_off[cg] % 2 == 0 &&
                       reinterpret_cast<uintptr_t>(out) % (2 * sizeof(Elem)) == 0;
    MMK_UNROLL
    for (int i = 0; i < P::ACC; i += P::kPairs ? 2 : 1) {
      int r, c;
      P::coord(tid, i, r, c);
      if (r >= rows_left || c >= cols_left) continue;
      Elem* o = &out[(m0 + r) * p.out_ld + p.col_off[cg] + n0 + c];
      const Elem v0 = value(i, r, c);
      if (P::kPairs && c + 1 < cols_left) {
        const Elem v1 = value(i + 1, r, c + 1);
        if (pairs) {
          store_pair(o, v0, v1);
        } else {
          o[0] = v0;
          o[1] = v1;
        }
      } else {
        o[0] = v0;
      }
    }
  }
}

}  // namespace mmkernels::cuda
