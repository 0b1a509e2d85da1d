// What the fused CUDA kernels are told, as plain C++ (no torch, no CUDA header): the op-level
// description a backend fills from its tensors (FusedProblem), and the per-launch parameter
// blocks the kernels receive by value. csrc/cuda/fused_launch.cuh turns one into the others;
// the host emulator's driver (csrc/emulator/driver.cpp) fills FusedProblem from Python.
//
// Nothing here is read back from the device: subset and sample masks stay device pointers
// that the kernels read themselves, so no op call synchronises with the host.
#pragma once

#include <cstdint>

namespace mmkernels::cuda {

constexpr int kMaxModalities = 16;

enum class DType : int32_t { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

// Both ops, forward and backward. Pointers are device pointers (host pointers under the
// emulator). Every tensor has unit stride along its last dim; row strides are given.
struct FusedProblem {
  int32_t late = 0;         // 0: concat_project, 1: project_concat
  int32_t dtype = 0;        // DType
  int32_t allow_tf32 = 0;   // float32 on tensor cores (torch's matmul precision allows it)
  int32_t relu = 1;
  int32_t K = 0;
  int32_t has_subsets = 0;  // a subset_mask [S, K] was given: outputs carry a leading S dim
  int32_t per_subset = 0;   // weights (and biases) carry a leading S dim
  int32_t has_bias = 0;
  int64_t B = 0, S = 1;
  int64_t dims[kMaxModalities] = {};
  int64_t widths[kMaxModalities] = {};  // H (concat, every k) or H_k
  const void* x[kMaxModalities] = {};
  int64_t ldx[kMaxModalities] = {};
  // concat: weight[0] is [S?, H, D], contiguous; project: weight[k] is [S?, H_k, d_k], contiguous.
  const void* weight[kMaxModalities] = {};
  const void* bias[kMaxModalities] = {};  // concat: bias[0] [S?, H]; project: bias[k] [S?, H_k]
  const uint8_t* subset_mask = nullptr;   // [S, K] bool, contiguous, or null
  const uint8_t* sample_mask = nullptr;   // [B, K] bool, contiguous, or null
  // Forward output, or (backward) out and grad_out: [S?, B, W] contiguous, W = H or sum H_k.
  void* out = nullptr;
  const void* grad_out = nullptr;
  // Backward results (null: not wanted), contiguous, in the input dtype.
  void* grad_x[kMaxModalities] = {};
  void* grad_weight[kMaxModalities] = {};  // shaped like weight[k] (concat: [0] only)
  void* grad_bias[kMaxModalities] = {};    // shaped like bias[k] (concat: [0] only)
  // Backward workspace (float32, or float64 for float64): backward_workspace_elems() of it.
  void* workspace = nullptr;
  int32_t num_sms = 132;  // multiprocessors of the device: sizes the batch split
};

// Forward launch parameters.
struct ForwardParams {
  int32_t K, late, relu, has_subsets, per_subset, emit_all, item_subsets;
  int32_t n_groups;     // grid groups per row tile: subsets enumerated by the grid, or 1
  int32_t n_coltiles;   // column tiles of one group (all column groups together)
  int32_t n_colgroups;  // 1 (concat) or K (project: one per modality)
  int64_t B, S;
  int32_t col_tile_start[kMaxModalities + 1];  // first column tile of each column group
  int32_t width[kMaxModalities];               // columns of each column group
  int64_t col_off[kMaxModalities];             // first output column of each column group
  int32_t dims[kMaxModalities];
  const void* x[kMaxModalities];
  int64_t ldx[kMaxModalities];
  int32_t vec_x[kMaxModalities];
  const void* w[kMaxModalities];  // modality k's weight block: concat weight + o_k, project weight[k]
  int64_t ldw[kMaxModalities];    // row stride: D (concat) or d_k
  int64_t w_step[kMaxModalities]; // per-subset stride, 0 when shared
  int32_t vec_w[kMaxModalities];
  const void* bias[kMaxModalities];  // per column group; null: none
  int64_t bias_step[kMaxModalities];
  const uint8_t* subset_mask;
  const uint8_t* sample_mask;
  void* out;
  int64_t out_ld, out_step;  // row width; elements per subset
};

// Backward launch parameters (the three kernels of fused_backward.cuh and the reduction).
// dZ[s, b, c] = act'(out[s, b, c]) * grad_out[s, b, c]; modality k's columns of dZ are
// [dz_off[k], dz_off[k] + width[k]).
struct BackwardParams {
  int32_t K, late, relu, has_subsets, per_subset;
  int64_t B, S;
  int32_t dims[kMaxModalities], width[kMaxModalities];
  int64_t dz_off[kMaxModalities];
  const void* out;
  const void* grad_out;
  int64_t out_ld, out_step;
  const void* x[kMaxModalities];
  int64_t ldx[kMaxModalities];
  int32_t vec_x[kMaxModalities];
  const void* w[kMaxModalities];  // as ForwardParams
  int64_t ldw[kMaxModalities], w_step[kMaxModalities];
  int32_t vec_w[kMaxModalities];
  const uint8_t* subset_mask;
  const uint8_t* sample_mask;
  // grad_x: column tiles of every modality, flattened.
  void* gx[kMaxModalities];
  int32_t gx_tile_start[kMaxModalities + 1];
  // Partial sums over batch chunks, reduced in split order. Workspace: the grad_W partials
  // [nsplit][split_elems], then the grad_b partials [nsplit_b][b_split_elems] from b_base.
  void* ws;
  int64_t split_elems, chunk, b_base, b_split_elems, chunk_b;
  int32_t nsplit, nsplit_b;
  // grad_W partials: weight groups (S per subset, else 1) x tiles of every modality.
  int32_t n_wgroups, gw_tile_start[kMaxModalities + 1];
  int32_t want_w, want_b;
  int64_t gw_off[kMaxModalities], gw_ld[kMaxModalities], gw_group_step[kMaxModalities];
  // grad_b partials: bias groups x (one thread per column of dZ).
  int32_t n_bgroups;
  int64_t gb_off[kMaxModalities], gb_group_step[kMaxModalities];
};

// The fixed-order reduction of the partials into the gradients. Segment i: its gradient
// (seg_len elements, contiguous) is the sum over seg_nsplit partials, partial s at
// ws + seg_src[i] + s * seg_stride[i]; the segments' elements are enumerated one after another.
struct ReduceParams {
  int32_t nseg;
  const void* ws;
  int64_t total;  // sum of seg_len
  int64_t seg_src[2 * kMaxModalities], seg_len[2 * kMaxModalities], seg_stride[2 * kMaxModalities];
  int32_t seg_nsplit[2 * kMaxModalities];
  void* seg_dst[2 * kMaxModalities];
};

}  // namespace mmkernels::cuda
