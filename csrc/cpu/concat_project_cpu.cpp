// concat_project on the CPU: act(sum_k present * x_k @ W_k^T + bias), per subset.
#include "gemm_engine.h"

#include <mmkernels/memory_budget.h>
#include <mmkernels/weight_stacks.h>

#include <torch/library.h>

namespace mmkernels::cpu {
namespace {

std::vector<Operand> concat_operands(const FusionPlan& p, at::TensorList xs,
                                     const at::Tensor& weight, at::ScalarType acc) {
  std::vector<Operand> ops(p.K);
  for (int64_t k = 0; k < p.K; ++k) {
    ops[k].x = xs[k].contiguous();
    ops[k].active = p.modality_used(k);
    if (ops[k].active) ops[k].w = concat_weight_stack(p, weight, k).to(acc).contiguous();
  }
  return ops;
}

template <typename scalar_t>
at::Tensor forward_impl(const FusionPlan& p, at::TensorList xs, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& sample_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor out = at::empty(output_shape(p, true), xs[0].options());
  const int64_t B = p.B, H = p.widths[0];
  if (out.numel() == 0) return out;
  const auto acc = accumulation_dtype(xs[0].scalar_type());
  const auto ops = concat_operands(p, xs, weight, acc);
  at::Tensor bias_acc;
  const acc_t* bptr = nullptr;
  if (bias.has_value()) {
    bias_acc = bias->to(acc).contiguous();
    bptr = bias_acc.data_ptr<acc_t>();
  }
  const int64_t bias_step = p.per_subset ? H : 0;
  scalar_t* optr = out.data_ptr<scalar_t>();

  forward_gemms<scalar_t>(p, ops, sample_mask, [&](const RowView<acc_t>& v, int64_t r0, int64_t r1) {
    std::vector<acc_t> z(H);
    for (int64_t s = 0; s < p.S; ++s)  // each subset's rows of a band: one run of out
      for (int64_t b = r0; b < r1; ++b) {
        // A copy, not a loop with the bias test inside: the compiler left that one scalar.
        if (bptr) std::copy(bptr + s * bias_step, bptr + s * bias_step + H, z.data());
        else std::fill(z.begin(), z.end(), acc_t(0));
        for (int64_t k = 0; k < p.K; ++k)
          if (p.used(s, k) && v.present(k, b))
            add_into(z.data(), v.row(k, b) + p.block_of[k][s] * H, H);
        store_activated(optr + (s * B + b) * H, z.data(), static_cast<const acc_t*>(nullptr), H,
                        p.relu);
      }
  });
  return out;
}

template <typename scalar_t>
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> backward_impl(
    const FusionPlan& p, const at::Tensor& grad_out, const at::Tensor& out, at::TensorList xs,
    const at::Tensor& weight, const c10::optional<at::Tensor>& sample_mask,
    std::array<bool, 3> output_mask) {
  const int64_t H = p.widths[0];
  const auto ops = concat_operands(p, xs, weight, accumulation_dtype(xs[0].scalar_type()));
  auto res = backward_gemms<scalar_t>(p, ops, sample_mask, grad_out, out, H,
                                      std::vector<int64_t>(p.K, 0), output_mask[0],
                                      output_mask[1], /*need_colsum=*/true,
                                      /*need_rowsum=*/false);
  at::Tensor grad_w = at::empty({0}, weight.options()), grad_b = at::empty({0}, weight.options());
  if (output_mask[1]) grad_w = concat_unstack(p, res.grad_stack, weight);
  if (output_mask[2]) {
    // The bias sees every row, present or not: the column sums of act'(out) * grad_out.
    at::Tensor gb = p.per_subset ? res.grad_colsum : res.grad_colsum.sum(0);
    grad_b = gb.to(weight.scalar_type());
  }
  return {output_mask[0] ? res.grad_x : std::vector<at::Tensor>{}, grad_w, grad_b};
}

at::Tensor concat_project_cpu(at::TensorList xs, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& subset_mask,
                              const c10::optional<at::Tensor>& sample_mask,
                              c10::string_view activation) {
  const auto p = plan_concat_project(xs, weight, bias, subset_mask, sample_mask,
                                     std::string(activation), /*allow_half=*/false);
  check_fused_budget("concat_project", p, true, false, xs, weight.numel(), true, sample_mask);
  return AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xs[0].scalar_type(), "concat_project", [&] {
    return forward_impl<scalar_t>(p, xs, weight, bias, sample_mask);
  });
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> concat_project_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& out, at::TensorList xs, const at::Tensor& weight,
    const c10::optional<at::Tensor>& subset_mask, const c10::optional<at::Tensor>& sample_mask,
    c10::string_view activation, std::array<bool, 3> output_mask) {
  const char* op = "concat_project_backward";
  const auto p = plan_concat_project(xs, weight, c10::nullopt, subset_mask, sample_mask,
                                     std::string(activation), /*allow_half=*/false);
  check_backward(op, p, true, grad_out, out, xs);
  check_fused_budget(op, p, true, true, xs, weight.numel(),
                     grad_out.is_contiguous() && out.is_contiguous(), sample_mask);
  return AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xs[0].scalar_type(), "concat_project_backward", [&] {
    return backward_impl<scalar_t>(p, grad_out, out, xs, weight, sample_mask, output_mask);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("concat_project", &concat_project_cpu);
  m.impl("concat_project_backward", &concat_project_backward_cpu);
}

}  // namespace mmkernels::cpu
