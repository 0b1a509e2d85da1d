// The head-refit ops' argument checks and output shapes (mmkernels::gram and
// mmkernels::softmax_regression_loss_grad), from shapes, dtypes and devices alone.
//
// The one source of both kernels of each op: the CPU kernel (csrc/cpu/heads) runs it before
// its data-dependent checks (label and subset ranges) and the memory budget, the Meta kernel
// (csrc/meta/heads_meta.cpp; what meta tensors and torch.compile's fake tensors run) runs it
// and allocates the outputs. Sizes are SymInts so that the Meta kernel works under dynamic
// shapes; on real tensors they hold plain integers and the messages read the same.
#pragma once

#include <mmkernels/accumulation.h>
#include <mmkernels/checks.h>

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

namespace mmkernels {

inline void check_heads_z(const char* op, const at::Tensor& z) {
  check_defined(op, "z", z);
  MMK_CHECK(z.dim() == 3, op, ": z must be 3-d [S, n, H], got shape ",
            shape_str(z.sym_sizes()));
  check_float_dtype(op, "z", z, /*allow_half=*/false);
}

inline void check_on_device_of_z(const char* op, const char* name, const at::Tensor& t,
                                 const at::Tensor& z) {
  MMK_CHECK(t.device() == z.device(), op, ": ", name, " is on ", t.device(), ", expected ",
            z.device(), " (the device of z)");
}

// gram(z [S, n, H], y [n] or [n, T]) -> G [S, H+1, H+1], R [S, H+1, T] (T = 1 for 1-d y), both
// in the accumulation dtype of z.
struct GramPlan {
  c10::SymInt S, n, H, T;
  at::ScalarType acc;

  std::vector<c10::SymInt> gram_shape() const { return {S, H + 1, H + 1}; }
  std::vector<c10::SymInt> rhs_shape() const { return {S, H + 1, T}; }
};

inline GramPlan gram_plan(const at::Tensor& z, const at::Tensor& y) {
  const char* op = "mmkernels::gram";
  check_heads_z(op, z);
  const c10::SymInt S = z.sym_size(0), n = z.sym_size(1), H = z.sym_size(2);
  check_defined(op, "y", y);
  MMK_CHECK(y.dim() == 1 || y.dim() == 2, op, ": y must be [n] or [n, T], got shape ",
            shape_str(y.sym_sizes()));
  MMK_CHECK(y.sym_size(0) == n, op, ": y has ", y.sym_size(0), " rows, expected n = ", n,
            " (dim 1 of z)");
  check_float_dtype(op, "y", y, /*allow_half=*/false);
  check_on_device_of_z(op, "y", y, z);
  const c10::SymInt T = y.dim() == 1 ? c10::SymInt(1) : y.sym_size(1);
  return {S, n, H, T, accumulation_dtype(z.scalar_type())};
}

// softmax_regression_loss_grad(z [S, n, H], y [n], w [K, H, C], b [K, C], sample_weight [n]?,
// l2, subset_index [K]?) -> loss [K], grad_w [K, H, C], grad_b [K, C], in w's dtype (which sets
// the compute dtype). K = S, or the length of subset_index (the subsets of z evaluated).
struct SoftmaxPlan {
  c10::SymInt S, n, H, K, C;
  at::ScalarType compute;

  std::vector<c10::SymInt> loss_shape() const { return {K}; }
  std::vector<c10::SymInt> grad_w_shape() const { return {K, H, C}; }
  std::vector<c10::SymInt> grad_b_shape() const { return {K, C}; }
};

// Everything but the values of y and subset_index (whether they are in range), which only the
// CPU kernel can read.
inline SoftmaxPlan softmax_plan(const at::Tensor& z, const at::Tensor& y, const at::Tensor& w,
                                const at::Tensor& b,
                                const c10::optional<at::Tensor>& sample_weight, double l2,
                                const c10::optional<at::Tensor>& subset_index) {
  const char* op = "mmkernels::softmax_regression_loss_grad";
  check_heads_z(op, z);
  const c10::SymInt S = z.sym_size(0), n = z.sym_size(1), H = z.sym_size(2);
  const bool picked = subset_index.has_value();
  if (picked) {
    const at::Tensor& index = *subset_index;
    check_on_device_of_z(op, "subset_index", index, z);
    MMK_CHECK(index.scalar_type() == at::kLong && index.dim() == 1, op,
              ": subset_index must be a 1-d int64 tensor, got ", index.scalar_type(), " ",
              shape_str(index.sym_sizes()));
  }
  const c10::SymInt K = picked ? subset_index->sym_size(0) : S;
  check_defined(op, "w", w);
  check_defined(op, "y", y);
  MMK_CHECK(w.dim() == 3, op, ": w must be 3-d [S, H, C], got shape ",
            shape_str(w.sym_sizes()));
  MMK_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble, op,
            ": w must be float32 or float64 (it sets the compute dtype), got ", w.scalar_type());
  const c10::SymInt C = w.sym_size(2);
  MMK_CHECK(C >= 1, op, ": w must have at least one class (dim 2), got shape ",
            shape_str(w.sym_sizes()));
  check_sym_shape(op, "w", w, {K, H, C},
                  picked ? "[len(subset_index), H, C]" : "[S, H, C] with S, H from z");
  check_same(op, "b", b, w, "w");
  check_sym_shape(op, "b", b, {K, C}, picked ? "[len(subset_index), C]" : "[S, C]");
  check_on_device_of_z(op, "w", w, z);
  MMK_CHECK(y.scalar_type() == at::kLong, op, ": y must be int64 class labels, got ",
            y.scalar_type());
  check_sym_shape(op, "y", y, {n}, "[n], n from z");
  check_on_device_of_z(op, "y", y, z);
  MMK_CHECK(std::isfinite(l2) && l2 >= 0, op, ": l2 must be finite and >= 0, got ", l2);
  if (sample_weight.has_value()) {
    check_sym_shape(op, "sample_weight", *sample_weight, {n}, "[n], n from z");
    check_float_dtype(op, "sample_weight", *sample_weight, /*allow_half=*/false);
    check_on_device_of_z(op, "sample_weight", *sample_weight, z);
  }
  return {S, n, H, K, C, w.scalar_type()};
}

}  // namespace mmkernels
