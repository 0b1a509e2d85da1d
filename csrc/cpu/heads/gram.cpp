// mmkernels::gram on the CPU: batched, intercept-augmented Gram matrices for the ridge refits
// of mmkernels/heads.py.
#include <mmkernels/heads_plan.h>
#include <mmkernels/memory_budget.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace mmkernels::cpu {
namespace {

// G[s] = [Z_s 1]^T [Z_s 1]  ([S, H+1, H+1]) and R[s] = [Z_s 1]^T Y  ([S, H+1, T]).
std::tuple<at::Tensor, at::Tensor> gram_cpu(const at::Tensor& z, const at::Tensor& y) {
  const char* op = "mmkernels::gram";
  const GramPlan plan = gram_plan(z, y);
  MMK_CHECK(z.device().is_cpu(), op, ": z must be a CPU tensor, got ", z.device());
  const int64_t S = z.size(0), n = z.size(1), H = z.size(2);
  const auto acc = plan.acc;
  {  // G and R, the two [S, H, H] temporaries of the symmetrisation, y in acc
    const double a = (double)c10::elementSize(acc), T = y.dim() == 1 ? 1.0 : (double)y.size(1);
    const double H1 = (double)H + 1;
    check_memory_budget(op, a * ((double)S * H1 * (3 * H1 + T) + (double)n * T), z.device(),
                        "the Gram matrices [S, H+1, H+1] of z " + shape_str(z.sizes()));
  }
  const at::Tensor y2 = (y.dim() == 1 ? y.unsqueeze(1) : y).to(acc);
  const int64_t T = y2.size(1);
  at::Tensor G = at::zeros_symint(plan.gram_shape(), z.options().dtype(acc));
  at::Tensor R = at::zeros_symint(plan.rhs_shape(), z.options().dtype(acc));
  if (n == 0) return {G, R};
  at::Tensor zz = G.narrow(1, 0, H).narrow(2, 0, H);
  at::Tensor zsum = G.narrow(1, 0, H).select(2, H);  // [S, H]
  at::Tensor zy = R.narrow(1, 0, H);                  // [S, H, T]
  // Chunking bounds the float32 copy of bfloat16 input; float32/float64 inputs are views.
  // Rows per chunk: ~4 MB of float32 z per subset (at least 512 rows).
  const int64_t rows = std::max<int64_t>(64, (512 * 1024) / std::max<int64_t>(1, H * 4)) * 8;
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    const at::Tensor zc = z.narrow(1, r0, r).to(acc);
    const at::Tensor yc = y2.narrow(0, r0, r);
    zz.baddbmm_(zc.transpose(1, 2), zc);
    zsum.add_(zc.sum(1));
    // One GEMM per subset: at::matmul would fold the transposed z into one matrix (a copy of
    // all of z), and baddbmm against a stride-0 expansion of a view of y hit a path ~150x
    // slower than the contiguous case in torch 2.13 (measured: 4.5 s vs 30 ms at S = 255).
    for (int64_t s = 0; s < S; ++s) zy[s].addmm_(zc[s].t(), yc);
  }
  // The GEMM result is symmetric up to rounding; make it exactly so for the Cholesky solve.
  zz.copy_((zz + zz.transpose(1, 2)) * 0.5);
  G.narrow(1, H, 1).narrow(2, 0, H).copy_(zsum.unsqueeze(1));
  G.select(1, H).select(1, H).fill_(static_cast<double>(n));
  R.select(1, H).copy_(y2.sum(0).unsqueeze(0).expand({S, T}));
  return {G, R};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) { m.impl("gram", &gram_cpu); }

}  // namespace mmkernels::cpu
