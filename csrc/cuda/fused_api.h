// The fused kernels as plain functions (no torch, no CUDA header), implemented by nvcc in
// fused_forward.cu / fused_backward.cu and called by the op files (*_cuda.cpp). `stream` is a
// cudaStream_t. Launch errors throw std::runtime_error.
#pragma once

#include "fused_params.h"

namespace mmkernels::cuda {

void launch_fused_forward(const FusedProblem& f, void* stream);
void launch_fused_backward(const FusedProblem& f, void* stream);
// Elements (float32; float64 for float64) of FusedProblem::workspace the backward needs.
int64_t fused_backward_workspace_elems(const FusedProblem& f);

}  // namespace mmkernels::cuda
