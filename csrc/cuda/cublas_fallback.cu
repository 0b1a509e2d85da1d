// The cuBLAS fallback of concat_project / project_concat on CUDA (MMKERNELS_CUDA_BACKEND=cublas,
// and devices below sm_80, where the fused kernels' mma.sync and cp.async do not exist).
//
// It reads the subset mask and the sample mask's column sums on the host and copies its
// subset tables to the device, so unlike the fused path (csrc/cuda/*_cuda.cpp) it synchronises
// with the host and cannot be captured in a CUDA graph.
//
// Same algorithm as the CPU backend: per modality one GEMM against the stack of its weight
// blocks (cuBLAS through ATen: tensor cores for 16-bit inputs with a float32 result, TF32 for
// float32 when torch's matmul precision allows it), skipped for modalities no subset or no
// sample uses; then one epilogue kernel that applies the masks, sums the modalities in float32,
// adds the bias and applies the activation. No concatenation is ever built. The backward
// builds R_k (gradient w.r.t. each GEMM result) with one kernel per modality, then two GEMMs.
#include "cublas_fallback.h"
#include "cublas_epilogues.cuh"

#include <mmkernels/accumulation.h>
#include <mmkernels/fusion_plan.h>
#include <mmkernels/memory_budget.h>
#include <mmkernels/weight_stacks.h>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace mmkernels::cuda::cublas {
namespace {

constexpr int kThreads = 256;

int64_t grid_for(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 8));
}


// The plan's subset tables from a host copy of the mask (a synchronising copy).
void read_subsets(FusionPlan& p, const c10::optional<at::Tensor>& subset_mask) {
  if (subset_mask.has_value()) fill_subsets(p, subset_mask->to(at::kCPU));
}

void check_modality_count(const char* op, const FusionPlan& p) {
  MMK_CHECK(p.K <= kMaxModalities, op, ": at most ", kMaxModalities,
            " modalities are supported on CUDA, got K = ", p.K);
}

// a @ b with the result in the accumulation dtype: 16-bit inputs use tensor cores and a
// float32 result, so the modalities are summed in float32, never in 16 bits.
at::Tensor gemm_acc(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  if (a.scalar_type() == acc) return at::mm(a, b);
  return at::mm(a, b, acc);
}

// Modality k has a subset that uses it and a sample that has it.
std::vector<bool> live_modalities(const FusionPlan& p,
                                  const c10::optional<at::Tensor>& sample_mask) {
  at::Tensor any;
  if (sample_mask.has_value() && p.B > 0) any = sample_mask->any(0).cpu();
  std::vector<bool> live(p.K);
  for (int64_t k = 0; k < p.K; ++k)
    live[k] = p.modality_used(k) && (!any.defined() || any[k].item<bool>());
  return live;
}

// The plan's subset tables on the device; the tensors keep the memory alive.
struct DeviceSubsets {
  at::Tensor block_of, block_base, member_start, member_subset;
  SubsetTable table(int64_t S) const {
    return {block_of.data_ptr<int32_t>(), block_base.data_ptr<int32_t>(),
            member_start.data_ptr<int32_t>(), member_subset.data_ptr<int32_t>(), S};
  }
};

DeviceSubsets device_subsets(const FusionPlan& p, const at::Device& device, SubsetTable& table) {
  std::vector<int32_t> block_of(p.K * p.S), base(p.K), start{0}, members;
  for (int64_t k = 0; k < p.K; ++k) {
    base[k] = static_cast<int32_t>(start.size() - 1);
    for (int64_t s = 0; s < p.S; ++s) block_of[k * p.S + s] = static_cast<int32_t>(p.block_of[k][s]);
    for (int64_t j = 0; j < p.nblocks(k); ++j) {
      for (int64_t s = 0; s < p.S; ++s)
        if (p.block_of[k][s] == j) members.push_back(static_cast<int32_t>(s));
      start.push_back(static_cast<int32_t>(members.size()));
    }
  }
  members.push_back(0);  // never read; keeps the tensor non-empty
  auto to_dev = [&](const std::vector<int32_t>& v) {
    return at::tensor(v, at::kInt).to(device, /*non_blocking=*/false);
  };
  DeviceSubsets d{to_dev(block_of), to_dev(base), to_dev(start), to_dev(members)};
  table = d.table(p.S);
  return d;
}

const bool* mask_data(const c10::optional<at::Tensor>& m, at::Tensor& holder) {
  if (!m.has_value()) return nullptr;
  holder = m->contiguous();
  return holder.data_ptr<bool>();
}

// The forward GEMMs: T_k = x_k @ stack_k^T for the live modalities.
template <typename acc_t>
ModalityTable<acc_t> forward_gemms(const FusionPlan& p, at::TensorList xs,
                                   const std::vector<at::Tensor>& stacks,
                                   const std::vector<bool>& live, bool concat_first,
                                   std::vector<at::Tensor>& T) {
  ModalityTable<acc_t> t{};
  t.K = static_cast<int>(p.K);
  T.assign(p.K, at::Tensor());
  for (int64_t k = 0; k < p.K; ++k) {
    t.width[k] = p.widths[k];
    t.offset[k] = concat_first ? 0 : p.offsets[k];
    if (!live[k]) continue;
    T[k] = gemm_acc(xs[k], stacks[k].t(), accumulation_dtype(xs[0].scalar_type()));
    t.data[k] = T[k].data_ptr<acc_t>();
    t.ld[k] = T[k].size(1);
  }
  return t;
}

// x_k with its absent rows selected to zero (on the device, no host sync): R_k is zero in
// those rows, but 0 * NaN is NaN, so grad_W = R_k^T x_k must not multiply them (issue 12.1).
at::Tensor present_rows(const at::Tensor& x, const c10::optional<at::Tensor>& sample_mask,
                        int64_t k) {
  if (!sample_mask.has_value()) return x;
  return at::where(sample_mask->select(1, k).unsqueeze(1), x, at::zeros({}, x.options()));
}

struct Grads {
  std::vector<at::Tensor> grad_x, grad_stack, R;
};

// The backward: R_k from grad_out, then grad_x_k = R_k @ stack_k and grad_stack_k = R_k^T @ x_k.
template <typename scalar_t>
Grads backward_gemms(const FusionPlan& p, const at::Tensor& grad_out, const at::Tensor& out,
                     at::TensorList xs, const std::vector<at::Tensor>& stacks,
                     const c10::optional<at::Tensor>& sample_mask, bool concat_first,
                     bool need_x, bool need_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = accumulation_dtype(xs[0].scalar_type());
  const auto live = live_modalities(p, sample_mask);
  SubsetTable st{};
  const auto subsets = device_subsets(p, xs[0].device(), st);
  at::Tensor mask_holder;
  const bool* mask = mask_data(sample_mask, mask_holder);
  const at::Tensor g = grad_out.contiguous(), o = out.contiguous();
  const int64_t row_width = output_width(p, concat_first);
  auto stream = c10::cuda::getCurrentCUDAStream();

  Grads res;
  res.R.assign(p.K, at::Tensor());
  ModalityTable<acc_t> r{};
  r.K = static_cast<int>(p.K);
  for (int64_t k = 0; k < p.K; ++k) {
    r.width[k] = p.widths[k];
    r.offset[k] = concat_first ? 0 : p.offsets[k];
    if (!live[k]) continue;
    res.R[k] = at::empty({p.B, stacks[k].size(0)}, xs[0].options().dtype(acc));
    r.data[k] = res.R[k].data_ptr<acc_t>();
    r.ld[k] = res.R[k].size(1);
  }
  for (int64_t k = 0; k < p.K; ++k) {
    if (!live[k] || res.R[k].numel() == 0) continue;
    build_grad_kernel<scalar_t, acc_t><<<grid_for(res.R[k].numel()), kThreads, 0, stream>>>(
        r, static_cast<int>(k), st, mask, g.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), p.B,
        row_width, p.relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (int64_t k = 0; k < p.K; ++k) {
    const auto acc_opts = xs[k].options().dtype(acc);
    if (need_x)
      res.grad_x.push_back(live[k] ? at::mm(res.R[k], stacks[k].to(acc)).to(xs[k].scalar_type())
                                   : at::zeros_like(xs[k]));
    res.grad_stack.push_back(
        need_w && live[k] ? at::mm(res.R[k].t(), present_rows(xs[k], sample_mask, k).to(acc))
                          : at::zeros({stacks[k].size(0), p.dims[k]}, acc_opts));
  }
  return res;
}

// ---- concat_project ----------------------------------------------------------------------------

std::vector<at::Tensor> concat_stacks(const FusionPlan& p, const at::Tensor& weight) {
  std::vector<at::Tensor> stacks;
  for (int64_t k = 0; k < p.K; ++k)
    stacks.push_back(p.modality_used(k) ? concat_weight_stack(p, weight, k)
                                        : weight.new_empty({0, p.dims[k]}));
  return stacks;
}

template <typename scalar_t>
at::Tensor concat_forward(const FusionPlan& p, at::TensorList xs, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& sample_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor out = at::empty(output_shape(p, true), xs[0].options());
  if (out.numel() == 0) return out;
  std::vector<at::Tensor> T;
  const auto table = forward_gemms<acc_t>(p, xs, concat_stacks(p, weight),
                                          live_modalities(p, sample_mask), true, T);
  SubsetTable st{};
  const auto subsets = device_subsets(p, xs[0].device(), st);
  at::Tensor bias_acc, mask_holder;
  if (bias.has_value()) bias_acc = bias->to(accumulation_dtype(xs[0].scalar_type())).contiguous();
  const int64_t H = p.widths[0];
  concat_forward_kernel<scalar_t, acc_t>
      <<<grid_for(out.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          table, st, mask_data(sample_mask, mask_holder),
          bias_acc.defined() ? bias_acc.data_ptr<acc_t>() : nullptr, p.per_subset ? H : 0,
          out.data_ptr<scalar_t>(), p.B, H, p.relu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

at::Tensor concat_project(at::TensorList xs, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& subset_mask,
                               const c10::optional<at::Tensor>& sample_mask,
                               c10::string_view activation) {
  auto p = plan_concat_project(xs, weight, bias, subset_mask, sample_mask,
                                     std::string(activation), /*allow_half=*/true);
  read_subsets(p, subset_mask);
  check_modality_count("concat_project", p);
  check_fused_budget("concat_project", p, true, false, xs, weight.numel(), true, sample_mask);
  const c10::cuda::CUDAGuard guard(xs[0].device());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(),
                                         "concat_project_cuda", [&] {
    return concat_forward<scalar_t>(p, xs, weight, bias, sample_mask);
  });
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> concat_project_backward(
    const at::Tensor& grad_out, const at::Tensor& out, at::TensorList xs, const at::Tensor& weight,
    const c10::optional<at::Tensor>& subset_mask, const c10::optional<at::Tensor>& sample_mask,
    c10::string_view activation, std::array<bool, 3> output_mask) {
  const char* op = "concat_project_backward";
  auto p = plan_concat_project(xs, weight, c10::nullopt, subset_mask, sample_mask,
                                     std::string(activation), /*allow_half=*/true);
  read_subsets(p, subset_mask);
  check_modality_count(op, p);
  check_backward(op, p, true, grad_out, out, xs);
  check_fused_budget(op, p, true, true, xs, weight.numel(),
                     grad_out.is_contiguous() && out.is_contiguous(), sample_mask);
  const c10::cuda::CUDAGuard guard(xs[0].device());
  const auto stacks = concat_stacks(p, weight);
  Grads res = AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(),
                                              "concat_project_backward_cuda", [&] {
    return backward_gemms<scalar_t>(p, grad_out, out, xs, stacks, sample_mask, true,
                                    output_mask[0], output_mask[1]);
  });
  at::Tensor grad_w = weight.new_empty({0}), grad_b = weight.new_empty({0});
  if (output_mask[1]) grad_w = concat_unstack(p, res.grad_stack, weight);
  if (output_mask[2]) {
    // The bias sees every row, present or not: sum act'(out) * grad_out over the batch.
    const auto acc = accumulation_dtype(xs[0].scalar_type());
    at::Tensor dz = grad_out.to(acc);
    if (p.relu) dz = dz * out.gt(0);
    at::Tensor gb = dz.sum(-2);
    if (p.has_subsets && !p.per_subset) gb = gb.sum(0);
    grad_b = gb.to(weight.scalar_type());
  }
  return {output_mask[0] ? res.grad_x : std::vector<at::Tensor>{}, grad_w, grad_b};
}

namespace {

// ---- project_concat ----------------------------------------------------------------------------

std::vector<at::Tensor> project_stacks(const FusionPlan& p, at::TensorList weights) {
  std::vector<at::Tensor> stacks;
  for (int64_t k = 0; k < p.K; ++k)
    stacks.push_back(p.modality_used(k) ? project_stack(p, weights[k], k)
                                        : weights[k].new_empty({0, p.dims[k]}));
  return stacks;
}

template <typename scalar_t>
at::Tensor project_forward(const FusionPlan& p, at::TensorList xs, at::TensorList weights,
                           at::TensorList biases, const c10::optional<at::Tensor>& sample_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor out = at::empty(output_shape(p, false), xs[0].options());
  if (out.numel() == 0) return out;
  const auto live = live_modalities(p, sample_mask);
  std::vector<at::Tensor> T, bias_acc(p.K);
  const auto table = forward_gemms<acc_t>(p, xs, project_stacks(p, weights), live, false, T);
  ModalityTable<acc_t> bias_table{};
  bias_table.K = static_cast<int>(p.K);
  for (int64_t k = 0; k < p.K; ++k)
    if (!biases.empty() && live[k]) {
      bias_acc[k] = project_stack(p, biases[k], k).to(accumulation_dtype(xs[0].scalar_type())).contiguous();
      bias_table.data[k] = bias_acc[k].data_ptr<acc_t>();
    }
  SubsetTable st{};
  const auto subsets = device_subsets(p, xs[0].device(), st);
  at::Tensor mask_holder;
  project_forward_kernel<scalar_t, acc_t>
      <<<grid_for(out.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          table, st, mask_data(sample_mask, mask_holder), bias_table, out.data_ptr<scalar_t>(),
          p.B, output_width(p, false), p.relu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

at::Tensor project_concat(at::TensorList xs, at::TensorList weights, at::TensorList biases,
                               const c10::optional<at::Tensor>& subset_mask,
                               const c10::optional<at::Tensor>& sample_mask,
                               c10::string_view activation) {
  auto p = plan_project_concat(xs, weights, biases, subset_mask, sample_mask,
                                     std::string(activation), /*allow_half=*/true);
  read_subsets(p, subset_mask);
  check_modality_count("project_concat", p);
  check_fused_budget("project_concat", p, false, false, xs, 0, true, sample_mask);
  const c10::cuda::CUDAGuard guard(xs[0].device());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(),
                                         "project_concat_cuda", [&] {
    return project_forward<scalar_t>(p, xs, weights, biases, sample_mask);
  });
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
project_concat_backward(const at::Tensor& grad_out, const at::Tensor& out, at::TensorList xs,
                             at::TensorList weights, const c10::optional<at::Tensor>& subset_mask,
                             const c10::optional<at::Tensor>& sample_mask,
                             c10::string_view activation, std::array<bool, 3> output_mask) {
  const char* op = "project_concat_backward";
  auto p = plan_project_concat(xs, weights, {}, subset_mask, sample_mask,
                                     std::string(activation), /*allow_half=*/true);
  read_subsets(p, subset_mask);
  check_modality_count(op, p);
  check_backward(op, p, false, grad_out, out, xs);
  int64_t weight_numel = 0;
  for (const auto& w : weights) weight_numel += w.numel();
  check_fused_budget(op, p, false, true, xs, weight_numel,
                     grad_out.is_contiguous() && out.is_contiguous(), sample_mask);
  const c10::cuda::CUDAGuard guard(xs[0].device());
  const auto stacks = project_stacks(p, weights);
  Grads res = AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(),
                                              "project_concat_backward_cuda", [&] {
    return backward_gemms<scalar_t>(p, grad_out, out, xs, stacks, sample_mask, false,
                                    output_mask[0], output_mask[1]);
  });
  std::vector<at::Tensor> grad_ws, grad_bs;
  for (int64_t k = 0; k < p.K; ++k) {
    if (output_mask[1]) grad_ws.push_back(project_unstack(p, res.grad_stack[k], weights[k], k));
    if (output_mask[2]) {
      std::vector<int64_t> bshape(weights[k].sizes().begin(), weights[k].sizes().end() - 1);
      const at::Tensor like = weights[k].new_empty(bshape);
      const at::Tensor stacked = res.R[k].defined()
                                     ? res.R[k].sum(0)
                                     : at::zeros({p.nblocks(k) * p.widths[k]},
                                                 xs[0].options().dtype(accumulation_dtype(xs[0].scalar_type())));
      grad_bs.push_back(project_unstack(p, stacked, like, k));
    }
  }
  return {output_mask[0] ? res.grad_x : std::vector<at::Tensor>{}, grad_ws, grad_bs};
}

}  // namespace mmkernels::cuda::cublas
