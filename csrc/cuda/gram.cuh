// The kernels of mmkernels::gram on CUDA (no torch header; the host emulator runs this source).
//
// With A = [Z_s 1] ([n, H+1]) and B = [A Y] ([n, W], W = H+1+T), both outputs are blocks of
// P = A^T B: G = P[:, :H+1], R = P[:, H+1:]. gram_partial_kernel computes 64 x 64 tiles of P
// over one chunk of rows each (SIMT FMA in the accumulation type, operands staged in shared
// memory), only the tiles on or above the diagonal (P's G block is symmetric): its partial
// sums go to a workspace, one slice per chunk. gram_reduce_kernel then sums the chunks of
// every output element in chunk order and reads G[i][j] from P[min(i,j)][max(i,j)], so G is
// exactly symmetric, and writes G[H][H] = n exactly. Fixed-order sums, no atomics: the result
// depends only on the shapes and the split (set by the SM count), never on timing.
#pragma once

#include "device.cuh"

#include <cstdint>

namespace mmkernels::cuda {

constexpr int kGramTile = 64;     // rows and columns of a tile of P
constexpr int kGramRows = 32;     // rows of Z per shared-memory stage
constexpr int kGramThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each

struct GramParams {
  const void* z;
  int64_t z_ss, z_ld;
  const void* y;  // [n, T] acc
  int64_t S, n, H, T;
  int64_t H1, W;        // H + 1 and H + 1 + T
  int32_t row_tiles;    // tiles of P's rows: ceil(H1 / 64)
  int32_t col_tiles;    // tiles of P's columns: ceil(W / 64)
  int32_t pairs;        // tile pairs (i, j) with i <= j
  int32_t nsplit;       // row chunks
  int64_t chunk;        // rows per chunk (a multiple of kGramRows)
  void* ws;             // [nsplit, S, H1, W] acc
  void* G;              // [S, H1, H1] acc
  void* R;              // [S, H1, T] acc
};

// Element (row, col) of B = [Z_s 1 Y] (A is its first H + 1 columns); 0 outside.
template <typename Elem, typename Acc>
MMK_DEVICE Acc gram_operand(const GramParams& p, const Elem* zs, int64_t row, int64_t col,
                            int64_t row_end) {
  if (row >= row_end || col >= p.W) return Acc(0);
  if (col < p.H) return to_acc(zs[row * p.z_ld + col]);
  if (col == p.H) return Acc(1);
  return static_cast<const Acc*>(p.y)[row * p.T + (col - p.H1)];
}

template <typename Elem, typename Acc>
__global__ void __launch_bounds__(kGramThreads)
gram_partial_kernel(GramParams p) {
  MMK_DYNAMIC_SMEM(smem);
  Acc* As = reinterpret_cast<Acc*>(smem);      // [kGramRows][kGramTile]
  Acc* Bs = As + kGramRows * kGramTile;         // [kGramRows][kGramTile]
  // Block -> (chunk, subset, tile pair); pairs enumerate (ti, tj >= ti) row by row.
  int64_t id = blockIdx.x;
  const int32_t pair = (int32_t)(id % p.pairs);
  id /= p.pairs;
  const int64_t s = id % p.S;
  const int64_t split = id / p.S;
  int32_t ti = 0, rest = pair;
  while (rest >= p.col_tiles - ti) {
    rest -= p.col_tiles - ti;
    ++ti;
  }
  const int32_t tj = ti + rest;
  const int64_t i0 = (int64_t)ti * kGramTile, j0 = (int64_t)tj * kGramTile;
  const int64_t r_begin = split * p.chunk;
  const int64_t r_end = r_begin + p.chunk < p.n ? r_begin + p.chunk : p.n;
  const Elem* zs = static_cast<const Elem*>(p.z) + s * p.z_ss;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  Acc acc[4][4];
  MMK_UNROLL
  for (int a = 0; a < 4; ++a)
    MMK_UNROLL
    for (int b = 0; b < 4; ++b) acc[a][b] = Acc(0);
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kGramRows) {
    for (int e = threadIdx.x; e < kGramRows * kGramTile; e += kGramThreads) {
      const int r = e / kGramTile, c = e % kGramTile;
      sstore(&As[e], gram_operand<Elem, Acc>(p, zs, r0 + r, i0 + c, r_end));
      sstore(&Bs[e], gram_operand<Elem, Acc>(p, zs, r0 + r, j0 + c, r_end));
    }
    __syncthreads();
    for (int r = 0; r < kGramRows; ++r) {
      Acc av[4], bv[4];
      MMK_UNROLL
      for (int a = 0; a < 4; ++a) av[a] = sload(&As[r * kGramTile + ty + 16 * a]);
      MMK_UNROLL
      for (int b = 0; b < 4; ++b) bv[b] = sload(&Bs[r * kGramTile + tx + 16 * b]);
      MMK_UNROLL
      for (int a = 0; a < 4; ++a)
        MMK_UNROLL
        for (int b = 0; b < 4; ++b) acc[a][b] = mmk_fma(av[a], bv[b], acc[a][b]);
    }
    __syncthreads();
  }
  Acc* out = static_cast<Acc*>(p.ws) + (split * p.S + s) * p.H1 * p.W;
  MMK_UNROLL
  for (int a = 0; a < 4; ++a) {
    const int64_t i = i0 + ty + 16 * a;
    MMK_UNROLL
    for (int b = 0; b < 4; ++b) {
      const int64_t j = j0 + tx + 16 * b;
      if (i < p.H1 && j < p.W) out[i * p.W + j] = acc[a][b];
    }
  }
}

// One thread per element of G and R: the chunks' partial sums in chunk order.
template <typename Acc>
__global__ void gram_reduce_kernel(GramParams p) {
  const int64_t g_elems = p.S * p.H1 * p.H1, total = g_elems + p.S * p.H1 * p.T;
  const int64_t slice = p.S * p.H1 * p.W;
  const Acc* ws = static_cast<const Acc*>(p.ws);
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
       e += (int64_t)gridDim.x * blockDim.x) {
    int64_t s, row, col;
    if (e < g_elems) {
      s = e / (p.H1 * p.H1);
      const int64_t i = (e / p.H1) % p.H1, j = e % p.H1;
      row = i < j ? i : j;
      col = i < j ? j : i;
    } else {
      const int64_t f = e - g_elems;
      s = f / (p.H1 * p.T);
      row = (f / p.T) % p.H1;
      col = p.H1 + f % p.T;
    }
    Acc v = Acc(0);
    const Acc* src = ws + (s * p.H1 + row) * p.W + col;
    for (int32_t c = 0; c < p.nsplit; ++c) v += src[c * slice];
    if (e < g_elems) {
      if (row == p.H && col == p.H) v = static_cast<Acc>(p.n);  // exact, whatever n
      static_cast<Acc*>(p.G)[e] = v;
    } else {
      static_cast<Acc*>(p.R)[e - g_elems] = v;
    }
  }
}

}  // namespace mmkernels::cuda
