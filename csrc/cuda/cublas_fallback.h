// The cuBLAS fallback of the fused ops (cublas_fallback.cu), with the ops' own signatures.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>
#include <vector>

namespace mmkernels::cuda::cublas {

at::Tensor concat_project(at::TensorList xs, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& subset_mask,
                          const c10::optional<at::Tensor>& sample_mask, c10::string_view activation);

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> concat_project_backward(
    const at::Tensor& grad_out, const at::Tensor& out, at::TensorList xs, const at::Tensor& weight,
    const c10::optional<at::Tensor>& subset_mask, const c10::optional<at::Tensor>& sample_mask,
    c10::string_view activation, std::array<bool, 3> output_mask);

at::Tensor project_concat(at::TensorList xs, at::TensorList weights, at::TensorList biases,
                          const c10::optional<at::Tensor>& subset_mask,
                          const c10::optional<at::Tensor>& sample_mask, c10::string_view activation);

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
project_concat_backward(const at::Tensor& grad_out, const at::Tensor& out, at::TensorList xs,
                        at::TensorList weights, const c10::optional<at::Tensor>& subset_mask,
                        const c10::optional<at::Tensor>& sample_mask, c10::string_view activation,
                        std::array<bool, 3> output_mask);

}  // namespace mmkernels::cuda::cublas
