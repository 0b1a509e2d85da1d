// concat_project on CUDA: the fused kernels (csrc/cuda/fused_forward.cuh, fused_backward.cuh),
// or the cuBLAS fallback (MMKERNELS_CUDA_BACKEND=cublas, devices below sm_80). No host sync on
// the fused path: the subset and sample masks are read by the kernels on the device.
#include "cublas_fallback.h"
#include "fused_op_common.h"

#include <torch/library.h>

namespace mmkernels::cuda {
namespace {

at::Tensor concat_project_cuda(at::TensorList xs, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& subset_mask,
                               const c10::optional<at::Tensor>& sample_mask,
                               c10::string_view activation) {
  const char* op = "concat_project";
  const auto p = plan_concat_project(xs, weight, bias, subset_mask, sample_mask,
                                     std::string(activation), /*allow_half=*/true);
  if (use_cublas_fallback(op, xs[0]))
    return cublas::concat_project(xs, weight, bias, subset_mask, sample_mask, activation);
  const c10::cuda::CUDAGuard guard(xs[0].device());
  Keep keep;
  FusedProblem f = start_problem(op, p, xs, subset_mask, sample_mask, /*late=*/false, keep);
  f.weight[0] = keep.dense(weight).data_ptr();
  if (bias.has_value()) {
    f.has_bias = 1;
    f.bias[0] = keep.dense(*bias).data_ptr();
  }
  return launch_forward(op, f, keep.bytes, output_shape(p, true), xs[0]);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> concat_project_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& out, at::TensorList xs, const at::Tensor& weight,
    const c10::optional<at::Tensor>& subset_mask, const c10::optional<at::Tensor>& sample_mask,
    c10::string_view activation, std::array<bool, 3> output_mask) {
  const char* op = "concat_project_backward";
  const auto p = plan_concat_project(xs, weight, c10::nullopt, subset_mask, sample_mask,
                                     std::string(activation), /*allow_half=*/true);
  check_backward(op, p, true, grad_out, out, xs);
  if (use_cublas_fallback(op, xs[0]))
    return cublas::concat_project_backward(grad_out, out, xs, weight, subset_mask, sample_mask,
                                           activation, output_mask);
  const c10::cuda::CUDAGuard guard(xs[0].device());
  Keep keep;
  FusedProblem f = start_problem(op, p, xs, subset_mask, sample_mask, /*late=*/false, keep);
  f.weight[0] = keep.dense(weight).data_ptr();
  f.out = const_cast<void*>(keep.dense(out).data_ptr());
  f.grad_out = keep.dense(grad_out).data_ptr();
  std::vector<at::Tensor> grad_x;
  if (output_mask[0])
    for (int64_t k = 0; k < p.K; ++k) {
      grad_x.push_back(at::empty(xs[k].sizes(), xs[k].options()));
      f.grad_x[k] = grad_x.back().data_ptr();
    }
  at::Tensor grad_w = grad_like(output_mask[1], weight);
  std::vector<int64_t> bshape(weight.sizes().begin(), weight.sizes().end() - 1);
  at::Tensor grad_b = output_mask[2] ? at::empty(bshape, weight.options()) : at::empty({0}, weight.options());
  if (output_mask[1]) f.grad_weight[0] = grad_w.data_ptr();
  if (output_mask[2]) f.grad_bias[0] = grad_b.data_ptr();
  double bytes = keep.bytes + (double)(grad_w.numel() + grad_b.numel()) * (double)weight.element_size();
  for (const auto& g : grad_x) bytes += (double)g.numel() * (double)g.element_size();
  launch_backward(op, f, bytes, output_shape(p, true), xs[0]);
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("concat_project", &concat_project_cuda);
  m.impl("concat_project_backward", &concat_project_backward_cuda);
}

}  // namespace mmkernels::cuda
