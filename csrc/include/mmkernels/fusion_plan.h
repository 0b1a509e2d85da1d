// Shape logic of the two fused ops, shared by every backend: validates the arguments once and
// describes, for each modality k, the stack of weight blocks it is multiplied with.
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

inline void check_masks(const char* op, FusionPlan& p, at::TensorList xs,
                        const c10::optional<at::Tensor>& subset_mask,
                        const c10::optional<at::Tensor>& sample_mask) {
  if (subset_mask.has_value()) {
    const auto& m = *subset_mask;
    check_defined(op, "subset_mask", m);
    MMK_CHECK(m.dim() == 2, op, ": subset_mask must be 2-d [S, K] with K = ", p.K,
              ", got shape ", shape_str(m.sizes()));
    check_mask(op, "subset_mask", m, {m.size(0), p.K}, "[S, K] with K = len(xs)", xs[0]);
    p.S = m.size(0);
    p.has_subsets = true;
  }
  if (sample_mask.has_value())
    check_mask(op, "sample_mask", *sample_mask, {p.B, p.K}, "[B, K]: B rows of xs, K = len(xs)",
               xs[0]);
}

// The part of a plan both ops share: the modalities and the activation.
inline FusionPlan start_plan(const char* op, at::TensorList xs, const std::string& activation,
                             bool allow_half) {
  FusionPlan p;
  p.dims = check_modalities(op, xs, allow_half);
  p.K = (int64_t)xs.size();
  p.B = xs[0].size(0);
  check_activation(op, activation);
  p.relu = activation == "relu";
  return p;
}

inline FusionPlan plan_concat_project(at::TensorList xs, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias,
                                      const c10::optional<at::Tensor>& subset_mask,
                                      const c10::optional<at::Tensor>& sample_mask,
                                      const std::string& activation, bool allow_half) {
  const char* op = "concat_project";
  FusionPlan p = start_plan(op, xs, activation, allow_half);
  int64_t D = 0;
  for (int64_t d : p.dims) {
    p.offsets.push_back(D);
    D += d;
  }
  check_same(op, "weight", weight, xs[0], "xs[0]");
  MMK_CHECK(weight.dim() == 2 || weight.dim() == 3, op,
            ": weight must be [H, D] or [S, H, D] with D = sum of modality dims = ", D,
            ", got shape ", shape_str(weight.sizes()));
  MMK_CHECK(weight.size(-1) == D, op, ": weight's last dim must be D = sum of modality dims = ", D,
            ", got shape ", shape_str(weight.sizes()));
  check_masks(op, p, xs, subset_mask, sample_mask);
  p.per_subset = weight.dim() == 3;
  if (p.per_subset) {
    MMK_CHECK(p.has_subsets, op, ": a 3-d weight [S, H, D] needs subset_mask [S, K] (got none)");
    MMK_CHECK(weight.size(0) == p.S, op, ": weight has S = ", weight.size(0),
              " subsets, expected S = ", p.S, " (the rows of subset_mask)");
  }
  const int64_t H = weight.size(-2);
  p.widths.assign(p.K, H);
  if (bias.has_value()) {
    check_same(op, "bias", *bias, xs[0], "xs[0]");
    std::vector<int64_t> expected(weight.sizes().begin(), weight.sizes().end() - 1);
    check_shape(op, "bias", *bias, expected, p.per_subset ? "[S, H], from weight" : "[H], from weight");
  }
  fill_subsets(p, subset_mask);
  return p;
}

inline FusionPlan plan_project_concat(at::TensorList xs, at::TensorList weights,
                                      at::TensorList biases,  // empty: no biases
                                      const c10::optional<at::Tensor>& subset_mask,
                                      const c10::optional<at::Tensor>& sample_mask,
                                      const std::string& activation, bool allow_half) {
  const char* op = "project_concat";
  FusionPlan p = start_plan(op, xs, activation, allow_half);
  MMK_CHECK((int64_t)weights.size() == p.K, op, ": weights must hold K = ", p.K,
            " tensors (one per modality), got ", weights.size());
  check_masks(op, p, xs, subset_mask, sample_mask);
  check_defined(op, "weights[0]", weights[0]);
  const int64_t wdim = weights[0].dim();
  MMK_CHECK(wdim == 2 || wdim == 3, op, ": weights[0] must be [H_0, d_0] or [S, H_0, d_0], got shape ",
            shape_str(weights[0].sizes()));
  p.per_subset = wdim == 3;
  if (p.per_subset)
    MMK_CHECK(p.has_subsets, op, ": 3-d weights [S, H_k, d_k] need subset_mask [S, K] (got none)");
  int64_t off = 0;
  for (int64_t k = 0; k < p.K; ++k) {
    const std::string name = "weights[" + std::to_string(k) + "]";
    const at::Tensor& w = weights[k];
    check_same(op, name, w, xs[0], "xs[0]");
    MMK_CHECK(w.dim() == wdim, op, ": ", name, " must be ", wdim, "-d like weights[0], got shape ",
              shape_str(w.sizes()));
    MMK_CHECK(w.size(-1) == p.dims[k], op, ": ", name, "'s last dim must be d_", k, " = ",
              p.dims[k], " (the width of xs[", k, "]), got shape ", shape_str(w.sizes()));
    if (p.per_subset)
      MMK_CHECK(w.size(0) == p.S, op, ": ", name, " has S = ", w.size(0),
                " subsets, expected S = ", p.S, " (the rows of subset_mask)");
    p.widths.push_back(w.size(-2));
    p.offsets.push_back(off);
    off += w.size(-2);
  }
  if (!biases.empty()) {
    MMK_CHECK((int64_t)biases.size() == p.K, op, ": biases must hold K = ", p.K,
              " tensors (one per modality), got ", biases.size());
    for (int64_t k = 0; k < p.K; ++k) {
      const std::string name = "biases[" + std::to_string(k) + "]";
      check_same(op, name, biases[k], xs[0], "xs[0]");
      std::vector<int64_t> expected(weights[k].sizes().begin(), weights[k].sizes().end() - 1);
      check_shape(op, name, biases[k], expected, "weights[k]'s shape without its last dim");
    }
  }
  fill_subsets(p, subset_mask);
  return p;
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

// The backward ops' own arguments: grad_out and out have the forward output's shape.
inline void check_backward(const char* op, const FusionPlan& p, bool concat_first,
                           const at::Tensor& grad_out, const at::Tensor& out, at::TensorList xs) {
  const auto expected = output_shape(p, concat_first);
  check_shape(op, "grad_out", grad_out, expected, "the output's shape");
  check_shape(op, "out", out, expected, "the output's shape");
  check_same(op, "grad_out", grad_out, xs[0], "xs[0]");
  check_same(op, "out", out, xs[0], "xs[0]");
}

}  // namespace mmkernels
