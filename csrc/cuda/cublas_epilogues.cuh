// Kernel bodies of the cuBLAS fallback (no torch header): the epilogues that turn the
// per-modality GEMM results T_k into the outputs of both ops, and the builder that turns
// grad_out into R_k, the gradient w.r.t. T_k. Each output element is written by exactly one
// thread and summed in a fixed order: no atomics, so the backward is deterministic.
#pragma once

#include <cstdint>

namespace mmkernels::cuda::cublas {

constexpr int kMaxModalities = 16;

// Per-modality view of the GEMM results (or of R_k in the backward).
template <typename acc_t>
struct ModalityTable {
  acc_t* data[kMaxModalities];     // [B, ld] row-major, null when the modality is not live
  int64_t ld[kMaxModalities];      // row stride: nblocks_k * width_k
  int64_t width[kMaxModalities];   // width of one block: H (concat) or H_k (project)
  int64_t offset[kMaxModalities];  // first output column of modality k (project), else 0
  int K;
};

// Subset membership, flattened: block_of[k * S + s] is subset s's block in modality k's stack,
// or -1 when s does not use k. Blocks of modality k are global blocks block_base[k] + j, and
// global block g collects the subsets member_subset[member_start[g] .. member_start[g + 1]).
struct SubsetTable {
  const int32_t* block_of;
  const int32_t* block_base;
  const int32_t* member_start;
  const int32_t* member_subset;
  int64_t S;
};

template <typename T>
__device__ __forceinline__ float to_acc(T v, float) { return static_cast<float>(v); }
template <typename T>
__device__ __forceinline__ double to_acc(T v, double) { return static_cast<double>(v); }

__device__ __forceinline__ bool is_present(const bool* sample_mask, int64_t b, int k, int K) {
  return sample_mask == nullptr || sample_mask[b * K + k];
}

// out[s, b, h] = act(bias_s[h] + sum_k present(s, b, k) * T_k[b, block(s, k) * H + h]).
template <typename scalar_t, typename acc_t>
__global__ void concat_forward_kernel(ModalityTable<acc_t> t, SubsetTable st,
                                      const bool* sample_mask, const acc_t* bias,
                                      int64_t bias_step, scalar_t* out, int64_t B, int64_t H,
                                      bool relu) {
  const int64_t n = st.S * B * H;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t h = i % H, b = (i / H) % B, s = i / (H * B);
    acc_t z = bias ? bias[s * bias_step + h] : acc_t(0);
    for (int k = 0; k < t.K; ++k) {
      const int32_t blk = st.block_of[k * st.S + s];
      if (blk < 0 || t.data[k] == nullptr || !is_present(sample_mask, b, k, t.K)) continue;
      z += t.data[k][b * t.ld[k] + blk * H + h];
    }
    out[i] = static_cast<scalar_t>(relu && z < acc_t(0) ? acc_t(0) : z);
  }
}

// out[s, b, offset_k + h] = present(s, b, k) * act(T_k[b, block(s, k) * H_k + h] + bias).
template <typename scalar_t, typename acc_t>
__global__ void project_forward_kernel(ModalityTable<acc_t> t, SubsetTable st,
                                       const bool* sample_mask, ModalityTable<acc_t> bias,
                                       scalar_t* out, int64_t B, int64_t width, bool relu) {
  const int64_t n = st.S * B * width;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t col = i % width, b = (i / width) % B, s = i / (width * B);
    int k = 0;
    while (k + 1 < t.K && col >= t.offset[k + 1]) ++k;
    const int64_t h = col - t.offset[k];
    const int32_t blk = st.block_of[k * st.S + s];
    acc_t v = acc_t(0);
    if (blk >= 0 && t.data[k] != nullptr && is_present(sample_mask, b, k, t.K)) {
      v = t.data[k][b * t.ld[k] + blk * t.width[k] + h];
      if (bias.data[k] != nullptr) v += bias.data[k][blk * t.width[k] + h];
      if (relu && v < acc_t(0)) v = acc_t(0);
    }
    out[i] = static_cast<scalar_t>(v);
  }
}

// R_k[b, j * width_k + h] = sum over the subsets s of block j of
//   present(b, k) * grad_out[s, b, offset_k + h] * act'(out[s, b, offset_k + h]),
// with grad_out / out rows of `row_width` elements. Serves both ops (concat: offset 0).
template <typename scalar_t, typename acc_t>
__global__ void build_grad_kernel(ModalityTable<acc_t> r, int k, SubsetTable st,
                                  const bool* sample_mask, const scalar_t* grad_out,
                                  const scalar_t* out, int64_t B, int64_t row_width, bool relu) {
  const int64_t ld = r.ld[k], width = r.width[k], n = B * ld;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t col = i % ld, b = i / ld;
    const int64_t j = col / width, h = col % width;
    acc_t acc = acc_t(0);
    if (is_present(sample_mask, b, k, r.K)) {
      const int32_t g = st.block_base[k] + static_cast<int32_t>(j);
      for (int32_t m = st.member_start[g]; m < st.member_start[g + 1]; ++m) {
        const int64_t e = (st.member_subset[m] * B + b) * row_width + r.offset[k] + h;
        if (!relu || to_acc(out[e], acc_t(0)) > acc_t(0)) acc += to_acc(grad_out[e], acc_t(0));
      }
    }
    r.data[k][i] = acc;
  }
}

}  // namespace mmkernels::cuda::cublas
