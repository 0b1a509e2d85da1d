// The kernels of mmkernels::softmax_regression_loss_grad on CUDA (no torch header; the host
// emulator runs this source).
//
// softmax_partial_kernel: one block per (problem k, chunk of rows). It walks its chunk in tiles
// of BM rows; per tile, in shared memory: the logits z W_k + b_k (Z staged 32 columns at a
// time, W_k read through the cache), then per row (one warp) the softmax, the row's loss and
// the logits' gradient d = sw (p - onehot(y)) in place of the logits, then Z's tile again for
// grad_W += Z^T d and grad_b += sum d. Z is read from memory once per evaluation (the second
// read of a tile hits L2). Each thread owns fixed elements of the chunk's partial sums (in the
// workspace) across tiles: no atomics. softmax_reduce_kernel then sums the chunks of every
// output element in chunk order and adds the penalty. Results depend only on the shapes and
// the split (set by the SM count), never on timing.
//
// Labels outside [0, C) and subset_index values outside [0, S) cannot raise here (that would
// read device data on the host): the rows or problems they touch get a NaN loss and gradient.
#pragma once

#include "device.cuh"

#include <cstdint>
#include <limits>

namespace mmkernels::cuda {

constexpr int kSoftmaxThreads = 256;  // 8 warps
constexpr int kSoftmaxCols = 32;      // columns of Z per shared-memory stage

struct SoftmaxParams {
  const void* z;
  int64_t z_ss, z_ld;
  const int64_t* y;
  const void* w;  // [K, H, C] acc
  const void* b;  // [K, C] acc
  const void* sw;  // [n] acc or null
  const int64_t* subset_index;
  int64_t S, n, H, K, C;
  double l2;
  int32_t rows;     // BM: rows per tile (a power of two, 1..32)
  int32_t nsplit;   // row chunks per problem
  int64_t chunk;    // rows per chunk (a multiple of BM)
  int64_t part;     // elements of one chunk's partial sums: H*C + C + 1
  void* ws;         // [K, nsplit, part] acc
  void* loss;       // [K] acc
  void* grad_w;     // [K, H, C] acc
  void* grad_b;     // [K, C] acc
};

// Bytes of shared memory of softmax_partial_kernel: Z's stage [BM][32], the logits / their
// gradient [BM][C], the rows' losses [BM].
template <typename Acc>
MMK_HOST_DEVICE int64_t softmax_smem_bytes(int64_t rows, int64_t C) {
  return (rows * kSoftmaxCols + rows * C + rows) * (int64_t)sizeof(Acc);
}

// Butterfly reductions over the 32 lanes of a warp: every lane ends with the same value (each
// step adds or compares the same two operands in both partner lanes).
template <typename T>
MMK_DEVICE T warp_sum(T v) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// The max that propagates NaN (a NaN in Z must reach the loss, where the solver detects it).
template <typename T>
MMK_DEVICE T nan_max(T a, T b) {
  return (a != a || b > a) ? b : (b != b ? b : a);
}

template <typename T>
MMK_DEVICE T warp_max(T v) {
  for (int off = 16; off > 0; off /= 2) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Stages columns [h0, h0 + 32) of the tile's rows of Z_s (converted to Acc; 0 outside).
template <typename Elem, typename Acc>
MMK_DEVICE void softmax_stage_z(const SoftmaxParams& p, const Elem* zs, int64_t r0,
                                int64_t r_end, int64_t h0, Acc* zt) {
  for (int e = (int)threadIdx.x; e < p.rows * kSoftmaxCols; e += kSoftmaxThreads) {
    const int r = e / kSoftmaxCols, h = e % kSoftmaxCols;
    const int64_t row = r0 + r, col = h0 + h;
    sstore(&zt[e], row < r_end && col < p.H ? to_acc(zs[row * p.z_ld + col]) : Acc(0));
  }
}

template <typename Elem, typename Acc>
__global__ void __launch_bounds__(kSoftmaxThreads, 1)
softmax_partial_kernel(SoftmaxParams p) {
  MMK_DYNAMIC_SMEM(smem);
  // Tile-local indices are 32-bit (a tile holds at most 32 x C elements, C below the shared
  // memory's limit): 64-bit division by a run-time C would call a subroutine (a stack frame).
  const int BM = p.rows, C = (int)p.C;
  const int64_t H = p.H;
  Acc* zt = reinterpret_cast<Acc*>(smem);  // [BM][32]
  Acc* lg = zt + BM * kSoftmaxCols;        // [BM][C]: logits, then their gradient
  Acc* rl = lg + BM * C;                   // [BM]: the rows' losses
  const int k = (int)(blockIdx.x / p.nsplit), split = (int)(blockIdx.x % p.nsplit);
  const int64_t s = p.subset_index ? p.subset_index[k] : k;
  const bool bad_subset = s < 0 || s >= p.S;
  const Elem* zs = static_cast<const Elem*>(p.z) + (bad_subset ? 0 : s) * p.z_ss;
  const Acc* wk = static_cast<const Acc*>(p.w) + k * H * C;
  const Acc* bk = static_cast<const Acc*>(p.b) + k * C;
  const Acc* sw = static_cast<const Acc*>(p.sw);
  Acc* part = static_cast<Acc*>(p.ws) + (k * p.nsplit + split) * p.part;
  const int64_t r_begin = split * p.chunk;
  const int64_t r_end = r_begin + p.chunk < p.n ? r_begin + p.chunk : p.n;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const Acc nan = std::numeric_limits<Acc>::quiet_NaN();
  // The chunk's partial sums start at zero (an empty chunk leaves zeros).
  for (int64_t e = threadIdx.x; e < p.part; e += kSoftmaxThreads) part[e] = bad_subset ? nan : Acc(0);
  __syncthreads();
  for (int64_t r0 = r_begin; r0 < r_end; r0 += BM) {
    // 1. logits: lg[r][c] = b[c] + sum_h z[r][h] W[h][c], each element owned by one thread.
    for (int e = (int)threadIdx.x; e < BM * C; e += kSoftmaxThreads) sstore(&lg[e], bk[e % C]);
    __syncthreads();  // with H = 0 the logits are the bias, read by other threads below
    for (int64_t h0 = 0; h0 < H; h0 += kSoftmaxCols) {
      softmax_stage_z<Elem, Acc>(p, zs, r0, r_end, h0, zt);
      __syncthreads();
      const int hn = H - h0 < kSoftmaxCols ? (int)(H - h0) : kSoftmaxCols;
      for (int e = (int)threadIdx.x; e < BM * C; e += kSoftmaxThreads) {
        const int r = e / C, c = e % C;
        Acc v = sload(&lg[e]);
        for (int h = 0; h < hn; ++h)
          v = mmk_fma(sload(&zt[r * kSoftmaxCols + h]), wk[(h0 + h) * C + c], v);
        sstore(&lg[e], v);
      }
      __syncthreads();
    }
    // 2. per row (one warp): softmax, loss, and d = sw (p - onehot(y)) over the logits.
    for (int r = warp; r < BM; r += kSoftmaxThreads / 32) {
      const int64_t row = r0 + r;
      Acc* lr = lg + r * C;
      if (row >= r_end) {
        for (int c = lane; c < C; c += 32) sstore(&lr[c], Acc(0));
        if (lane == 0) sstore(&rl[r], Acc(0));
        continue;
      }
      const int64_t label = p.y[row];
      const bool bad_label = label < 0 || label >= C;
      Acc m = -std::numeric_limits<Acc>::infinity(), picked = Acc(0);
      for (int c = lane; c < C; c += 32) {
        const Acc v = sload(&lr[c]);
        m = nan_max(m, v);
        if (c == label) picked = v;
      }
      m = warp_max(m);
      picked = warp_sum(picked);  // one lane holds the label's logit, the others 0
      Acc sum = Acc(0);
      for (int c = lane; c < C; c += 32) sum += mmk_exp(sload(&lr[c]) - m);
      sum = warp_sum(sum);
      const Acc wi = sw ? sw[row] : Acc(1), inv = mmk_rcp(sum);
      for (int c = lane; c < C; c += 32) {
        const Acc prob = mmk_exp(sload(&lr[c]) - m) * inv;
        const Acc d = wi * (prob - (c == label ? Acc(1) : Acc(0)));
        sstore(&lr[c], bad_label ? nan : d);
      }
      if (lane == 0) sstore(&rl[r], bad_label ? nan : wi * (m + mmk_log(sum) - picked));
    }
    __syncthreads();
    // 3. grad_W += Z^T d over the tile's rows (in row order), grad_b += sum d, loss.
    for (int64_t h0 = 0; h0 < H; h0 += kSoftmaxCols) {
      softmax_stage_z<Elem, Acc>(p, zs, r0, r_end, h0, zt);
      __syncthreads();
      const int hn = H - h0 < kSoftmaxCols ? (int)(H - h0) : kSoftmaxCols;
      for (int e = (int)threadIdx.x; e < hn * C; e += kSoftmaxThreads) {
        const int h = e / C, c = e % C;
        Acc v = Acc(0);
        for (int r = 0; r < BM; ++r)
          v = mmk_fma(sload(&zt[r * kSoftmaxCols + h]), sload(&lg[r * C + c]), v);
        part[(h0 + h) * C + c] += v;
      }
      __syncthreads();
    }
    for (int c = (int)threadIdx.x; c < C; c += kSoftmaxThreads) {
      Acc v = Acc(0);
      for (int r = 0; r < BM; ++r) v += sload(&lg[r * C + c]);
      part[H * C + c] += v;
    }
    if (threadIdx.x == 0) {
      Acc v = Acc(0);
      for (int r = 0; r < BM; ++r) v += sload(&rl[r]);
      part[H * C + C] += v;
    }
    __syncthreads();  // lg and rl are rewritten by the next tile
  }
}

// One thread per output element: the chunks in chunk order, plus the penalty l2 W and
// l2/2 ||W_k||^2 (the latter summed over W_k in order by the loss's thread).
template <typename Acc>
__global__ void softmax_reduce_kernel(SoftmaxParams p) {
  const int64_t HC = p.H * p.C, total = p.K * p.part;
  const Acc l2 = static_cast<Acc>(p.l2);
  const Acc* ws = static_cast<const Acc*>(p.ws);
  const Acc* w = static_cast<const Acc*>(p.w);
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t k = e / p.part, j = e % p.part;
    Acc v = Acc(0);
    const Acc* src = ws + k * p.nsplit * p.part + j;
    for (int32_t c = 0; c < p.nsplit; ++c) v += src[c * p.part];
    const Acc* wk = w + k * HC;
    if (j < HC) {
      static_cast<Acc*>(p.grad_w)[k * HC + j] = mmk_fma(l2, wk[j], v);
    } else if (j < HC + p.C) {
      static_cast<Acc*>(p.grad_b)[k * p.C + (j - HC)] = v;
    } else {
      Acc sq = Acc(0);
      for (int64_t i = 0; i < HC; ++i) sq = mmk_fma(wk[i], wk[i], sq);
      static_cast<Acc*>(p.loss)[k] = mmk_fma(Acc(0.5) * l2, sq, v);
    }
  }
}

}  // namespace mmkernels::cuda
