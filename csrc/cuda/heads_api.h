// The head-refit kernels as plain functions (no torch, no CUDA header), implemented by nvcc in
// heads_kernels.cu and called by heads_cuda.cpp. `stream` is a cudaStream_t. Launch errors
// throw std::runtime_error.
#pragma once

#include "heads_params.h"

namespace mmkernels::cuda {

void launch_gram_kernels(const GramProblem& f, void* stream);
int64_t gram_kernels_workspace_elems(const GramProblem& f);

void launch_softmax_kernels(const SoftmaxProblem& f, void* stream);
int64_t softmax_kernels_workspace_elems(const SoftmaxProblem& f);
// The most classes the softmax kernel takes in compute dtype `acc` (its logits tile must fit
// in shared memory).
int64_t softmax_kernels_max_classes(DType acc);

void launch_lbfgs_kernels(const LbfgsProblem& f, void* stream);
int64_t lbfgs_kernels_workspace_elems(const LbfgsProblem& f);

}  // namespace mmkernels::cuda
