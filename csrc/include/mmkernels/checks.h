// Argument checks shared by every backend. Each message names the argument and shows the
// expected value next to the actual one, so a user can fix the call without reading code.
//
// The fused ops' checks read sizes as SymInts (sym_sizes()): the same code then checks
// concrete tensors in the CPU and CUDA kernels and fake tensors with symbolic sizes in the
// Meta kernels (csrc/meta) under torch.compile, where a comparison becomes a shape guard.
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>
#include <vector>

namespace mmkernels {

template <typename Sizes>
std::string sizes_str(const Sizes& sizes) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << "]";
  return os.str();
}

inline std::string shape_str(at::IntArrayRef sizes) { return sizes_str(sizes); }
inline std::string shape_str(c10::SymIntArrayRef sizes) { return sizes_str(sizes); }

// ValueError on the Python side: these are caller mistakes, not internal failures.
#define MMK_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

// A None passed for a Tensor argument arrives as an undefined tensor.
inline void check_defined(const char* op, const std::string& name, const at::Tensor& t) {
  MMK_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
}

inline void check_float_dtype(const char* op, const std::string& name, const at::Tensor& t,
                              bool allow_half) {
  const auto dt = t.scalar_type();
  const bool ok = dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 ||
                  (allow_half && dt == at::kHalf);
  MMK_CHECK(ok, op, ": ", name, " must be float32, float64 or bfloat16",
            allow_half ? " (or float16)" : "", ", got ", dt);
}

inline void check_same(const char* op, const std::string& name, const at::Tensor& t,
                       const at::Tensor& ref, const std::string& ref_name) {
  check_defined(op, name, t);
  MMK_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
            ", expected ", ref.scalar_type(), " (the dtype of ", ref_name, ")");
  MMK_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), ", expected ",
            ref.device(), " (the device of ", ref_name, ")");
}

inline void check_shape(const char* op, const std::string& name, const at::Tensor& t,
                        at::IntArrayRef expected, const std::string& what) {
  check_defined(op, name, t);
  MMK_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", shape_str(expected), " (",
            what, "), got ", shape_str(t.sizes()));
}

// check_shape on symbolic sizes (a distinct name: a braced list of ints would fit both).
inline void check_sym_shape(const char* op, const std::string& name, const at::Tensor& t,
                            c10::SymIntArrayRef expected, const std::string& what) {
  check_defined(op, name, t);
  MMK_CHECK(t.sym_sizes().equals(expected), op, ": ", name, " must have shape ",
            shape_str(expected), " (", what, "), got ", shape_str(t.sym_sizes()));
}

inline void check_mask(const char* op, const std::string& name, const at::Tensor& mask,
                       c10::SymIntArrayRef expected, const std::string& what,
                       const at::Tensor& ref) {
  check_defined(op, name, mask);
  MMK_CHECK(mask.scalar_type() == at::kBool, op, ": ", name, " must be a bool tensor, got ",
            mask.scalar_type());
  check_sym_shape(op, name, mask, expected, what);
  MMK_CHECK(mask.device() == ref.device(), op, ": ", name, " is on ", mask.device(),
            ", expected ", ref.device(), " (the device of xs)");
}

inline void check_activation(const char* op, const std::string& activation) {
  MMK_CHECK(activation == "relu" || activation == "none", op,
            ": activation must be \"relu\" or \"none\", got \"", activation, "\"");
}

// The fused ops' dtype rule, in words that do not depend on the device (so that meta, CPU and
// CUDA tensors get one message): float16 is accepted where allow_half (the CUDA kernels).
inline void check_modality_dtype(const char* op, const std::string& name, const at::Tensor& t,
                                 bool allow_half) {
  const auto dt = t.scalar_type();
  const bool ok = dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 ||
                  (allow_half && dt == at::kHalf);
  MMK_CHECK(ok, op, ": ", name, " must be float32, float64 or bfloat16, got ", dt,
            " (float16 is supported on CUDA only)");
}

// Checks the modality list and returns each modality's width. All xs share B, dtype, device.
inline std::vector<c10::SymInt> check_modalities(const char* op, at::TensorList xs,
                                                 bool allow_half) {
  MMK_CHECK(!xs.empty(), op, ": xs must hold at least one modality tensor, got an empty list");
  std::vector<c10::SymInt> dims;
  dims.reserve(xs.size());
  for (size_t k = 0; k < xs.size(); ++k) {
    const std::string name = "xs[" + std::to_string(k) + "]";
    check_defined(op, name, xs[k]);
    MMK_CHECK(xs[k].dim() == 2, op, ": ", name, " must be 2-d [B, d_k], got shape ",
              shape_str(xs[k].sym_sizes()));
    check_modality_dtype(op, name, xs[k], allow_half);
    if (k > 0) {
      check_same(op, name, xs[k], xs[0], "xs[0]");
      MMK_CHECK(xs[k].sym_size(0) == xs[0].sym_size(0), op, ": ", name, " has ",
                xs[k].sym_size(0), " rows, expected B = ", xs[0].sym_size(0),
                " (the rows of xs[0])");
    }
    dims.push_back(xs[k].sym_size(1));
  }
  return dims;
}

}  // namespace mmkernels
