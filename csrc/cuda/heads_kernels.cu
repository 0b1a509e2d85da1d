// nvcc translation unit of the head-refit kernels (gram, softmax regression) and the solvers'
// L-BFGS direction: no torch header.
#include "heads_api.h"
#include "heads_launch.cuh"

namespace mmkernels::cuda {

void launch_gram_kernels(const GramProblem& f, void* stream) { launch_gram(f, stream); }

int64_t gram_kernels_workspace_elems(const GramProblem& f) { return gram_workspace_elems(f); }

void launch_softmax_kernels(const SoftmaxProblem& f, void* stream) { launch_softmax(f, stream); }

int64_t softmax_kernels_workspace_elems(const SoftmaxProblem& f) {
  return softmax_workspace_elems(f);
}

int64_t softmax_kernels_max_classes(DType acc) { return softmax_max_classes(acc); }

void launch_lbfgs_kernels(const LbfgsProblem& f, void* stream) { launch_lbfgs(f, stream); }

int64_t lbfgs_kernels_workspace_elems(const LbfgsProblem& f) { return lbfgs_workspace_elems(f); }

}  // namespace mmkernels::cuda
