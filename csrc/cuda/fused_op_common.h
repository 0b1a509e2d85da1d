// What both CUDA op files share: the backend choice, and the FusedProblem filled from the
// plan and the tensors (device pointers only: nothing is read back, no host sync).
#pragma once

#include "fused_api.h"

#include <mmkernels/accumulation.h>
#include <mmkernels/fusion_plan.h>
#include <mmkernels/memory_budget.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <deque>
#include <string>
#include <vector>

namespace mmkernels::cuda {

// MMKERNELS_CUDA_BACKEND: "fused" (the default) or "cublas" (the fallback, which synchronises
// with the host). Devices below sm_80 always get the fallback: the fused kernels need mma.sync
// m16n8k16 and cp.async.
// A device attribute (cached by the runtime; no synchronisation).
inline int device_attribute(cudaDeviceAttr what, const at::Tensor& x) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, what, x.device().index()));
  return v;
}

inline bool use_cublas_fallback(const char* op, const at::Tensor& x) {
  const char* env = std::getenv("MMKERNELS_CUDA_BACKEND");
  const std::string choice = env ? env : "fused";
  TORCH_CHECK_VALUE(choice == "fused" || choice == "cublas" || choice.empty(), op,
                    ": MMKERNELS_CUDA_BACKEND must be \"fused\" or \"cublas\", got \"", choice, "\"");
  if (choice == "cublas") return true;
  return device_attribute(cudaDevAttrComputeCapabilityMajor, x) < 8;
}

inline DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kBFloat16: return DType::bf16;
    default: return DType::f16;
  }
}

// Keeps the contiguous copies a launch points into alive until the call returns (the copies
// are stream-ordered: freeing them after the launch is safe with the caching allocator).
struct Keep {
  std::deque<at::Tensor> tensors;  // a deque: references to earlier entries stay valid
  const at::Tensor& operator()(at::Tensor t) {
    tensors.push_back(std::move(t));
    return tensors.back();
  }
  double bytes = 0;  // bytes of copies made
  const at::Tensor& dense(const at::Tensor& t) {
    if (t.is_contiguous()) return (*this)(t);
    bytes += (double)t.numel() * (double)t.element_size();
    return (*this)(t.contiguous());
  }
};

// A modality tensor: rows may have any stride, elements must be unit-stride.
inline const at::Tensor& rows_of(Keep& keep, const at::Tensor& x) {
  if (x.size(1) <= 1 || x.stride(1) == 1) return keep(x);
  return keep.dense(x);
}

inline FusedProblem start_problem(const char* op, const FusionPlan& p, at::TensorList xs,
                                  const c10::optional<at::Tensor>& subset_mask,
                                  const c10::optional<at::Tensor>& sample_mask, bool late,
                                  Keep& keep) {
  MMK_CHECK(p.K <= kMaxModalities, op, ": at most ", kMaxModalities,
            " modalities are supported on CUDA, got K = ", p.K);
  FusedProblem f;
  f.late = late ? 1 : 0;
  f.dtype = (int32_t)dtype_code(xs[0].scalar_type());
  f.allow_tf32 = at::globalContext().allowTF32CuBLAS() ? 1 : 0;
  f.relu = p.relu ? 1 : 0;
  f.K = (int32_t)p.K;
  f.B = p.B;
  f.S = p.S;
  f.has_subsets = p.has_subsets ? 1 : 0;
  f.per_subset = p.per_subset ? 1 : 0;
  for (int64_t k = 0; k < p.K; ++k) {
    const at::Tensor& x = rows_of(keep, xs[k]);
    f.x[k] = x.data_ptr();
    f.ldx[k] = x.size(0) > 1 ? x.stride(0) : x.size(1);
    f.dims[k] = p.dims[k];
    f.widths[k] = p.widths[k];
  }
  if (subset_mask.has_value()) f.subset_mask = static_cast<const uint8_t*>(keep.dense(*subset_mask).data_ptr());
  if (sample_mask.has_value()) f.sample_mask = static_cast<const uint8_t*>(keep.dense(*sample_mask).data_ptr());
  f.num_sms = device_attribute(cudaDevAttrMultiProcessorCount, xs[0]);
  return f;
}

// A gradient shaped like t, or an empty placeholder when not wanted.
inline at::Tensor grad_like(bool wanted, const at::Tensor& t) {
  return wanted ? at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous))
                : at::empty({0}, t.options());
}

inline void* stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// The forward's last step in both ops: the output checked against the budget (with `bytes`,
// the copies made so far), allocated, and computed.
inline at::Tensor launch_forward(const char* op, FusedProblem& f, double bytes,
                                 const std::vector<int64_t>& shape, const at::Tensor& like) {
  bytes += (double)c10::multiply_integers(shape) * (double)like.element_size();
  check_memory_budget(op, bytes, like.device(), "its output " + shape_str(shape));
  at::Tensor out = at::empty(shape, like.options());
  if (out.numel() == 0) return out;
  f.out = out.data_ptr();
  launch_fused_forward(f, stream_of(out));
  return out;
}

// The backward's last step in both ops: its partial-sum workspace counted into `bytes` (what
// the call allocates) and checked against the budget before anything is allocated, then the
// launch. `like` gives the device and the input dtype.
inline void launch_backward(const char* op, FusedProblem& f, double bytes,
                            const std::vector<int64_t>& out_shape, const at::Tensor& like) {
  const int64_t ws_elems = fused_backward_workspace_elems(f);
  const auto acc = accumulation_dtype(like.scalar_type());
  bytes += (double)ws_elems * (double)c10::elementSize(acc);
  check_memory_budget(op, bytes, like.device(),
                      "the gradients of output " + shape_str(out_shape) + " and their partial sums");
  at::Tensor ws = at::empty({std::max<int64_t>(ws_elems, 1)}, like.options().dtype(acc));
  f.workspace = ws.data_ptr();
  launch_fused_backward(f, stream_of(ws));
}

}  // namespace mmkernels::cuda
