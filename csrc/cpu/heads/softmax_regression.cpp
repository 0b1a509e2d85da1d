// mmkernels::softmax_regression_loss_grad on the CPU: a fused multinomial-logistic loss and
// gradient pass over all subsets at once, for the softmax refits of mmkernels/heads.py.
//
// Z [S, n, H] is read in (subset, row block) tasks (task_pool.h); within one task the logits
// and the gradient touch the same rows back to back, so the second read of Z hits the cache:
// Z is read from memory once per evaluation instead of twice. The per-subset kernels are
// picked in softmax_dispatch.h, compiled in softmax_kernels.cpp.
#include "softmax_kernels.h"
#include "task_pool.h"

#include <mmkernels/heads_plan.h>
#include <mmkernels/memory_budget.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

namespace mmkernels::cpu {
namespace {

// loss[s] = sum_i sw_i * CE(z_si W_s + b_s, y_i) + l2/2 ||W_s||^2 and its gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_regression_loss_grad_cpu(
    const at::Tensor& z, const at::Tensor& y, const at::Tensor& w, const at::Tensor& b,
    const c10::optional<at::Tensor>& sample_weight, double l2,
    const c10::optional<at::Tensor>& subset_index) {
  const char* op = "mmkernels::softmax_regression_loss_grad";
  const SoftmaxPlan plan = softmax_plan(z, y, w, b, sample_weight, l2, subset_index);
  MMK_CHECK(z.device().is_cpu(), op, ": z must be a CPU tensor, got ", z.device());
  const int64_t S = z.size(0), n = z.size(1), H = z.size(2), C = w.size(2);
  // subset_index picks which subsets of z to evaluate (w and b then hold one row per pick),
  // so a solver can skip converged subsets without copying z.
  at::Tensor index;
  if (subset_index.has_value()) {
    index = subset_index->contiguous();
    if (index.numel() > 0) {
      const int64_t lo = index.min().item<int64_t>(), hi = index.max().item<int64_t>();
      MMK_CHECK(lo >= 0 && hi < S, op, ": subset_index must hold subsets in [0, ", S - 1,
                "] (S = dim 0 of z), got values in [", lo, ", ", hi, "]");
    }
  }
  const int64_t K = index.defined() ? index.size(0) : S;
  const auto acc = plan.compute;
  // z in the compute dtype with unit-stride rows: a view of contiguous float32/float64 z. When
  // z must be converted (bfloat16) and only some subsets are picked, those are selected before
  // the conversion, so a solver that skips converged subsets does not convert all S each call.
  const bool convert = z.scalar_type() != acc || z.stride(2) != 1;
  const bool select_first = convert && index.defined() && K < S;
  // Problems next to each other that read the same subset (a cross-validation's folds over
  // the same rows) form one group, solved at once where the grouped kernel runs
  // (softmax_grouped.h); otherwise each problem is its own group.
  const bool grouping = acc == at::kFloat && H > 0 && softmax_grouped_available(C);
  std::vector<std::pair<int64_t, int64_t>> groups;  // (first problem, problems)
  {
    const int64_t* ip = index.defined() ? index.data_ptr<int64_t>() : nullptr;
    const int64_t most = grouping ? kGroupWidth / C : 1;
    for (int64_t p = 0; p < K; ++p) {
      if (ip && !groups.empty() && groups.back().second < most &&
          ip[p] == ip[groups.back().first])
        ++groups.back().second;
      else
        groups.emplace_back(p, 1);
    }
  }
  const int64_t G = static_cast<int64_t>(groups.size());
  int64_t widest = 0;  // the most logits per row of a group solved at once (g C, g >= 2)
  for (const auto& grp : groups)
    if (grp.second > 1) widest = std::max(widest, grp.second * C);
  // Tasks are (group, row block) pairs, at least ~4 per thread for balance; each has its own
  // partial sums, added in task order, so a given thread count (and K) gives fixed results.
  // One thread below ~1M elements of Z per call (~0.3 ms of work): handing tasks to the
  // inter-op pool costs microseconds per helper on a quiet machine, and a helper that claims a
  // task and then waits for a CPU (a busy, shared machine) holds up the caller for that task.
  const int64_t threads =
      K * n * H < (int64_t(1) << 20) ? 1 : std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = (4 * threads + G - 1) / std::max<int64_t>(G, 1);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(want, (n + 1023) / 1024));
  const int64_t CP = padded_lanes(C);
  const int64_t wsize = H * (CP ? CP : C);
  {  // an upper bound of what the call allocates besides its inputs
    const double a = (double)c10::elementSize(acc), ez = (double)z.element_size();
    const double Kd = (double)K, Cd = (double)C, Hd = (double)H, sp = (double)splits;
    double zcopy = 0;  // z in the compute dtype; a strided conversion may need two copies
    if (select_first)
      zcopy = Kd * (double)n * Hd * (ez + a);
    else if (convert)
      zcopy = (double)z.numel() * a * ((z.scalar_type() != acc) + (z.stride(2) != 1));
    const double need =
        zcopy + Kd * (double)wsize * (a + 8 + 8 * sp)  // weight layout, gw_l, part_w
        + Kd * Hd * Cd * (3 * 8 + 2 * a)  // w in float64, its square, gw; gw out, contiguous
        + Kd * (Cd + 1) * (8 + 8 * sp + a)  // gb, loss, their partials and outputs
        + (double)n * (a + 8)               // sample weights, labels
        + (double)threads * 4 *  // per thread, the grouped kernel's buffers (softmax_grouped.h)
              (2.0 * kGroupRows * widest + 2.0 * widest * Hd);
    check_memory_budget(op, need, z.device(),
                        "z " + shape_str(z.sizes()) + " and w " + shape_str(w.sizes()));
  }
  const at::Tensor yc = y.contiguous();
  if (n > 0) {
    const int64_t lo = yc.min().item<int64_t>(), hi = yc.max().item<int64_t>();
    MMK_CHECK(lo >= 0 && hi < C, op, ": y must hold labels in [0, ", C - 1,
              "] (C = dim 2 of w), got labels in [", lo, ", ", hi, "]");
  }
  at::Tensor sw;
  if (sample_weight.has_value()) sw = sample_weight->to(acc).contiguous();
  at::Tensor zc = select_first ? z.index_select(0, index).to(acc) : z.to(acc);
  if (zc.stride(2) != 1) zc = zc.contiguous();
  // Weights in the kernel's layout: [K, H, CP] zero-padded (17..32 classes), or [K, C, H].
  // (Only the per-problem kernels read it.)
  const bool any_single = std::any_of(groups.begin(), groups.end(),
                                      [](const auto& grp) { return grp.second == 1; });
  at::Tensor wl;
  if (any_single && CP) {
    wl = at::zeros({K, H, CP}, w.options());
    wl.narrow(2, 0, C).copy_(w);
  } else if (any_single) {
    wl = w.transpose(1, 2).contiguous();
  }
  const at::Tensor bc = b.contiguous();
  const at::Tensor wc = w.contiguous();
  at::Tensor loss = at::zeros({K}, w.options().dtype(at::kDouble));
  // The gradients in float64, in the kernels' layout: [K, H, CP] padded, or [K, C, H] (W
  // transposed), or [K, H, C] (the output's) when every group is solved by the grouped kernel.
  const bool h_major = !any_single;
  at::Tensor gw_l = at::zeros(CP || h_major ? at::IntArrayRef{K, H, CP ? CP : C}
                                            : at::IntArrayRef{K, C, H},
                              w.options().dtype(at::kDouble));
  at::Tensor gb = at::zeros({K, C}, w.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(acc, "softmax_regression_loss_grad", [&] {
    const scalar_t* zp = zc.data_ptr<scalar_t>();
    const int64_t ss = zc.stride(0), ld = zc.stride(1);
    const scalar_t* swp = sw.defined() ? sw.data_ptr<scalar_t>() : nullptr;
    // With select_first, zc holds the picked subsets in order.
    const int64_t* pick = index.defined() && !select_first ? index.data_ptr<int64_t>() : nullptr;
    // With one row block per problem, its sums go straight into the outputs.
    std::vector<double> part_loss, part_w, part_b;
    if (splits > 1) {
      part_loss.assign(K * splits, 0.0);
      part_w.assign(K * splits * wsize, 0.0);
      part_b.assign(K * splits * C, 0.0);
    }
    double* lp = loss.data_ptr<double>();
    double* gwp = gw_l.data_ptr<double>();
    double* gbp = gb.data_ptr<double>();
    double* const loss_slots = splits > 1 ? part_loss.data() : lp;
    double* const w_slots = splits > 1 ? part_w.data() : gwp;
    double* const b_slots = splits > 1 ? part_b.data() : gbp;
    const int64_t per = splits > 1 ? (n + splits - 1) / splits : n;
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    run_tasks(G * splits, threads, [&](int64_t t) {
      // one (group, row block) task; problem p's partial sums are in slot p * splits + part
      const auto [s, g] = groups[t / splits];
      const int64_t part = t % splits;
      const int64_t r0 = std::min(n, part * per), r1 = std::min(n, r0 + per);
      if (r1 <= r0) return;
      const scalar_t* swr = swp ? swp + r0 : nullptr;
      const scalar_t* zr = zp + (pick ? pick[s] : s) * ss + r0 * ld;
      const int64_t slot = s * splits + part;
      if (g == 1) {
        softmax_subset<scalar_t>(zr, ld, r1 - r0, H, C, wl.data_ptr<scalar_t>() + s * wsize,
                                 bc.data_ptr<scalar_t>() + s * C, yc.data_ptr<int64_t>() + r0,
                                 swr, loss_slots + slot, w_slots + slot * wsize,
                                 b_slots + slot * C);
      } else {
        softmax_group(zr, ld, r1 - r0, H, C, g, wp + s * H * C, bc.data_ptr<scalar_t>() + s * C,
                      yc.data_ptr<int64_t>() + r0, swr, loss_slots + slot,
                      w_slots + slot * wsize, b_slots + slot * C, splits, h_major);
      }
    });
    for (int64_t t = 0; splits > 1 && t < K * splits; ++t) {
      const int64_t s = t / splits;
      lp[s] += part_loss[t];
      for (int64_t j = 0; j < wsize; ++j) gwp[s * wsize + j] += part_w[t * wsize + j];
      for (int64_t c = 0; c < C; ++c) gbp[s * C + c] += part_b[t * C + c];
    }
  });
  at::Tensor gw = CP ? gw_l.narrow(2, 0, C) : h_major ? gw_l : gw_l.transpose(1, 2);
  if (l2 != 0) {  // the solvers add their penalties themselves and pass 0
    const at::Tensor wd = w.to(at::kDouble);
    loss.add_(wd.square().sum({1, 2}), 0.5 * l2);
    gw = gw.add(wd, l2);
  }
  return {loss.to(acc), at::empty({K, H, C}, w.options().dtype(acc)).copy_(gw), gb.to(acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("softmax_regression_loss_grad", &softmax_regression_loss_grad_cpu);
}

}  // namespace mmkernels::cpu
