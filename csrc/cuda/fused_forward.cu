// nvcc translation unit of the fused forward kernels (every policy, both modes): no torch
// header, so it compiles in seconds, not minutes.
#include "fused_api.h"
#include "fused_launch.cuh"

namespace mmkernels::cuda {

void launch_fused_forward(const FusedProblem& f, void* stream) { forward<kNoFault>(f, stream); }

}  // namespace mmkernels::cuda
