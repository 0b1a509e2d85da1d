// From GramProblem / SoftmaxProblem / LbfgsProblem (heads_params.h) to kernel launches: the
// batch split, the parameter blocks, the element-type dispatch. Compiled by nvcc in
// heads_kernels.cu and as host C++ in the emulator's driver (csrc/emulator/driver.cpp), so the
// emulated tests run this code too.
#pragma once

#include "gram.cuh"
#include "heads_params.h"
#include "launch.cuh"
#include "lbfgs.cuh"
#include "softmax_regression.cuh"

#include <algorithm>
#include <stdexcept>

namespace mmkernels::cuda {

namespace heads_detail {
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int kReduceBlockThreads = 256;
inline int64_t reduce_blocks(int64_t elems) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(elems, kReduceBlockThreads), 4096));
}
}  // namespace heads_detail

// ---- gram --------------------------------------------------------------------------------------

inline GramParams gram_params(const GramProblem& f) {
  using heads_detail::ceil_div;
  GramParams p{};
  p.z = f.z;
  p.z_ss = f.z_ss;
  p.z_ld = f.z_ld;
  p.y = f.y;
  p.S = f.S;
  p.n = f.n;
  p.H = f.H;
  p.T = f.T;
  p.H1 = f.H + 1;
  p.W = f.H + 1 + f.T;
  p.row_tiles = (int32_t)ceil_div(p.H1, kGramTile);
  p.col_tiles = (int32_t)ceil_div(p.W, kGramTile);
  // Pairs (ti, tj) with ti <= tj: every column tile for each row tile, minus those below.
  p.pairs = p.row_tiles * p.col_tiles - p.row_tiles * (p.row_tiles - 1) / 2;
  // Split the rows so that about two blocks per multiprocessor run, chunks of >= 256 rows.
  const int64_t base = std::max<int64_t>(1, f.S * p.pairs);
  int64_t ns = ceil_div(2 * (int64_t)std::max(1, f.num_sms), base);
  ns = std::max<int64_t>(1, std::min<int64_t>({ns, ceil_div(f.n, 256), 64}));
  p.chunk = std::max<int64_t>(kGramRows, ceil_div(ceil_div(f.n, ns), kGramRows) * kGramRows);
  p.nsplit = (int32_t)std::max<int64_t>(1, ceil_div(f.n, p.chunk));
  p.ws = f.workspace;
  p.G = f.G;
  p.R = f.R;
  return p;
}

inline int64_t gram_workspace_elems(const GramProblem& f) {
  const GramParams p = gram_params(f);
  return (int64_t)p.nsplit * p.S * p.H1 * p.W;
}

template <typename Elem, typename Acc>
void launch_gram_as(const GramProblem& f, void* stream) {
  const GramParams p = gram_params(f);
  if (p.S == 0) return;
  const int64_t blocks = (int64_t)p.nsplit * p.S * p.pairs;
  const size_t smem = 2 * kGramRows * kGramTile * sizeof(Acc);
  MMK_LAUNCH((gram_partial_kernel<Elem, Acc>), blocks, kGramThreads, smem, stream, p);
  const int64_t elems = p.S * p.H1 * (p.H1 + p.T);
  MMK_LAUNCH(gram_reduce_kernel<Acc>, heads_detail::reduce_blocks(elems),
             heads_detail::kReduceBlockThreads, 0, stream, p);
}

inline void launch_gram(const GramProblem& f, void* stream) {
  switch ((DType)f.dtype) {
    case DType::f32: launch_gram_as<float, float>(f, stream); break;
    case DType::bf16: launch_gram_as<bf16, float>(f, stream); break;
    case DType::f64: launch_gram_as<double, double>(f, stream); break;
    default: throw std::invalid_argument("mmkernels::gram: z must be float32, float64 or bfloat16");
  }
}

// ---- softmax_regression_loss_grad ----------------------------------------------------------------

constexpr int64_t kSoftmaxSmemLimit = 48 * 1024;  // without opting in to more per block

// Rows per tile: 32, or fewer where the logits of 32 rows would not fit; 0 when even one row's
// do not (C too large for this kernel).
template <typename Acc>
int32_t softmax_rows(int64_t C) {
  for (int32_t rows = 32; rows >= 1; rows /= 2)
    if (softmax_smem_bytes<Acc>(rows, C) <= kSoftmaxSmemLimit) return rows;
  return 0;
}

inline int64_t softmax_max_classes(DType acc) {
  const int64_t a = acc == DType::f64 ? 8 : 4;
  return kSoftmaxSmemLimit / a - kSoftmaxCols - 1;
}

inline SoftmaxParams softmax_params(const SoftmaxProblem& f) {
  using heads_detail::ceil_div;
  SoftmaxParams p{};
  p.z = f.z;
  p.z_ss = f.z_ss;
  p.z_ld = f.z_ld;
  p.y = f.y;
  p.w = f.w;
  p.b = f.b;
  p.sw = f.sw;
  p.subset_index = f.subset_index;
  p.S = f.S;
  p.n = f.n;
  p.H = f.H;
  p.K = f.K;
  p.C = f.C;
  p.l2 = f.l2;
  p.rows = (DType)f.acc == DType::f64 ? softmax_rows<double>(f.C) : softmax_rows<float>(f.C);
  if (p.rows == 0)
    throw std::invalid_argument("mmkernels::softmax_regression_loss_grad: C = " +
                                std::to_string(f.C) + " classes is more than the CUDA kernel's " +
                                std::to_string(softmax_max_classes((DType)f.acc)));
  // About four blocks per multiprocessor over all problems, chunks of >= 4 tiles.
  int64_t ns = ceil_div(4 * (int64_t)std::max(1, f.num_sms), std::max<int64_t>(1, f.K));
  ns = std::max<int64_t>(1, std::min<int64_t>({ns, ceil_div(f.n, 4 * (int64_t)p.rows), 256}));
  p.chunk = std::max<int64_t>(p.rows, ceil_div(ceil_div(f.n, ns), p.rows) * p.rows);
  p.nsplit = (int32_t)std::max<int64_t>(1, ceil_div(f.n, p.chunk));
  p.part = f.H * f.C + f.C + 1;
  p.ws = f.workspace;
  p.loss = f.loss;
  p.grad_w = f.grad_w;
  p.grad_b = f.grad_b;
  return p;
}

inline int64_t softmax_workspace_elems(const SoftmaxProblem& f) {
  const SoftmaxParams p = softmax_params(f);
  return p.K * p.nsplit * p.part;
}

template <typename Elem, typename Acc>
void launch_softmax_as(const SoftmaxProblem& f, void* stream) {
  const SoftmaxParams p = softmax_params(f);
  if (p.K == 0) return;
  const size_t smem = (size_t)softmax_smem_bytes<Acc>(p.rows, p.C);
  MMK_LAUNCH((softmax_partial_kernel<Elem, Acc>), p.K * p.nsplit, kSoftmaxThreads, smem, stream,
             p);
  MMK_LAUNCH(softmax_reduce_kernel<Acc>, heads_detail::reduce_blocks(p.K * p.part),
             heads_detail::kReduceBlockThreads, 0, stream, p);
}

// z's element type must match the compute dtype (bfloat16 z with a float32 compute dtype
// is converted as it is loaded; the op converts other mixes before the call).
inline void launch_softmax(const SoftmaxProblem& f, void* stream) {
  const DType z = (DType)f.dtype, acc = (DType)f.acc;
  if (acc == DType::f32 && z == DType::f32) launch_softmax_as<float, float>(f, stream);
  else if (acc == DType::f32 && z == DType::bf16) launch_softmax_as<bf16, float>(f, stream);
  else if (acc == DType::f64 && z == DType::f64) launch_softmax_as<double, double>(f, stream);
  else
    throw std::invalid_argument(
        "mmkernels::softmax_regression_loss_grad: the CUDA kernel takes z in the compute dtype "
        "(or bfloat16 z with float32 w)");
}

// ---- lbfgs_direction -----------------------------------------------------------------------------

// The alphas cross launches only when the history spans more than one launch.
inline int64_t lbfgs_workspace_elems(const LbfgsProblem& f) {
  return f.m > kLbfgsPairs ? f.m * f.k : 0;
}

// The launch of pairs [first, first + kLbfgsPairs) (fewer at the oldest end) in `stage`.
template <typename T>
void launch_lbfgs_stage(const LbfgsProblem& f, int32_t stage, int64_t first, void* stream) {
  LbfgsParams p{};
  p.k = f.k;
  p.P = f.P;
  // The very first launch reads grad; every later one continues from the output.
  p.src = stage != kLbfgsBackward && first == 0 ? f.grad : f.out;
  p.out = f.out;
  p.gamma = f.gamma;
  p.diag = f.diag;
  p.alpha = f.workspace;
  p.stage = stage;
  p.pairs = (int32_t)std::min<int64_t>(kLbfgsPairs, f.m - first);
  p.first = first;
  p.rows = f.rows;
  for (int32_t t = 0; t < p.pairs; ++t) {
    p.s[t] = f.s[first + t];
    p.y[t] = f.y[first + t];
    p.rho[t] = f.rho[first + t];
    p.n[t] = f.rows ? f.rows_n[first + t] : f.k;
  }
  // As many blocks as can be resident (blocks loop over the rows beyond the grid).
  const int64_t blocks =
      std::min<int64_t>(f.k, (int64_t)kLbfgsBlocksPerSm * std::max(1, f.num_sms));
  MMK_LAUNCH(lbfgs_kernel<T>, blocks, lbfgs_threads(f.P), (size_t)lbfgs_smem_bytes<T>(), stream,
             p);
}

template <typename T>
void launch_lbfgs_as(const LbfgsProblem& f, void* stream) {
  if (f.k == 0 || f.P == 0) return;
  // The oldest chunk's first pair: its launch turns from the first loop to the second.
  const int64_t turn = f.m == 0 ? 0 : (f.m - 1) / kLbfgsPairs * kLbfgsPairs;
  for (int64_t first = 0; first < turn; first += kLbfgsPairs)
    launch_lbfgs_stage<T>(f, kLbfgsForward, first, stream);
  launch_lbfgs_stage<T>(f, kLbfgsTurn, turn, stream);
  for (int64_t first = turn - kLbfgsPairs; first >= 0; first -= kLbfgsPairs)
    launch_lbfgs_stage<T>(f, kLbfgsBackward, first, stream);
}

inline void launch_lbfgs(const LbfgsProblem& f, void* stream) {
  switch ((DType)f.dtype) {
    case DType::f32: launch_lbfgs_as<float>(f, stream); break;
    case DType::f64: launch_lbfgs_as<double>(f, stream); break;
    default:
      throw std::invalid_argument("mmkernels::lbfgs_direction: grad must be float32 or float64");
  }
}

}  // namespace mmkernels::cuda
