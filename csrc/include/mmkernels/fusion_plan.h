// Shape logic of the two fused ops, shared by every backend: validates the arguments once and
// describes, for each modality k, the stack of weight blocks it is multiplied with.
//
// Two layers. FusionShape is what the arguments' metadata fixes (ranks, sizes, dtypes,
// devices), with every argument check; it is written on SymInts and is the whole of the Meta
// kernels (csrc/meta), so meta tensors, torch.compile's fake tensors and real tensors raise
// the same errors in the same order. FusionPlan adds what only data can tell (which subsets
// use which modality: the subset mask is read on the host), in plain ints for the kernels.
//
// A modality's weight stack has one block when the weight is shared and one block per subset
// that uses k when weights are per subset; so one GEMM per modality serves every subset, and a
// subset that does not use k costs nothing for k.
#pragma once

#include <mmkernels/checks.h>

#include <cstdint>
#include <string>
#include <vector>

namespace mmkernels {

struct FusionPlan {
  int64_t K = 0, B = 0, S = 1;
  bool has_subsets = false;  // the output carries a leading S dim
  bool per_subset = false;   // weights carry a leading S dim
  bool relu = true;
  std::vector<int64_t> dims;      // d_k
  std::vector<int64_t> offsets;   // o_k, into the concatenated feature axis
  std::vector<int64_t> widths;    // output width of a block of modality k (H, or H_k)
  std::vector<uint8_t> uses;      // [S, K]: subset s uses modality k
  std::vector<std::vector<int64_t>> block_subsets;  // per k: subsets owning a block (per_subset)
  std::vector<std::vector<int64_t>> block_of;       // [K][S]: block index of s in k's stack, -1
  std::vector<std::vector<std::vector<int64_t>>> members;  // [K][block]: subsets summed into it

  bool used(int64_t s, int64_t k) const { return uses[s * K + k] != 0; }
  int64_t nblocks(int64_t k) const { return per_subset ? (int64_t)block_subsets[k].size() : 1; }
  bool modality_used(int64_t k) const {
    for (int64_t s = 0; s < S; ++s)
      if (used(s, k)) return true;
    return false;
  }
};

// What the arguments' metadata fixes. widths[k] is the output width of a block of modality
// k: H for concat_project, H_k for project_concat.
struct FusionShape {
  int64_t K = 0;
  c10::SymInt B = 0, S = 1;
  bool has_subsets = false, per_subset = false, relu = true;
  std::vector<c10::SymInt> dims, widths;
};

inline void check_masks(const char* op, FusionShape& s, at::TensorList xs,
                        const c10::optional<at::Tensor>& subset_mask,
                        const c10::optional<at::Tensor>& sample_mask) {
  if (subset_mask.has_value()) {
    const auto& m = *subset_mask;
    check_defined(op, "subset_mask", m);
    MMK_CHECK(m.dim() == 2, op, ": subset_mask must be 2-d [S, K] with K = ", s.K,
              ", got shape ", shape_str(m.sym_sizes()));
    check_mask(op, "subset_mask", m, {m.sym_size(0), c10::SymInt(s.K)},
               "[S, K] with K = len(xs)", xs[0]);
    s.S = m.sym_size(0);
    s.has_subsets = true;
  }
  if (sample_mask.has_value())
    check_mask(op, "sample_mask", *sample_mask, {s.B, c10::SymInt(s.K)},
               "[B, K]: B rows of xs, K = len(xs)", xs[0]);
}

// The part both ops share: the modalities and the activation.
inline FusionShape start_shape(const char* op, at::TensorList xs, const std::string& activation,
                               bool allow_half) {
  FusionShape s;
  s.dims = check_modalities(op, xs, allow_half);
  s.K = (int64_t)xs.size();
  s.B = xs[0].sym_size(0);
  check_activation(op, activation);
  s.relu = activation == "relu";
  return s;
}

// A tensor's sizes without its last dim (the shape of a weight's bias).
inline std::vector<c10::SymInt> drop_last(const at::Tensor& t) {
  const auto sizes = t.sym_sizes();
  return std::vector<c10::SymInt>(sizes.begin(), sizes.end() - 1);
}

inline FusionShape check_concat_project(at::TensorList xs, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        const c10::optional<at::Tensor>& subset_mask,
                                        const c10::optional<at::Tensor>& sample_mask,
                                        const std::string& activation, bool allow_half) {
  const char* op = "concat_project";
  FusionShape s = start_shape(op, xs, activation, allow_half);
  c10::SymInt D = 0;
  for (const auto& d : s.dims) D += d;
  check_same(op, "weight", weight, xs[0], "xs[0]");
  MMK_CHECK(weight.dim() == 2 || weight.dim() == 3, op,
            ": weight must be [H, D] or [S, H, D] with D = sum of modality dims = ", D,
            ", got shape ", shape_str(weight.sym_sizes()));
  MMK_CHECK(weight.sym_size(-1) == D, op,
            ": weight's last dim must be D = sum of modality dims = ", D, ", got shape ",
            shape_str(weight.sym_sizes()));
  check_masks(op, s, xs, subset_mask, sample_mask);
  s.per_subset = weight.dim() == 3;
  if (s.per_subset) {
    MMK_CHECK(s.has_subsets, op, ": a 3-d weight [S, H, D] needs subset_mask [S, K] (got none)");
    MMK_CHECK(weight.sym_size(0) == s.S, op, ": weight has S = ", weight.sym_size(0),
              " subsets, expected S = ", s.S, " (the rows of subset_mask)");
  }
  s.widths.assign(s.K, weight.sym_size(-2));
  if (bias.has_value()) {
    check_same(op, "bias", *bias, xs[0], "xs[0]");
    check_sym_shape(op, "bias", *bias, drop_last(weight),
                    s.per_subset ? "[S, H], from weight" : "[H], from weight");
  }
  return s;
}

inline FusionShape check_project_concat(at::TensorList xs, at::TensorList weights,
                                        at::TensorList biases,  // empty: no biases
                                        const c10::optional<at::Tensor>& subset_mask,
                                        const c10::optional<at::Tensor>& sample_mask,
                                        const std::string& activation, bool allow_half) {
  const char* op = "project_concat";
  FusionShape s = start_shape(op, xs, activation, allow_half);
  MMK_CHECK((int64_t)weights.size() == s.K, op, ": weights must hold K = ", s.K,
            " tensors (one per modality), got ", weights.size());
  check_masks(op, s, xs, subset_mask, sample_mask);
  check_defined(op, "weights[0]", weights[0]);
  const int64_t wdim = weights[0].dim();
  MMK_CHECK(wdim == 2 || wdim == 3, op,
            ": weights[0] must be [H_0, d_0] or [S, H_0, d_0], got shape ",
            shape_str(weights[0].sym_sizes()));
  s.per_subset = wdim == 3;
  if (s.per_subset)
    MMK_CHECK(s.has_subsets, op, ": 3-d weights [S, H_k, d_k] need subset_mask [S, K] (got none)");
  for (int64_t k = 0; k < s.K; ++k) {
    const std::string name = "weights[" + std::to_string(k) + "]";
    const at::Tensor& w = weights[k];
    check_same(op, name, w, xs[0], "xs[0]");
    MMK_CHECK(w.dim() == wdim, op, ": ", name, " must be ", wdim, "-d like weights[0], got shape ",
              shape_str(w.sym_sizes()));
    MMK_CHECK(w.sym_size(-1) == s.dims[k], op, ": ", name, "'s last dim must be d_", k, " = ",
              s.dims[k], " (the width of xs[", k, "]), got shape ", shape_str(w.sym_sizes()));
    if (s.per_subset)
      MMK_CHECK(w.sym_size(0) == s.S, op, ": ", name, " has S = ", w.sym_size(0),
                " subsets, expected S = ", s.S, " (the rows of subset_mask)");
    s.widths.push_back(w.sym_size(-2));
  }
  if (!biases.empty()) {
    MMK_CHECK((int64_t)biases.size() == s.K, op, ": biases must hold K = ", s.K,
              " tensors (one per modality), got ", biases.size());
    for (int64_t k = 0; k < s.K; ++k) {
      const std::string name = "biases[" + std::to_string(k) + "]";
      check_same(op, name, biases[k], xs[0], "xs[0]");
      check_sym_shape(op, name, biases[k], drop_last(weights[k]),
                      "weights[k]'s shape without its last dim");
    }
  }
  return s;
}

// Output of concat_project ([S,] B, H) or project_concat ([S,] B, sum of H_k).
inline std::vector<c10::SymInt> output_shape(const FusionShape& s, bool concat_first) {
  c10::SymInt width = 0;
  if (concat_first) width = s.widths.empty() ? c10::SymInt(0) : s.widths[0];
  else for (const auto& h : s.widths) width += h;
  if (s.has_subsets) return {s.S, s.B, width};
  return {s.B, width};
}

// The backward ops' own arguments: grad_out and out have the forward output's shape.
inline void check_backward(const char* op, c10::SymIntArrayRef expected,
                           const at::Tensor& grad_out, const at::Tensor& out, at::TensorList xs) {
  check_sym_shape(op, "grad_out", grad_out, expected, "the output's shape");
  check_sym_shape(op, "out", out, expected, "the output's shape");
  check_same(op, "grad_out", grad_out, xs[0], "xs[0]");
  check_same(op, "out", out, xs[0], "xs[0]");
}

inline void check_backward(const char* op, const FusionShape& s, bool concat_first,
                           const at::Tensor& grad_out, const at::Tensor& out, at::TensorList xs) {
  check_backward(op, output_shape(s, concat_first), grad_out, out, xs);
}

// ---- the concrete plan -------------------------------------------------------------------------

inline void fill_subsets(FusionPlan& p, const c10::optional<at::Tensor>& subset_mask) {
  p.uses.assign(p.S * p.K, 1);
  // The subset mask is tiny ([S, K]); read on the host it lets a backend plan on the CPU. A
  // mask on another device is not read here (the copy would synchronise with the host): `uses`
  // stays all ones, a superset, and that backend reads the mask on its device (csrc/cuda).
  if (p.has_subsets && subset_mask->is_cpu()) {
    const at::Tensor m = subset_mask->contiguous();
    const bool* ptr = m.data_ptr<bool>();
    for (int64_t i = 0; i < p.S * p.K; ++i) p.uses[i] = ptr[i] ? 1 : 0;
  }
  p.block_subsets.assign(p.K, {});
  p.block_of.assign(p.K, std::vector<int64_t>(p.S, -1));
  p.members.assign(p.K, {});
  for (int64_t k = 0; k < p.K; ++k) {
    if (!p.per_subset) p.members[k].emplace_back();
    for (int64_t s = 0; s < p.S; ++s) {
      if (!p.used(s, k)) continue;
      if (p.per_subset) {
        p.block_of[k][s] = (int64_t)p.block_subsets[k].size();
        p.block_subsets[k].push_back(s);
        p.members[k].push_back({s});
      } else {
        p.block_of[k][s] = 0;
        p.members[k][0].push_back(s);
      }
    }
  }
}

// A checked shape of concrete tensors as a plan. offsets index the concatenated input (concat
// first) or output (project first) feature axis.
inline FusionPlan make_plan(const FusionShape& s, bool concat_first,
                            const c10::optional<at::Tensor>& subset_mask) {
  FusionPlan p;
  p.K = s.K;
  p.B = s.B.expect_int();
  p.S = s.S.expect_int();
  p.has_subsets = s.has_subsets;
  p.per_subset = s.per_subset;
  p.relu = s.relu;
  int64_t off = 0;
  for (int64_t k = 0; k < p.K; ++k) {
    p.dims.push_back(s.dims[k].expect_int());
    p.widths.push_back(s.widths[k].expect_int());
    p.offsets.push_back(off);
    off += concat_first ? p.dims[k] : p.widths[k];
  }
  fill_subsets(p, subset_mask);
  return p;
}

inline FusionPlan plan_concat_project(at::TensorList xs, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias,
                                      const c10::optional<at::Tensor>& subset_mask,
                                      const c10::optional<at::Tensor>& sample_mask,
                                      const std::string& activation, bool allow_half) {
  return make_plan(
      check_concat_project(xs, weight, bias, subset_mask, sample_mask, activation, allow_half),
      true, subset_mask);
}

inline FusionPlan plan_project_concat(at::TensorList xs, at::TensorList weights,
                                      at::TensorList biases,  // empty: no biases
                                      const c10::optional<at::Tensor>& subset_mask,
                                      const c10::optional<at::Tensor>& sample_mask,
                                      const std::string& activation, bool allow_half) {
  return make_plan(
      check_project_concat(xs, weights, biases, subset_mask, sample_mask, activation, allow_half),
      false, subset_mask);
}

// Output width of concat_project (H) or project_concat (sum of H_k).
inline int64_t output_width(const FusionPlan& p, bool concat_first) {
  if (concat_first) return p.widths.empty() ? 0 : p.widths[0];
  int64_t w = 0;
  for (int64_t h : p.widths) w += h;
  return w;
}

inline std::vector<int64_t> output_shape(const FusionPlan& p, bool concat_first) {
  const int64_t width = output_width(p, concat_first);
  if (p.has_subsets) return {p.S, p.B, width};
  return {p.B, width};
}

inline void check_backward(const char* op, const FusionPlan& p, bool concat_first,
                           const at::Tensor& grad_out, const at::Tensor& out, at::TensorList xs) {
  const auto expected = output_shape(p, concat_first);
  check_backward(op, c10::fromIntArrayRefSlow(expected), grad_out, out, xs);
}

}  // namespace mmkernels
