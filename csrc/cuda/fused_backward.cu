// nvcc translation unit of the fused backward kernels (grad_x, grad_W and grad_b partials, the
// fixed-order reduction): no torch header.
#include "fused_api.h"
#include "fused_launch.cuh"

namespace mmkernels::cuda {

void launch_fused_backward(const FusedProblem& f, void* stream) { backward<kNoFault>(f, stream); }

int64_t fused_backward_workspace_elems(const FusedProblem& f) {
  return backward_workspace_elems(f);
}

}  // namespace mmkernels::cuda
