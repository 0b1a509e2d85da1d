// What the head-refit kernels (csrc/cuda/gram.cuh, softmax_regression.cuh, lbfgs.cuh) are
// told, as plain C++ (no torch, no CUDA header): filled from CUDA tensors by
// csrc/cuda/heads_cuda.cpp and from host tensors by the emulator's driver
// (csrc/emulator/driver.cpp), then passed by value.
//
// Accumulation follows csrc/include/mmkernels/accumulation.h: "acc" is float64 for float64
// inputs and float32 otherwise. Nothing here is read back on the host: no op call
// synchronises with the device.
#pragma once

#include "fused_params.h"

#include <cstdint>

namespace mmkernels::cuda {

// mmkernels::gram: G[s] = [Z_s 1]^T [Z_s 1] ([S, H+1, H+1]) and R[s] = [Z_s 1]^T Y ([S, H+1, T]).
struct GramProblem {
  int32_t dtype = 0;          // DType of z: f32, f64 or bf16 (acc: f64 for f64, else f32)
  int64_t S = 0, n = 0, H = 0, T = 1;
  const void* z = nullptr;    // [S, n, H], unit stride along H
  int64_t z_ss = 0, z_ld = 0;  // strides (elements) of dims 0 and 1
  const void* y = nullptr;    // [n, T] in acc, contiguous
  void* G = nullptr;          // [S, H+1, H+1] acc, contiguous
  void* R = nullptr;          // [S, H+1, T] acc, contiguous
  void* workspace = nullptr;  // gram_workspace_elems() acc elements
  int32_t num_sms = 1;        // sizes the batch split (results depend on it, not on timing)
};

// mmkernels::softmax_regression_loss_grad: for k < K (subset s = subset_index[k], or k),
// loss[k] = sum_i sw_i CE(z_si W_k + b_k, y_i) + l2/2 ||W_k||^2, grad_w [K, H, C], grad_b [K, C].
// Compute (and accumulation) dtype: w's, f32 or f64. z is f32 or bf16 (acc f32) or f64 (f64).
struct SoftmaxProblem {
  int32_t dtype = 0;          // DType of z
  int32_t acc = 0;            // DType of w, b, sw and the outputs: f32 or f64
  int64_t S = 0, n = 0, H = 0, K = 0, C = 0;
  const void* z = nullptr;    // [S, n, H], unit stride along H
  int64_t z_ss = 0, z_ld = 0;
  const int64_t* y = nullptr;             // [n] labels in [0, C)
  const void* w = nullptr;                // [K, H, C] acc, contiguous
  const void* b = nullptr;                // [K, C] acc, contiguous
  const void* sw = nullptr;               // [n] acc, or null (weight 1)
  const int64_t* subset_index = nullptr;  // [K] subsets of z in [0, S), or null
  double l2 = 0;
  void* loss = nullptr;       // [K] acc
  void* grad_w = nullptr;     // [K, H, C] acc, contiguous
  void* grad_b = nullptr;     // [K, C] acc
  void* workspace = nullptr;  // softmax_workspace_elems() acc elements
  int32_t num_sms = 1;
};

// mmkernels::lbfgs_direction: d[i] = -H_i grad[i] for each of k problems, the two-loop
// recursion over m pairs (newest first). Every tensor contiguous, in dtype (f32 or f64, also
// the accumulation dtype). s, y and rho are host arrays of m device pointers each; pair j of
// problem i is row rows[j][i] of them (row i without rows).
struct LbfgsProblem {
  int32_t dtype = 0;                  // DType of every tensor
  int64_t k = 0, P = 0, m = 0;
  const void* grad = nullptr;         // [k, P]
  const void* const* s = nullptr;     // m pointers to [k, P]
  const void* const* y = nullptr;     // m pointers to [k, P]
  const void* const* rho = nullptr;   // m pointers to [k]
  const void* gamma = nullptr;        // [k]
  const void* diag = nullptr;         // [k, P], or null (the identity)
  void* out = nullptr;                // [k, P]
  void* workspace = nullptr;          // lbfgs_workspace_elems() elements
  int32_t num_sms = 1;                // bounds the grid (the rows beyond it are looped over)
  const int64_t* rows = nullptr;      // [m, k] device: problem i's row of pair j; null: row i
  const int64_t* rows_n = nullptr;    // m host values: the rows of pair j (s[j] is [n_j, P])
};

}  // namespace mmkernels::cuda
