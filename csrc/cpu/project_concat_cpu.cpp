// project_concat on the CPU: cat_k( present * act(x_k @ W_k^T + b_k) ), per subset.
#include "gemm_engine.h"

#include <mmkernels/memory_budget.h>
#include <mmkernels/weight_stacks.h>

#include <torch/library.h>

namespace mmkernels::cpu {
namespace {

std::vector<Operand> project_operands(const FusionPlan& p, at::TensorList xs,
                                      at::TensorList weights, at::ScalarType acc) {
  std::vector<Operand> ops(p.K);
  for (int64_t k = 0; k < p.K; ++k) {
    ops[k].x = xs[k].contiguous();
    ops[k].active = p.modality_used(k);
    if (ops[k].active) ops[k].w = project_stack(p, weights[k], k).to(acc).contiguous();
  }
  return ops;
}

template <typename scalar_t>
at::Tensor forward_impl(const FusionPlan& p, at::TensorList xs, at::TensorList weights,
                        at::TensorList biases, const c10::optional<at::Tensor>& sample_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor out = at::empty(output_shape(p, false), xs[0].options());
  if (out.numel() == 0) return out;
  const int64_t B = p.B, width = output_width(p, false);
  const auto acc = accumulation_dtype(xs[0].scalar_type());
  const auto ops = project_operands(p, xs, weights, acc);
  std::vector<at::Tensor> bias_stacks(p.K);
  std::vector<const acc_t*> bptr(p.K, nullptr);
  for (int64_t k = 0; k < p.K; ++k)
    if (!biases.empty() && ops[k].active) {
      bias_stacks[k] = project_stack(p, biases[k], k).to(acc).contiguous();
      bptr[k] = bias_stacks[k].data_ptr<acc_t>();
    }
  scalar_t* optr = out.data_ptr<scalar_t>();

  // Subset by subset: each subset's rows of a band are one contiguous run of out.
  forward_gemms<scalar_t>(p, ops, sample_mask, [&](const RowView<acc_t>& v, int64_t r0, int64_t r1) {
    for (int64_t s = 0; s < p.S; ++s)
      for (int64_t b = r0; b < r1; ++b)
        for (int64_t k = 0; k < p.K; ++k) {
          const int64_t Hk = p.widths[k];
          scalar_t* o = optr + (s * B + b) * width + p.offsets[k];
          if (!p.used(s, k) || !v.present(k, b)) {
            std::fill(o, o + Hk, scalar_t(0));
            continue;
          }
          const int64_t blk = p.block_of[k][s];
          store_activated(o, v.row(k, b) + blk * Hk, bptr[k] ? bptr[k] + blk * Hk : nullptr, Hk,
                          p.relu);
        }
  });
  return out;
}

template <typename scalar_t>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> backward_impl(
    const FusionPlan& p, const at::Tensor& grad_out, const at::Tensor& out, at::TensorList xs,
    at::TensorList weights, const c10::optional<at::Tensor>& sample_mask,
    std::array<bool, 3> output_mask) {
  const auto acc = accumulation_dtype(xs[0].scalar_type());
  const auto ops = project_operands(p, xs, weights, acc);
  auto res = backward_gemms<scalar_t>(p, ops, sample_mask, grad_out, out, output_width(p, false),
                                      p.offsets, output_mask[0], output_mask[1],
                                      /*need_colsum=*/false, /*need_rowsum=*/output_mask[2]);
  std::vector<at::Tensor> grad_ws, grad_bs;
  for (int64_t k = 0; k < p.K; ++k) {
    if (output_mask[1]) grad_ws.push_back(project_unstack(p, res.grad_stack[k], weights[k], k));
    if (output_mask[2]) {
      // A block's bias sees only the rows where its modality is present: the sums of R_k.
      std::vector<int64_t> bshape(weights[k].sizes().begin(), weights[k].sizes().end() - 1);
      grad_bs.push_back(
          project_unstack(p, res.grad_rowsum[k], at::empty(bshape, weights[k].options()), k));
    }
  }
  return {output_mask[0] ? res.grad_x : std::vector<at::Tensor>{}, grad_ws, grad_bs};
}

at::Tensor project_concat_cpu(at::TensorList xs, at::TensorList weights, at::TensorList biases,
                              const c10::optional<at::Tensor>& subset_mask,
                              const c10::optional<at::Tensor>& sample_mask,
                              c10::string_view activation) {
  const auto p = plan_project_concat(xs, weights, biases, subset_mask, sample_mask,
                                     std::string(activation), /*allow_half=*/false);
  check_fused_budget("project_concat", p, false, false, xs, 0, true, sample_mask);
  return AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xs[0].scalar_type(), "project_concat", [&] {
    return forward_impl<scalar_t>(p, xs, weights, biases, sample_mask);
  });
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
project_concat_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out, at::TensorList xs,
                            at::TensorList weights, const c10::optional<at::Tensor>& subset_mask,
                            const c10::optional<at::Tensor>& sample_mask,
                            c10::string_view activation, std::array<bool, 3> output_mask) {
  const char* op = "project_concat_backward";
  const auto p = plan_project_concat(xs, weights, {}, subset_mask, sample_mask,
                                     std::string(activation), /*allow_half=*/false);
  check_backward(op, p, false, grad_out, out, xs);
  int64_t weight_numel = 0;
  for (const auto& w : weights) weight_numel += w.numel();
  check_fused_budget(op, p, false, true, xs, weight_numel,
                     grad_out.is_contiguous() && out.is_contiguous(), sample_mask);
  return AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xs[0].scalar_type(), "project_concat_backward", [&] {
    return backward_impl<scalar_t>(p, grad_out, out, xs, weights, sample_mask, output_mask);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("project_concat", &project_concat_cpu);
  m.impl("project_concat_backward", &project_concat_backward_cpu);
}

}  // namespace mmkernels::cpu
