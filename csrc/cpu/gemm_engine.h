// The CPU engine behind both fused ops.
//
// Forward: per modality k, one GEMM T_k = x_k @ stack_k^T over all rows and all of k's weight
// blocks (MKL runs it on every core), skipped when no subset uses k or no sample has k. Then
// one parallel pass (the op's epilogue) combines the T_k with the masks, the bias and the
// activation and writes the output: no [B, D] concatenation and no masked copy of any input.
// Backward mirrors it: one pass (the op's builder) turns grad_out into R_k, the gradient
// w.r.t. T_k, and the bias gradient; then grad_x_k = R_k @ stack_k, grad_stack_k = R_k^T @ x_k.
//
// Row ranges are split into a fixed number of tasks, each reducing the bias gradient into its
// own partial, and partials are added in task order: results do not depend on scheduling.
#pragma once
#include <mmkernels/fusion_plan.h>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <array>
#include <vector>

namespace mmkernels::cpu {

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Modality k as a GEMM operand: its rows, and its weight blocks stacked as [ncols, d_k].
struct Operand {
  at::Tensor x;         // [B, d_k], input dtype, contiguous
  at::Tensor w;         // [ncols, d_k], accumulation dtype, unit stride along d_k
  bool active = false;  // some subset uses this modality
  int64_t ncols() const { return active ? w.size(0) : 0; }
};

// The sample mask as a host pointer ([B, K], row-major), or null when every sample is complete.
inline const bool* mask_ptr(const c10::optional<at::Tensor>& m, at::Tensor& holder) {
  if (!m.has_value()) return nullptr;
  holder = m->contiguous();
  return holder.data_ptr<bool>();
}

template <typename acc_t>
struct RowView {
  int64_t r0, rows;             // rows [r0, r0 + rows)
  std::vector<acc_t*> T;        // per modality: row r0 of T_k (forward) or R_k (backward)
  std::vector<int64_t> ld;      // row stride of T_k / R_k
  const uint8_t* live;          // per modality: T_k / R_k exists
};

// Modality k has at least one sample and one subset using it.
inline std::vector<uint8_t> live_modalities(const FusionPlan& p, const std::vector<Operand>& ops,
                                            const c10::optional<at::Tensor>& sample_mask) {
  std::vector<uint8_t> live(p.K, 0);
  at::Tensor any_present;
  if (sample_mask.has_value() && p.B > 0) any_present = sample_mask->any(0).contiguous();
  for (int64_t k = 0; k < p.K; ++k)
    live[k] = ops[k].active && (!any_present.defined() || any_present[k].item<bool>());
  return live;
}

// x_k in the accumulation dtype (the tensor itself when no conversion is needed).
inline at::Tensor acc_input(const Operand& op) { return op.x.to(op.w.scalar_type()); }

inline int64_t num_tasks(int64_t B) {
  constexpr int64_t kMinRows = 64;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / kMinRows));
}

template <typename acc_t, typename Fn>
void for_each_task(int64_t B, int64_t tasks, Fn&& fn) {
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(t, t * B / tasks, (t + 1) * B / tasks);
  });
}

template <typename acc_t>
RowView<acc_t> row_view(const std::vector<at::Tensor>& T, const std::vector<uint8_t>& live,
                        int64_t r0, int64_t r1) {
  RowView<acc_t> v{r0, r1 - r0, std::vector<acc_t*>(T.size(), nullptr),
                   std::vector<int64_t>(T.size(), 0), live.data()};
  for (size_t k = 0; k < T.size(); ++k)
    if (live[k]) {
      v.ld[k] = T[k].size(1);
      v.T[k] = T[k].data_ptr<acc_t>() + r0 * v.ld[k];
    }
  return v;
}

// Computes the T_k, then runs `epilogue(const RowView&)` over row ranges in parallel.
template <typename acc_t, typename Epilogue>
void forward_gemms(const FusionPlan& p, const std::vector<Operand>& ops,
                   const c10::optional<at::Tensor>& sample_mask, Epilogue&& epilogue) {
  const auto live = live_modalities(p, ops, sample_mask);
  std::vector<at::Tensor> T(p.K);
  for (int64_t k = 0; k < p.K; ++k)
    if (live[k]) T[k] = at::mm(acc_input(ops[k]), ops[k].w.t());
  for_each_task<acc_t>(p.B, num_tasks(p.B), [&](int64_t, int64_t r0, int64_t r1) {
    epilogue(row_view<acc_t>(T, live, r0, r1));
  });
}

struct BackwardResult {
  std::vector<at::Tensor> grad_x;      // [B, d_k] in the input dtype (empty when not needed)
  std::vector<at::Tensor> grad_stack;  // [ncols_k, d_k] in the accumulation dtype
  at::Tensor grad_bias;                // [nbias] in the accumulation dtype
};

// `builder(const RowView&, acc_t* grad_bias_partial)` adds the R_k of its rows into the
// zeroed view and its bias gradient into the task's partial; then the GEMMs run.
template <typename acc_t, typename Builder>
BackwardResult backward_gemms(const FusionPlan& p, const std::vector<Operand>& ops,
                              const c10::optional<at::Tensor>& sample_mask, bool need_x,
                              bool need_w, int64_t nbias, Builder&& builder) {
  const auto live = live_modalities(p, ops, sample_mask);
  const auto acc_opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  std::vector<at::Tensor> R(p.K);
  for (int64_t k = 0; k < p.K; ++k)
    if (live[k]) R[k] = at::empty({p.B, ops[k].ncols()}, acc_opts);
  const int64_t tasks = num_tasks(p.B);
  at::Tensor part_b = at::zeros({tasks, nbias}, acc_opts);
  for_each_task<acc_t>(p.B, tasks, [&](int64_t t, int64_t r0, int64_t r1) {
    for (int64_t k = 0; k < p.K; ++k)
      if (live[k]) R[k].narrow(0, r0, r1 - r0).zero_();
    builder(row_view<acc_t>(R, live, r0, r1), part_b[t].data_ptr<acc_t>());
  });

  BackwardResult res;
  for (int64_t k = 0; k < p.K; ++k) {
    const auto& op = ops[k];
    if (need_x) {
      res.grad_x.push_back(live[k] ? at::mm(R[k], op.w).to(op.x.scalar_type())
                                   : at::zeros_like(op.x));
    }
    res.grad_stack.push_back(need_w && live[k] ? at::mm(R[k].t(), acc_input(op))
                                               : at::zeros({op.ncols(), p.dims[k]}, acc_opts));
  }
  res.grad_bias = part_b.sum(0);  // fixed reduction order over tasks
  return res;
}

}  // namespace mmkernels::cpu
