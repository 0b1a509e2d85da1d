// Every op schema of the package, and the Python module that carries the build information.
// Kernels register per dispatch key: csrc/cpu, csrc/cuda, csrc/meta (every op's shape checks,
// for meta and fake tensors) and csrc/autocast; autograd lives in mmkernels/ops.py.
#include <torch/library.h>

#include <mmkernels/accumulation.h>
#include <mmkernels/allocation_cache.h>
#include <mmkernels/memory_budget.h>

#include "cpu/blocked_gemm.h"

#ifndef MMKERNELS_NO_PYTHON
#include <torch/extension.h>
#endif

#ifndef MMKERNELS_CUDA_ARCHS
#define MMKERNELS_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(mmkernels, m) {
  m.def(
      "concat_project(Tensor[] xs, Tensor weight, Tensor? bias, Tensor? subset_mask, "
      "Tensor? sample_mask, str activation) -> Tensor");
  m.def(
      "concat_project_backward(Tensor grad_out, Tensor out, Tensor[] xs, Tensor weight, "
      "Tensor? subset_mask, Tensor? sample_mask, str activation, bool[3] output_mask) "
      "-> (Tensor[], Tensor, Tensor)");
  m.def(
      "project_concat(Tensor[] xs, Tensor[] weights, Tensor[] biases, Tensor? subset_mask, "
      "Tensor? sample_mask, str activation) -> Tensor");
  m.def(
      "project_concat_backward(Tensor grad_out, Tensor out, Tensor[] xs, Tensor[] weights, "
      "Tensor? subset_mask, Tensor? sample_mask, str activation, bool[3] output_mask) "
      "-> (Tensor[], Tensor[], Tensor[])");
  // Head refits (mmkernels/heads.py); no autograd: they are solver internals.
  m.def("gram(Tensor z, Tensor y) -> (Tensor, Tensor)");
  m.def(
      "softmax_regression_loss_grad(Tensor z, Tensor y, Tensor w, Tensor b, "
      "Tensor? sample_weight, float l2, Tensor? subset_index=None) -> (Tensor, Tensor, Tensor)");
  // The solvers' L-BFGS two-loop recursion (pairs newest first); see lbfgs_plan.h.
  m.def(
      "lbfgs_direction(Tensor grad, Tensor[] s, Tensor[] y, Tensor[] rho, Tensor gamma, "
      "Tensor? diag, Tensor? rows=None) -> Tensor");
}

#ifndef MMKERNELS_NO_PYTHON
namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = MMKERNELS_TORCH_VERSION;
#ifdef MMKERNELS_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = MMKERNELS_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmkernels native ops (registered under torch.ops.mmkernels)";
  m.def("build_info", &build_info, "torch version, CUDA on/off and CUDA archs of this build");
  m.def(
      "memory_budget",
      [](const std::string& device) {
        const auto b = mmkernels::memory_budget(at::Device(device));
        return pybind11::make_tuple(b.bytes, b.source);
      },
      "(bytes, source) of the fused ops' memory budget on a device; bytes is inf for none");
  m.def("blocked_gemms", &mmkernels::cpu::blocked::available,
        "whether the CPU ops' bfloat16 and float32 GEMMs run on oneDNN's ukernels now (bfloat16 "
        "on AMX); else on MKL, bfloat16 converted to float32");
  m.def("accumulation_dtype", &mmkernels::accumulation_dtype,
        "the dtype the native ops accumulate inputs of a dtype in");
  m.def("set_allocation_cache", &mmkernels::set_allocation_cache,
        "cache freed large CPU blocks up to limit_bytes (0: off); whether it is on");
  m.def(
      "allocation_cache_stats",
      [] {
        const auto s = mmkernels::allocation_cache_stats();
        return std::make_tuple(s.cached_bytes, s.hits, s.misses);
      },
      "(cached bytes, hits, misses) of the CPU allocation cache");
}
#endif
