// project_concat on CUDA: the fused kernels (csrc/cuda/fused_forward.cuh, fused_backward.cuh),
// or the cuBLAS fallback (MMKERNELS_CUDA_BACKEND=cublas, devices below sm_80). No host sync on
// the fused path: the subset and sample masks are read by the kernels on the device.
#include "cublas_fallback.h"
#include "fused_op_common.h"

#include <torch/library.h>

namespace mmkernels::cuda {
namespace {

at::Tensor project_concat_cuda(at::TensorList xs, at::TensorList weights, at::TensorList biases,
                               const c10::optional<at::Tensor>& subset_mask,
                               const c10::optional<at::Tensor>& sample_mask,
                               c10::string_view activation) {
  const char* op = "project_concat";
  const auto p = plan_project_concat(xs, weights, biases, subset_mask, sample_mask,
                                     std::string(activation), /*allow_half=*/true);
  if (use_cublas_fallback(op, xs[0]))
    return cublas::project_concat(xs, weights, biases, subset_mask, sample_mask, activation);
  const c10::cuda::CUDAGuard guard(xs[0].device());
  Keep keep;
  FusedProblem f = start_problem(op, p, xs, subset_mask, sample_mask, /*late=*/true, keep);
  for (int64_t k = 0; k < p.K; ++k) {
    f.weight[k] = keep.dense(weights[k]).data_ptr();
    if (!biases.empty()) f.bias[k] = keep.dense(biases[k]).data_ptr();
  }
  f.has_bias = biases.empty() ? 0 : 1;
  return launch_forward(op, f, keep.bytes, output_shape(p, false), xs[0]);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
project_concat_backward_cuda(const at::Tensor& grad_out, const at::Tensor& out, at::TensorList xs,
                             at::TensorList weights, const c10::optional<at::Tensor>& subset_mask,
                             const c10::optional<at::Tensor>& sample_mask,
                             c10::string_view activation, std::array<bool, 3> output_mask) {
  const char* op = "project_concat_backward";
  const auto p = plan_project_concat(xs, weights, {}, subset_mask, sample_mask,
                                     std::string(activation), /*allow_half=*/true);
  check_backward(op, p, false, grad_out, out, xs);
  if (use_cublas_fallback(op, xs[0]))
    return cublas::project_concat_backward(grad_out, out, xs, weights, subset_mask, sample_mask,
                                           activation, output_mask);
  const c10::cuda::CUDAGuard guard(xs[0].device());
  Keep keep;
  FusedProblem f = start_problem(op, p, xs, subset_mask, sample_mask, /*late=*/true, keep);
  f.out = const_cast<void*>(keep.dense(out).data_ptr());
  f.grad_out = keep.dense(grad_out).data_ptr();
  std::vector<at::Tensor> grad_x, grad_w, grad_b;
  double bytes = keep.bytes;
  for (int64_t k = 0; k < p.K; ++k) {
    f.weight[k] = keep.dense(weights[k]).data_ptr();
    if (output_mask[0]) {
      grad_x.push_back(at::empty(xs[k].sizes(), xs[k].options()));
      f.grad_x[k] = grad_x.back().data_ptr();
      bytes += (double)grad_x.back().numel() * (double)xs[k].element_size();
    }
    if (output_mask[1]) {
      grad_w.push_back(at::empty(weights[k].sizes(), weights[k].options()));
      f.grad_weight[k] = grad_w.back().data_ptr();
      bytes += (double)grad_w.back().numel() * (double)weights[k].element_size();
    }
    if (output_mask[2]) {
      std::vector<int64_t> bshape(weights[k].sizes().begin(), weights[k].sizes().end() - 1);
      grad_b.push_back(at::empty(bshape, weights[k].options()));
      f.grad_bias[k] = grad_b.back().data_ptr();
    }
  }
  launch_backward(op, f, bytes, output_shape(p, false), xs[0]);
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("project_concat", &project_concat_cuda);
  m.impl("project_concat_backward", &project_concat_backward_cuda);
}

}  // namespace mmkernels::cuda
