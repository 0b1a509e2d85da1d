// Meta kernels of the head-refit ops and of the solvers' L-BFGS direction: the CPU kernels'
// shape, dtype and device checks (mmkernels/heads_plan.h, lbfgs_plan.h) and empty outputs, for
// meta tensors and torch.compile's fake tensors. Nothing here reads data: the range checks of y
// and subset_index stay in the CPU kernel.
#include <mmkernels/heads_plan.h>
#include <mmkernels/lbfgs_plan.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace mmkernels::meta {
namespace {

std::tuple<at::Tensor, at::Tensor> gram_meta(const at::Tensor& z, const at::Tensor& y) {
  const GramPlan plan = gram_plan(z, y);
  const auto options = z.options().dtype(plan.acc);
  return {at::empty_symint(plan.gram_shape(), options),
          at::empty_symint(plan.rhs_shape(), options)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_regression_loss_grad_meta(
    const at::Tensor& z, const at::Tensor& y, const at::Tensor& w, const at::Tensor& b,
    const c10::optional<at::Tensor>& sample_weight, double l2,
    const c10::optional<at::Tensor>& subset_index) {
  const SoftmaxPlan plan = softmax_plan(z, y, w, b, sample_weight, l2, subset_index);
  const auto options = w.options().dtype(plan.compute);
  return {at::empty_symint(plan.loss_shape(), options),
          at::empty_symint(plan.grad_w_shape(), options),
          at::empty_symint(plan.grad_b_shape(), options)};
}

at::Tensor lbfgs_direction_meta(const at::Tensor& grad, at::TensorList s, at::TensorList y,
                                at::TensorList rho, const at::Tensor& gamma,
                                const c10::optional<at::Tensor>& diag,
                                const c10::optional<at::Tensor>& rows) {
  const LbfgsPlan plan = lbfgs_direction_plan(grad, s, y, rho, gamma, diag, rows);
  return at::empty_symint({plan.k, plan.P}, grad.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, Meta, m) {
  m.impl("gram", &gram_meta);
  m.impl("softmax_regression_loss_grad", &softmax_regression_loss_grad_meta);
  m.impl("lbfgs_direction", &lbfgs_direction_meta);
}

}  // namespace mmkernels::meta
