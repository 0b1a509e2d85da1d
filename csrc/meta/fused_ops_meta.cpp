// Meta kernels of the fused ops and their backward ops: the shape half of the plan
// (mmkernels/fusion_plan.h: every argument check, on SymInts) and empty outputs. They serve meta
// tensors and torch.compile's fake tensors, with symbolic sizes under dynamic shapes; what
// needs mask data (which blocks are used, the memory budget) stays in the real kernels.
//
// Every output is contiguous, as the real kernels' outputs are, whatever the inputs' strides.
// A meta tensor mixed with tensors of another device lands here too (Meta outranks the other
// backends in dispatch) and fails the plan's device checks, as the real kernels would.
#include <mmkernels/fusion_plan.h>

#include <torch/library.h>

namespace mmkernels::meta {
namespace {

// float16 is a CUDA dtype; a meta tensor does not say which device it stands for.
constexpr bool kAllowHalf = true;

at::Tensor empty_like_sizes(const at::Tensor& t) {
  return at::empty_symint(t.sym_sizes(), t.options());
}

at::Tensor concat_project_meta(at::TensorList xs, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& subset_mask,
                               const c10::optional<at::Tensor>& sample_mask,
                               c10::string_view activation) {
  const auto s = check_concat_project(xs, weight, bias, subset_mask, sample_mask,
                                      std::string(activation), kAllowHalf);
  return at::empty_symint(output_shape(s, true), xs[0].options());
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> concat_project_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& out, at::TensorList xs, const at::Tensor& weight,
    const c10::optional<at::Tensor>& subset_mask, const c10::optional<at::Tensor>& sample_mask,
    c10::string_view activation, std::array<bool, 3> output_mask) {
  const auto s = check_concat_project(xs, weight, c10::nullopt, subset_mask, sample_mask,
                                      std::string(activation), kAllowHalf);
  check_backward("concat_project_backward", s, true, grad_out, out, xs);
  std::vector<at::Tensor> grad_xs;
  if (output_mask[0])
    for (const auto& x : xs) grad_xs.push_back(empty_like_sizes(x));
  const at::Tensor none = at::empty({0}, weight.options());
  return {grad_xs, output_mask[1] ? empty_like_sizes(weight) : none,
          output_mask[2] ? at::empty_symint(drop_last(weight), weight.options()) : none};
}

at::Tensor project_concat_meta(at::TensorList xs, at::TensorList weights, at::TensorList biases,
                               const c10::optional<at::Tensor>& subset_mask,
                               const c10::optional<at::Tensor>& sample_mask,
                               c10::string_view activation) {
  const auto s = check_project_concat(xs, weights, biases, subset_mask, sample_mask,
                                      std::string(activation), kAllowHalf);
  return at::empty_symint(output_shape(s, false), xs[0].options());
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
project_concat_backward_meta(const at::Tensor& grad_out, const at::Tensor& out,
                             at::TensorList xs, at::TensorList weights,
                             const c10::optional<at::Tensor>& subset_mask,
                             const c10::optional<at::Tensor>& sample_mask,
                             c10::string_view activation, std::array<bool, 3> output_mask) {
  const auto s = check_project_concat(xs, weights, {}, subset_mask, sample_mask,
                                      std::string(activation), kAllowHalf);
  check_backward("project_concat_backward", s, false, grad_out, out, xs);
  std::vector<at::Tensor> grad_xs, grad_ws, grad_bs;
  for (int64_t k = 0; k < s.K; ++k) {
    if (output_mask[0]) grad_xs.push_back(empty_like_sizes(xs[k]));
    if (output_mask[1]) grad_ws.push_back(empty_like_sizes(weights[k]));
    if (output_mask[2])
      grad_bs.push_back(at::empty_symint(drop_last(weights[k]), weights[k].options()));
  }
  return {grad_xs, grad_ws, grad_bs};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, Meta, m) {
  m.impl("concat_project", &concat_project_meta);
  m.impl("concat_project_backward", &concat_project_backward_meta);
  m.impl("project_concat", &project_concat_meta);
  m.impl("project_concat_backward", &project_concat_backward_meta);
}

}  // namespace mmkernels::meta
