// Argument checks shared by every backend. Each message names the argument and shows the
// expected value next to the actual one, so a user can fix the call without reading code.
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>
#include <vector>

namespace mmkernels {

inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << "]";
  return os.str();
}

// The same for sizes that may be symbolic (a Meta kernel under torch.compile's dynamic shapes
// sees SymInts; c10::SymInt prints its value, or its expression when it has none).
inline std::string sym_shape_str(c10::SymIntArrayRef sizes) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << "]";
  return os.str();
}

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

// check_shape for symbolic sizes: usable by a Meta kernel and by the real kernel alike (on a
// real tensor sym_sizes() holds plain integers, and the message is check_shape's).
inline void check_sym_shape(const char* op, const std::string& name, const at::Tensor& t,
                            c10::SymIntArrayRef expected, const std::string& what) {
  check_defined(op, name, t);
  MMK_CHECK(t.sym_sizes() == expected, op, ": ", name, " must have shape ",
            sym_shape_str(expected), " (", what, "), got ", sym_shape_str(t.sym_sizes()));
}

inline void check_mask(const char* op, const std::string& name, const at::Tensor& mask,
                       at::IntArrayRef expected, const std::string& what, const at::Tensor& ref) {
  check_defined(op, name, mask);
  MMK_CHECK(mask.scalar_type() == at::kBool, op, ": ", name, " must be a bool tensor, got ",
            mask.scalar_type());
  check_shape(op, name, mask, expected, what);
  MMK_CHECK(mask.device() == ref.device(), op, ": ", name, " is on ", mask.device(),
            ", expected ", ref.device(), " (the device of xs)");
}

inline void check_activation(const char* op, const std::string& activation) {
  MMK_CHECK(activation == "relu" || activation == "none", op,
            ": activation must be \"relu\" or \"none\", got \"", activation, "\"");
}

// Checks the modality list and returns each modality's width. All xs share B, dtype, device.
inline std::vector<int64_t> check_modalities(const char* op, at::TensorList xs, bool allow_half) {
  MMK_CHECK(!xs.empty(), op, ": xs must hold at least one modality tensor, got an empty list");
  std::vector<int64_t> dims;
  dims.reserve(xs.size());
  for (size_t k = 0; k < xs.size(); ++k) {
    const std::string name = "xs[" + std::to_string(k) + "]";
    check_defined(op, name, xs[k]);
    MMK_CHECK(xs[k].dim() == 2, op, ": ", name, " must be 2-d [B, d_k], got shape ",
              shape_str(xs[k].sizes()));
    check_float_dtype(op, name, xs[k], allow_half);
    if (k > 0) {
      check_same(op, name, xs[k], xs[0], "xs[0]");
      MMK_CHECK(xs[k].size(0) == xs[0].size(0), op, ": ", name, " has ", xs[k].size(0),
                " rows, expected B = ", xs[0].size(0), " (the rows of xs[0])");
    }
    dims.push_back(xs[k].size(1));
  }
  return dims;
}

}  // namespace mmkernels
