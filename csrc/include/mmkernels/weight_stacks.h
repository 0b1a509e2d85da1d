// Device-agnostic ATen helpers that stack each modality's weight blocks for its one GEMM, and
// scatter the stacked gradients back to the layout the user passed. Shared by every backend.
#pragma once

#include <mmkernels/fusion_plan.h>

#include <ATen/ATen.h>

namespace mmkernels {

// Rows `block_subsets[k]` of a per-subset tensor t ([S, ...]); t itself when shared.
inline at::Tensor pick_blocks(const FusionPlan& p, const at::Tensor& t, int64_t k) {
  if (!p.per_subset) return t;
  const auto idx = at::tensor(p.block_subsets[k], at::kLong).to(t.device());
  return t.index_select(0, idx);
}

// concat_project: the column block W[..., o_k : o_k + d_k] of every block, as [nblocks * H, d_k].
inline at::Tensor concat_weight_stack(const FusionPlan& p, const at::Tensor& weight, int64_t k) {
  const at::Tensor blocks = pick_blocks(p, weight, k).narrow(-1, p.offsets[k], p.dims[k]);
  return blocks.reshape({p.nblocks(k) * p.widths[k], p.dims[k]});
}

// project_concat: weights[k] ([nblocks * H_k, d_k]) or biases[k] ([nblocks * H_k]) stacked.
inline at::Tensor project_stack(const FusionPlan& p, const at::Tensor& t, int64_t k) {
  const at::Tensor blocks = pick_blocks(p, t, k);
  // Explicit sizes, not -1: a reshape cannot infer a dim of a tensor with no elements.
  const int64_t rows = p.nblocks(k) * p.widths[k];
  if (t.dim() == (p.per_subset ? 3 : 2)) return blocks.reshape({rows, t.size(-1)});
  return blocks.reshape({rows});
}

// Inverse of concat_weight_stack for gradients: [S, H, D] or [H, D] in weight's dtype.
inline at::Tensor concat_unstack(const FusionPlan& p, const std::vector<at::Tensor>& stacks,
                                 const at::Tensor& weight) {
  at::Tensor full = at::zeros(weight.sizes(), stacks.empty() ? weight.options()
                                                              : stacks[0].options());
  const int64_t H = p.widths[0];
  for (int64_t k = 0; k < p.K; ++k) {
    if (!stacks[k].defined() || stacks[k].numel() == 0) continue;
    if (!p.per_subset) {
      full.narrow(1, p.offsets[k], p.dims[k]).copy_(stacks[k]);
      continue;
    }
    for (int64_t j = 0; j < p.nblocks(k); ++j)
      full[p.block_subsets[k][j]].narrow(1, p.offsets[k], p.dims[k])
          .copy_(stacks[k].narrow(0, j * H, H));
  }
  return full.to(weight.scalar_type());
}

// Inverse of project_stack for gradients: a fresh contiguous tensor of like's shape and dtype
// (contiguous whatever like's strides: the Meta kernels promise that layout).
inline at::Tensor project_unstack(const FusionPlan& p, const at::Tensor& stacked,
                                  const at::Tensor& like, int64_t k) {
  if (!p.modality_used(k)) return at::zeros(like.sizes(), like.options());
  // copy=true: bias gradients are slices of one buffer and must not alias each other.
  if (!p.per_subset) {
    // A strided stack (the CPU engine's float32 weight gradients) is copied contiguous.
    const at::Tensor s = stacked.reshape(like.sizes());
    return s.is_contiguous() ? s.to(like.scalar_type(), false, true)
                             : s.contiguous().to(like.scalar_type());
  }
  at::Tensor full = at::zeros(like.sizes(), stacked.options());
  const int64_t Hk = p.widths[k];
  for (int64_t j = 0; j < p.nblocks(k); ++j)
    full[p.block_subsets[k][j]].copy_(stacked.narrow(0, j * Hk, Hk).view(like.sizes().slice(1)));
  return full.to(like.scalar_type());
}

}  // namespace mmkernels
