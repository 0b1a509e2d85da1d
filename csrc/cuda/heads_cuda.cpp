// mmkernels::gram, mmkernels::softmax_regression_loss_grad and mmkernels::lbfgs_direction on
// CUDA: the argument checks of the shared plans (csrc/include/mmkernels/heads_plan.h and
// lbfgs_plan.h, also run by the CPU and Meta kernels), then the kernels of csrc/cuda/gram.cuh,
// softmax_regression.cuh and lbfgs.cuh. No host sync: every conversion is a device op, the
// kernels read subset_index, the labels and every scalar of the recursion on the device.
#include "fused_op_common.h"
#include "heads_api.h"

#include <mmkernels/heads_plan.h>
#include <mmkernels/lbfgs_plan.h>
#include <mmkernels/memory_budget.h>

#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

namespace mmkernels::cuda {
namespace {

void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  MMK_CHECK(t.device().is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

// z with unit stride along H (the kernels' one layout requirement; any other strides are fine).
at::Tensor unit_rows(const at::Tensor& z) {
  return z.size(2) <= 1 || z.stride(2) == 1 ? z : z.contiguous();
}

std::tuple<at::Tensor, at::Tensor> gram_cuda(const at::Tensor& z_in, const at::Tensor& y) {
  const char* op = "mmkernels::gram";
  const GramPlan plan = gram_plan(z_in, y);
  check_cuda(op, "z", z_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = unit_rows(z_in);
  const auto acc = plan.acc;
  const int64_t S = z.size(0), n = z.size(1), H = z.size(2);
  const at::Tensor y2 = (y.dim() == 1 ? y.unsqueeze(1) : y).to(acc).contiguous();
  const int64_t T = y2.size(1);
  GramProblem f;
  f.dtype = (int32_t)dtype_code(z.scalar_type());
  f.S = S;
  f.n = n;
  f.H = H;
  f.T = T;
  f.z = z.data_ptr();
  f.z_ss = z.stride(0);
  f.z_ld = z.stride(1);
  f.y = y2.data_ptr();
  f.num_sms = device_attribute(cudaDevAttrMultiProcessorCount, z);
  const int64_t ws_elems = gram_kernels_workspace_elems(f);
  {
    const double a = (double)c10::elementSize(acc), H1 = (double)H + 1;
    const double copies = (double)(z.data_ptr() != z_in.data_ptr()) * (double)z.nbytes();
    check_memory_budget(op, a * ((double)S * H1 * (H1 + (double)T) + (double)n * T +
                                 (double)ws_elems) + copies,
                        z.device(), "the Gram matrices [S, H+1, H+1] of z " + shape_str(z.sizes()));
  }
  at::Tensor G = at::empty_symint(plan.gram_shape(), z.options().dtype(acc));
  at::Tensor R = at::empty_symint(plan.rhs_shape(), z.options().dtype(acc));
  if (S == 0) return {G, R};
  at::Tensor ws = at::empty({std::max<int64_t>(ws_elems, 1)}, z.options().dtype(acc));
  f.G = G.data_ptr();
  f.R = R.data_ptr();
  f.workspace = ws.data_ptr();
  launch_gram_kernels(f, stream_of(ws));
  return {G, R};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_regression_loss_grad_cuda(
    const at::Tensor& z_in, const at::Tensor& y, const at::Tensor& w, const at::Tensor& b,
    const c10::optional<at::Tensor>& sample_weight, double l2,
    const c10::optional<at::Tensor>& subset_index) {
  const char* op = "mmkernels::softmax_regression_loss_grad";
  const SoftmaxPlan plan = softmax_plan(z_in, y, w, b, sample_weight, l2, subset_index);
  check_cuda(op, "z", z_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const auto acc = plan.compute;
  const int64_t C = w.size(2), K = w.size(0);
  MMK_CHECK(C <= softmax_kernels_max_classes(dtype_code(acc)), op, ": at most ",
            softmax_kernels_max_classes(dtype_code(acc)), " classes in ", acc,
            " on CUDA (the logits of one row must fit in shared memory), got C = ", C);
  // The kernel reads z in the compute dtype, or bfloat16 z for float32: other mixes are
  // converted first (only the picked subsets, when fewer than all are picked).
  at::Tensor z = z_in;
  c10::optional<at::Tensor> index = subset_index;
  double copies = 0;
  const bool direct = z.scalar_type() == acc || (z.scalar_type() == at::kBFloat16 && acc == at::kFloat);
  if (!direct) {
    if (index.has_value() && K < z.size(0)) {
      z = z.index_select(0, *index);
      index = c10::nullopt;
      copies += (double)z.nbytes();
    }
    z = z.to(acc);
    copies += (double)z.nbytes();
  }
  if (!(z.size(2) <= 1 || z.stride(2) == 1)) {
    z = z.contiguous();
    copies += (double)z.nbytes();
  }
  const at::Tensor wc = w.contiguous(), bc = b.contiguous(), yc = y.contiguous();
  at::Tensor sw, ic;
  if (sample_weight.has_value()) sw = sample_weight->to(acc).contiguous();
  if (index.has_value()) ic = index->contiguous();
  SoftmaxProblem f;
  f.dtype = (int32_t)dtype_code(z.scalar_type());
  f.acc = (int32_t)dtype_code(acc);
  f.S = z.size(0);
  f.n = z.size(1);
  f.H = z.size(2);
  f.K = K;
  f.C = C;
  f.z = z.data_ptr();
  f.z_ss = z.stride(0);
  f.z_ld = z.stride(1);
  f.y = yc.data_ptr<int64_t>();
  f.w = wc.data_ptr();
  f.b = bc.data_ptr();
  f.sw = sw.defined() ? sw.data_ptr() : nullptr;
  f.subset_index = ic.defined() ? ic.data_ptr<int64_t>() : nullptr;
  f.l2 = l2;
  f.num_sms = device_attribute(cudaDevAttrMultiProcessorCount, z);
  const int64_t ws_elems = softmax_kernels_workspace_elems(f);
  {
    const double a = (double)c10::elementSize(acc);
    const double outs = (double)K * ((double)f.H * C + C + 1);
    check_memory_budget(op, copies + a * (outs + (double)ws_elems + (double)f.n), z.device(),
                        "z " + shape_str(z_in.sizes()) + " and w " + shape_str(w.sizes()));
  }
  const auto opts = w.options().dtype(acc);
  at::Tensor loss = at::empty({K}, opts), gw = at::empty({K, f.H, C}, opts),
             gb = at::empty({K, C}, opts);
  if (K == 0) return {loss, gw, gb};
  at::Tensor ws = at::empty({std::max<int64_t>(ws_elems, 1)}, opts);
  f.loss = loss.data_ptr();
  f.grad_w = gw.data_ptr();
  f.grad_b = gb.data_ptr();
  f.workspace = ws.data_ptr();
  launch_softmax_kernels(f, stream_of(ws));
  return {loss, gw, gb};
}

at::Tensor lbfgs_direction_cuda(const at::Tensor& grad, at::TensorList s, at::TensorList y,
                                at::TensorList rho, const at::Tensor& gamma,
                                const c10::optional<at::Tensor>& diag,
                                const c10::optional<at::Tensor>& rows) {
  const char* op = "mmkernels::lbfgs_direction";
  const LbfgsPlan plan = lbfgs_direction_plan(grad, s, y, rho, gamma, diag, rows);
  check_cuda(op, "grad", grad);
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t k = grad.size(0), P = grad.size(1), m = plan.m;
  LbfgsProblem f;
  f.dtype = (int32_t)dtype_code(grad.scalar_type());
  f.k = k;
  f.P = P;
  f.m = m;
  f.num_sms = device_attribute(cudaDevAttrMultiProcessorCount, grad);
  const int64_t ws_elems = lbfgs_kernels_workspace_elems(f);
  {
    // What the call allocates, checked before any of it: the output, the alphas' workspace
    // and contiguous copies of the inputs that are not.
    double copies = 0;
    auto count = [&](const at::Tensor& t) {
      if (!t.is_contiguous()) copies += (double)t.nbytes();
    };
    count(grad);
    count(gamma);
    if (diag.has_value()) count(*diag);
    if (rows.has_value()) count(*rows);
    for (int64_t j = 0; j < m; ++j) {
      count(s[j]);
      count(y[j]);
      count(rho[j]);
    }
    check_memory_budget(op, copies + (double)grad.element_size() * ((double)k * P + ws_elems),
                        grad.device(), "the direction " + shape_str(grad.sizes()) + " from " +
                                           std::to_string(m) + " pairs");
  }
  at::Tensor out = at::empty({k, P}, grad.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  Keep keep;
  std::vector<const void*> sp(m), yp(m), rp(m);
  std::vector<int64_t> rows_n(m);
  for (int64_t j = 0; j < m; ++j) {
    sp[j] = keep.dense(s[j]).data_ptr();
    yp[j] = keep.dense(y[j]).data_ptr();
    rp[j] = keep.dense(rho[j]).data_ptr();
    rows_n[j] = s[j].size(0);
  }
  if (rows.has_value()) {
    f.rows = keep.dense(*rows).data_ptr<int64_t>();
    f.rows_n = rows_n.data();
  }
  f.grad = keep.dense(grad).data_ptr();
  f.s = sp.data();
  f.y = yp.data();
  f.rho = rp.data();
  f.gamma = keep.dense(gamma).data_ptr();
  f.diag = diag.has_value() ? keep.dense(*diag).data_ptr() : nullptr;
  f.out = out.data_ptr();
  at::Tensor ws = at::empty({std::max<int64_t>(ws_elems, 1)}, out.options());
  f.workspace = ws.data_ptr();
  launch_lbfgs_kernels(f, stream_of(out));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("gram", &gram_cuda);
  m.impl("softmax_regression_loss_grad", &softmax_regression_loss_grad_cuda);
  m.impl("lbfgs_direction", &lbfgs_direction_cuda);
}

}  // namespace mmkernels::cuda
