// The CPU engine behind both fused ops.
//
// Forward: per modality k, one GEMM T_k = x_k @ stack_k^T over all of k's weight blocks, on
// every core. Where the CPU has AMX, bfloat16 and float32 GEMMs run on oneDNN's brgemm ukernel
// (blocked_gemm.h: bfloat16 on AMX with float32 results, so the modalities are summed in
// float32) band of rows by band of rows, each band's T_k read by the epilogue while in cache;
// elsewhere, and for float64, on MKL over whole tensors (bfloat16 converted to float32
// first). A GEMM is skipped when no subset or no sample uses k, and when a modality is missing
// from enough samples its present rows are gathered first, so absent rows cost no GEMM work.
// The epilogue combines the T_k with the masks, the bias and the activation: no [B, D]
// concatenation is ever built.
// Backward: grad_out becomes R_k, the gradient w.r.t. T_k; then grad_x_k = R_k @ stack_k and
// grad_stack_k = R_k^T @ x_k. On the blocked path both run band by band over every modality
// (blocked::BackwardPass), and project_concat's R_k is built band by band in cache, never
// stored; on the MKL path, and for concat_project (whose bias needs every column's sums), one
// parallel pass writes every row of R_k once.
//
// Absent rows are selected out, never multiplied by zero (0 * NaN is NaN, and real missing
// data is often NaN): the epilogues never read their rows of T_k, R_k is written zero there,
// and the x_k of grad_stack_k is the gathered present rows or a copy with absent rows zeroed
// (on the blocked path, only present rows are packed into the weight gradient's blocks).
//
// Row ranges are split into a fixed number of tasks, each reducing column sums into its own
// partial, and partials are added in task order: results do not depend on scheduling.
#pragma once

#include "blocked_gemm.h"
#include "row_kernels.h"

#include <mmkernels/accumulation.h>
#include <mmkernels/fusion_plan.h>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <c10/util/accumulate.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace mmkernels::cpu {

// A modality present in at most this fraction of the samples is gathered before its GEMMs
// (MKL path): copying the present rows costs less than the GEMM work on the absent ones it
// saves. The copy costs a fraction of a GEMM row, so the break-even lies well above one half;
// BENCHMARKS.md has the measurement behind the value.
constexpr double kGatherBelow = 0.8;

// Row kernels of the epilogues and the builder: in AVX-512 where the CPU has it
// (row_kernels.h), else plain loops whose restrict pointers and loop-invariant relu flag let
// the compiler vectorise them (the extension is built for the baseline x86-64 ISA).
template <typename acc_t>
inline void add_into(acc_t* __restrict__ dst, const acc_t* __restrict__ src, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float>)
    if (rows::add_into(dst, src, n)) return;
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// out = act(z + bias), or act(z) when bias is null.
template <typename scalar_t, typename acc_t>
inline void store_activated(scalar_t* __restrict__ out, const acc_t* __restrict__ z,
                            const acc_t* __restrict__ bias, int64_t n, bool relu) {
  if constexpr (std::is_same_v<acc_t, float>)
    if (rows::store_activated(out, z, bias, n, relu)) return;
  auto act = [relu](acc_t v) { return relu && v < acc_t(0) ? acc_t(0) : v; };
  if (bias) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(act(z[i] + bias[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(act(z[i]));
  }
}

// d = act'(out) * grad_out, and colsum += d.
template <typename scalar_t, typename acc_t>
inline void activation_grad(acc_t* __restrict__ d, acc_t* __restrict__ colsum,
                            const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out,
                            int64_t n, bool relu) {
  if constexpr (std::is_same_v<acc_t, float>)
    if (rows::activation_grad(d, colsum, grad, out, n, relu)) return;
  if (relu) {
    // Both loads unconditional: the select then compiles to a vector blend, not a branch
    // that mispredicts on every other element.
    for (int64_t i = 0; i < n; ++i) {
      const acc_t g = static_cast<acc_t>(grad[i]), o = static_cast<acc_t>(out[i]);
      d[i] = o > acc_t(0) ? g : acc_t(0);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<acc_t>(grad[i]);
  }
  add_into(colsum, d, n);
}

// d = act'(out) * grad_out, or d += that when accumulating.
template <typename scalar_t, typename acc_t>
inline void activation_grad_into(acc_t* __restrict__ d, const scalar_t* __restrict__ grad,
                                 const scalar_t* __restrict__ out, int64_t n, bool relu,
                                 bool accumulate) {
  if constexpr (std::is_same_v<acc_t, float>)
    if (rows::activation_grad_into(d, grad, out, n, relu, accumulate)) return;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = static_cast<acc_t>(grad[i]), o = static_cast<acc_t>(out[i]);
    const acc_t v = !relu || o > acc_t(0) ? g : acc_t(0);
    d[i] = accumulate ? d[i] + v : v;
  }
}

// Modality k as a GEMM operand: its rows, and its weight blocks stacked as [ncols, d_k].
struct Operand {
  at::Tensor x;         // [B, d_k], input dtype, contiguous
  at::Tensor w;         // [ncols, d_k], accumulation dtype, unit stride along d_k
  bool active = false;  // some subset uses this modality
  int64_t ncols() const { return active ? w.size(0) : 0; }
};

// Scratch memory reused across calls on the same thread. A fresh multi-megabyte buffer pays a
// page fault per 4 KiB page on first touch, which costs as much as the epilogues themselves
// (BENCHMARKS.md). Temporaries never leave an op, so one cached
// block per thread serves them all; what a call needed beyond the block is allocated fresh
// and the block grows to that size for the next call, up to kMaxCachedBytes.
class Workspace {
 public:
  static constexpr int64_t kMaxCachedBytes = int64_t(1) << 30;

  static Workspace& local() {
    thread_local Workspace ws;
    return ws;
  }

  // Starts an op call: every earlier take is free again.
  void reset() {
    if (needed_ > capacity_ && needed_ <= kMaxCachedBytes) {
      block_ = at::empty({needed_}, at::kByte);
      capacity_ = needed_;
    }
    used_ = needed_ = 0;
  }

  at::Tensor take(at::IntArrayRef sizes, at::ScalarType dtype) {
    const int64_t bytes = c10::multiply_integers(sizes) * (int64_t)c10::elementSize(dtype);
    const int64_t span = (bytes + 63) / 64 * 64;  // keep every take cache-line aligned
    needed_ += span;
    // A fresh tensor when the block is too small, and for an empty take (the block may not
    // exist yet, and a view of nothing needs none). Under AddressSanitizer every take is
    // fresh, so that an access past a temporary's end hits a redzone, not its neighbour.
#if defined(__SANITIZE_ADDRESS__)
    constexpr bool kFreshTakes = true;
#else
    constexpr bool kFreshTakes = false;
#endif
    if (kFreshTakes || span == 0 || used_ + span > capacity_)
      return at::empty(sizes, at::TensorOptions().dtype(dtype));
    at::Tensor view = block_.narrow(0, used_, bytes).view(dtype).view(sizes);
    used_ += span;
    return view;
  }

 private:
  at::Tensor block_;
  int64_t capacity_ = 0, used_ = 0, needed_ = 0;
};

// Which rows of each modality take part in its GEMMs.
struct RowSelection {
  std::vector<uint8_t> live;                // some subset and some sample use k
  std::vector<uint8_t> complete;            // every sample has k
  std::vector<at::Tensor> index;            // gathered: present rows (int64), else undefined
  std::vector<std::vector<int64_t>> pos;    // gathered: row b -> compact row or -1
  at::Tensor mask;                          // [B, K] bool, contiguous, or undefined
  const bool* mask_ptr = nullptr;

  int64_t rows(int64_t k, int64_t B) const { return index[k].defined() ? index[k].size(0) : B; }

  // The stored rows [lo, hi) of k that stand for the samples [b0, b1).
  std::pair<int64_t, int64_t> stored_rows(int64_t k, int64_t b0, int64_t b1) const {
    if (!index[k].defined()) return {b0, b1};
    const int64_t* i = index[k].data_ptr<int64_t>();
    const int64_t n = index[k].size(0);
    return {std::lower_bound(i, i + n, b0) - i, std::lower_bound(i, i + n, b1) - i};
  }
};

inline RowSelection select_rows(const FusionPlan& p, const std::vector<Operand>& ops,
                                const c10::optional<at::Tensor>& sample_mask) {
  RowSelection sel;
  sel.live.assign(p.K, 0);
  sel.complete.assign(p.K, 1);
  sel.index.assign(p.K, at::Tensor());
  sel.pos.assign(p.K, {});
  if (sample_mask.has_value()) {
    sel.mask = sample_mask->contiguous();
    sel.mask_ptr = sel.mask.data_ptr<bool>();
  }
  for (int64_t k = 0; k < p.K; ++k) {
    if (!ops[k].active) continue;
    if (!sel.mask_ptr) {
      sel.live[k] = p.B > 0;
      continue;
    }
    std::vector<int64_t> present;
    for (int64_t b = 0; b < p.B; ++b)
      if (sel.mask_ptr[b * p.K + k]) present.push_back(b);
    sel.live[k] = !present.empty();
    sel.complete[k] = (int64_t)present.size() == p.B;
    if (present.empty() || present.size() > kGatherBelow * p.B) continue;
    sel.pos[k].assign(p.B, -1);
    for (size_t i = 0; i < present.size(); ++i) sel.pos[k][present[i]] = (int64_t)i;
    sel.index[k] = at::tensor(present, at::kLong);
  }
  return sel;
}

// x_k's rows that take part, in the accumulation dtype (x_k itself when that is all of it).
inline at::Tensor gemm_input(const Operand& op, const RowSelection& sel, int64_t k) {
  const auto acc = op.w.scalar_type();
  const bool gathered = sel.index[k].defined();
  if (!gathered && op.x.scalar_type() == acc) return op.x;
  auto& ws = Workspace::local();
  const int64_t rows = gathered ? sel.index[k].size(0) : op.x.size(0);
  at::Tensor dst = ws.take({rows, op.x.size(1)}, acc);
  if (!gathered) return dst.copy_(op.x);
  if (op.x.scalar_type() == acc) return at::index_select_out(dst, op.x, 0, sel.index[k]);
  return dst.copy_(op.x.index_select(0, sel.index[k]));
}

// bfloat16 and float32 operands multiply in blocks of rows on oneDNN's ukernels where the CPU
// has them (blocked_gemm.h: bfloat16 on AMX with float32 results, gathers and scatters in
// cache); elsewhere on MKL, bfloat16 converted to float32. Every x_k has the op's dtype.
template <typename scalar_t>
bool on_blocked() {
  return (std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, float>) &&
         blocked::available();
}

// Row access to the per-modality GEMM results (T_k forward, R_k backward).
template <typename acc_t>
struct RowView {
  const FusionPlan& p;
  const RowSelection& sel;
  std::vector<acc_t*> data;
  std::vector<int64_t> ld;
  std::vector<int64_t> first;  // the stored row of data[k] (a band's first row, compact if gathered)

  bool present(int64_t k, int64_t b) const {
    return sel.live[k] && (!sel.mask_ptr || sel.mask_ptr[b * p.K + k]);
  }
  // Row b of modality k's buffer, or null when that row is not stored (gathered and absent).
  acc_t* row(int64_t k, int64_t b) const {
    if (!sel.live[k]) return nullptr;
    if (sel.index[k].defined()) {
      const int64_t i = sel.pos[k][b];
      return i < 0 ? nullptr : data[k] + (i - first[k]) * ld[k];
    }
    return data[k] + (b - first[k]) * ld[k];
  }
};

template <typename acc_t>
RowView<acc_t> row_view(const FusionPlan& p, const RowSelection& sel,
                        const std::vector<at::Tensor>& buffers) {
  RowView<acc_t> v{p, sel, std::vector<acc_t*>(p.K, nullptr), std::vector<int64_t>(p.K, 0),
                   std::vector<int64_t>(p.K, 0)};
  for (int64_t k = 0; k < p.K; ++k)
    if (sel.live[k]) {
      v.data[k] = buffers[k].data_ptr<acc_t>();
      v.ld[k] = buffers[k].size(1);
    }
  return v;
}

// Small batches stay on the calling thread: waking a second OpenMP thread costs more than a
// few hundred rows of work, and far more when another process holds the other core.
inline int64_t num_tasks(int64_t B) {
  constexpr int64_t kMinRows = 512;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / kMinRows));
}

// fn(task, r0, r1) over a fixed split of [0, B) into tasks, run in parallel.
template <typename Fn>
void for_each_task(int64_t B, int64_t tasks, Fn&& fn) {
  if (tasks <= 1) {
    fn(0, 0, B);
    return;
  }
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(t, t * B / tasks, (t + 1) * B / tasks);
  });
}

// x_k as the operand of grad_stack_k = R_k^T @ x_k: x_k's rows must not enter the sum where k
// is absent, whatever they hold. Gathered, they are not there; otherwise a copy in the
// accumulation dtype holds zeros in their place (a conversion copy is made anyway for
// bfloat16, so only float32 and float64 with absent rows pay for it).
template <typename scalar_t>
at::Tensor weight_grad_input(const Operand& op, const RowSelection& sel, int64_t k, int64_t K,
                             int64_t tasks) {
  using acc_t = at::opmath_type<scalar_t>;
  if (sel.index[k].defined() || sel.complete[k]) return gemm_input(op, sel, k);
  const int64_t B = op.x.size(0), d = op.x.size(1);
  at::Tensor dst = Workspace::local().take({B, d}, c10::CppTypeToScalarType<acc_t>::value);
  const scalar_t* src = op.x.data_ptr<scalar_t>();
  acc_t* out = dst.data_ptr<acc_t>();
  for_each_task(B, tasks, [&](int64_t, int64_t r0, int64_t r1) {
    for (int64_t b = r0; b < r1; ++b) {
      acc_t* row = out + b * d;
      if (sel.mask_ptr[b * K + k])
        std::transform(src + b * d, src + (b + 1) * d, row,
                       [](scalar_t v) { return static_cast<acc_t>(v); });
      else
        std::fill(row, row + d, acc_t(0));
    }
  });
  return dst;
}

// Rows of T_k per band of the blocked forward: enough that a ukernel call has rows to work
// on, few enough that the band's T_k (every modality's columns) stay in L2 (~1 MiB).
inline int64_t band_rows(int64_t total_cols) {
  constexpr int64_t kBandBytes = int64_t(1) << 20;
  const int64_t rows = kBandBytes / (int64_t)sizeof(float) / std::max<int64_t>(total_cols, 1);
  return std::clamp<int64_t>(rows / 16 * 16, 16, 256);
}

// The blocked forward: per band of rows, every T_k of the band from the ukernels, then the
// epilogue on them while they are in cache. (Whole T_k went through memory twice, and at
// small d_k that traffic, not the GEMM, set the forward's time.)
template <typename scalar_t, typename Epilogue>
void banded_forward(const FusionPlan& p, const std::vector<Operand>& ops, const RowSelection& sel,
                    Epilogue&& epilogue) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<std::optional<blocked::RowProjector<scalar_t>>> proj(p.K);
  int64_t total = 0, scratch = 0;
  for (int64_t k = 0; k < p.K; ++k) {
    if (!sel.live[k]) continue;
    const int64_t* index = sel.index[k].defined() ? sel.index[k].data_ptr<int64_t>() : nullptr;
    proj[k].emplace(ops[k].x, index, ops[k].w);
    total += ops[k].ncols();
    scratch = std::max(scratch, proj[k]->scratch_size());
  }
  const int64_t band = band_rows(total), tasks = num_tasks(p.B);
  auto& ws = Workspace::local();
  // Held here: a take the workspace cannot serve is a fresh tensor, freed with its last handle.
  const at::Tensor band_buffers = ws.take({tasks, band * total}, at::kFloat);
  const at::Tensor scratch_buffers =
      ws.take({tasks, std::max<int64_t>(scratch, 1)}, c10::CppTypeToScalarType<scalar_t>::value);
  acc_t* buffers = band_buffers.data_ptr<acc_t>();
  scalar_t* scratches = scratch_buffers.data_ptr<scalar_t>();
  for_each_task(p.B, tasks, [&](int64_t t, int64_t r0, int64_t r1) {
    blocked::TileRelease release;
    RowView<acc_t> view{p, sel, std::vector<acc_t*>(p.K, nullptr), std::vector<int64_t>(p.K, 0),
                        std::vector<int64_t>(p.K, 0)};
    for (int64_t b0 = r0; b0 < r1; b0 += band) {
      const int64_t b1 = std::min(r1, b0 + band);
      acc_t* at = buffers + t * band * total;
      for (int64_t k = 0; k < p.K; ++k) {
        if (!sel.live[k]) continue;
        const auto [lo, hi] = sel.stored_rows(k, b0, b1);
        (*proj[k])(lo, hi, at, ops[k].ncols(), scratches + t * std::max<int64_t>(scratch, 1));
        view.data[k] = at;
        view.ld[k] = ops[k].ncols();
        view.first[k] = lo;
        at += band * ops[k].ncols();
      }
      epilogue(view, b0, b1);
    }
    rows::store_fence();
  });
}

// Computes the T_k, then runs `epilogue(const RowView&, r0, r1)` over bands of rows, in
// parallel.
template <typename scalar_t, typename Epilogue>
void forward_gemms(const FusionPlan& p, const std::vector<Operand>& ops,
                   const c10::optional<at::Tensor>& sample_mask, Epilogue&& epilogue) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowSelection sel = select_rows(p, ops, sample_mask);
  auto& ws = Workspace::local();
  ws.reset();
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (on_blocked<scalar_t>()) return banded_forward<scalar_t>(p, ops, sel, epilogue);
  }
  std::vector<at::Tensor> T(p.K);
  for (int64_t k = 0; k < p.K; ++k) {
    if (!sel.live[k]) continue;
    T[k] = ws.take({sel.rows(k, p.B), ops[k].ncols()}, ops[k].w.scalar_type());
    at::mm_out(T[k], gemm_input(ops[k], sel, k), ops[k].w.t());
  }
  const auto view = row_view<acc_t>(p, sel, T);
  int64_t total = 0;
  for (const auto& op : ops) total += op.ncols();
  const int64_t band = band_rows(total);
  for_each_task(p.B, num_tasks(p.B), [&](int64_t, int64_t r0, int64_t r1) {
    for (int64_t b0 = r0; b0 < r1; b0 += band) epilogue(view, b0, std::min(r1, b0 + band));
    rows::store_fence();
  });
}

// The rows of `compact` ([n, d], acc dtype) placed at the rows b with pos[b] >= 0 of a
// [B, d] tensor in scalar_t, zeros elsewhere: one pass that writes every row once.
template <typename scalar_t>
at::Tensor scatter_rows(const at::Tensor& compact, const std::vector<int64_t>& pos, int64_t tasks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = (int64_t)pos.size(), d = compact.size(1);
  at::Tensor full = at::empty({B, d}, compact.options().dtype(c10::CppTypeToScalarType<scalar_t>::value));
  const acc_t* src = compact.data_ptr<acc_t>();
  scalar_t* dst = full.data_ptr<scalar_t>();
  for_each_task(B, tasks, [&](int64_t, int64_t r0, int64_t r1) {
    for (int64_t b = r0; b < r1; ++b) {
      scalar_t* row = dst + b * d;
      if (pos[b] < 0) std::fill(row, row + d, scalar_t(0));
      else std::transform(src + pos[b] * d, src + (pos[b] + 1) * d, row,
                          [](acc_t v) { return static_cast<scalar_t>(v); });
    }
  });
  return full;
}

struct BackwardResult {
  std::vector<at::Tensor> grad_x;       // [B, d_k] in the input dtype (empty when not needed)
  std::vector<at::Tensor> grad_stack;   // [ncols_k, d_k] in the accumulation dtype
  std::vector<at::Tensor> grad_rowsum;  // [ncols_k]: sums of R_k's rows (project_concat's
                                        // bias), empty unless asked for
  at::Tensor grad_colsum;               // [S, width]: column sums of act'(out) * grad_out,
                                        // undefined unless asked for
};

// The blocked backward of every modality: per band of samples, each modality's pass
// over its rows of the band (blocked::BackwardPass), so the band's grad_out and out serve every
// modality from cache. R_k's rows come from R[k] when stored, else from build_cols(k, b, c0,
// c1, dst, from_grad) into the pass's buffer.
template <typename scalar_t, typename BuildCols, typename FromGrad>
void blocked_backward(const FusionPlan& p, const std::vector<Operand>& ops,
                      const RowSelection& sel, const std::vector<at::Tensor>& R, bool stored,
                      BuildCols& build_cols, FromGrad& from_grad, bool need_x, bool need_w,
                      bool need_rowsum, BackwardResult& res) {
  const int64_t B = p.B, tasks = num_tasks(B);
  std::vector<at::Tensor> gx(p.K);
  std::vector<std::optional<blocked::BackwardPass<scalar_t>>> pass(p.K);
  for (int64_t k = 0; k < p.K; ++k) {
    if (need_x) gx[k] = sel.live[k] ? at::empty_like(ops[k].x) : at::zeros_like(ops[k].x);
    if (!sel.live[k]) continue;
    const int64_t* index = sel.index[k].defined() ? sel.index[k].data_ptr<int64_t>() : nullptr;
    pass[k].emplace(ops[k].ncols(), ops[k].w, ops[k].x, index, sel.mask_ptr, p.K, k,
                    need_x ? &gx[k] : nullptr, need_w, need_rowsum, tasks);
  }
  // Without a stored R_k, a band's rows of every R_k are built row by row into band buffers
  // when at least 128 rows of them fit in 1 MiB (reading each row of grad_out and out once,
  // contiguously); wider R_k are built by each pass, a column group at a time (fewer rows a
  // band would mean more passes over each weight gradient's accumulator).
  int64_t total = 0;
  for (int64_t k = 0; k < p.K; ++k) total += pass[k] ? ops[k].ncols() : 0;
  const int64_t fit_rows = std::min<int64_t>(
      blocked::kDepthBlock, (int64_t(1) << 20) / (4 * std::max<int64_t>(total, 1)) / 32 * 32);
  const bool prebuilt = !stored && fit_rows >= 128;
  const int64_t band = prebuilt ? fit_rows : blocked::kDepthBlock;
  for_each_task(B, tasks, [&](int64_t t, int64_t r0, int64_t r1) {
    blocked::TileRelease release;
    std::vector<std::optional<typename blocked::BackwardPass<scalar_t>::Buffers>> buf(p.K);
    std::vector<std::optional<blocked::Scratch<float>>> band_rows(p.K);
    for (int64_t k = 0; k < p.K; ++k)
      if (pass[k]) {
        buf[k].emplace(pass[k]->buffers());
        if (prebuilt) band_rows[k].emplace(band * ops[k].ncols());
      }
    std::vector<int64_t> lo(p.K), hi(p.K);
    for (int64_t b0 = r0; b0 < r1; b0 += band) {
      const int64_t b1 = std::min(r1, b0 + band);
      for (int64_t k = 0; k < p.K; ++k) std::tie(lo[k], hi[k]) = sel.stored_rows(k, b0, b1);
      if (prebuilt)
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t k = 0; k < p.K; ++k) {
            if (!pass[k]) continue;
            const int64_t i = sel.index[k].defined() ? sel.pos[k][b] : b;
            if (i >= 0)
              build_cols(k, b, 0, ops[k].ncols(),
                         band_rows[k]->get() + (i - lo[k]) * ops[k].ncols(), from_grad);
          }
      for (int64_t k = 0; k < p.K; ++k) {
        if (!pass[k]) continue;
        const int64_t ncols = ops[k].ncols();
        const int64_t* index = sel.index[k].defined() ? sel.index[k].data_ptr<int64_t>() : nullptr;
        // R_k's rows [i0, i0 + m), columns [c0, c1): stored, prebuilt, or built into out.
        auto source = [&](int64_t i0, int64_t m, int64_t c0, int64_t c1, float* out,
                          int64_t* ld) -> const float* {
          if (stored || prebuilt) {
            *ld = ncols;
            return (stored ? R[k].data_ptr<float>() + i0 * ncols
                           : band_rows[k]->get() + (i0 - lo[k]) * ncols) + c0;
          }
          *ld = c1 - c0;
          for (int64_t i = 0; i < m; ++i)
            build_cols(k, index ? index[i0 + i] : i0 + i, c0, c1, out + i * (c1 - c0), from_grad);
          return out;
        };
        pass[k]->band(source, t, lo[k], hi[k], b0, b1, *buf[k]);
      }
    }
  });
  for (int64_t k = 0; k < p.K; ++k) {
    const int64_t ncols = ops[k].ncols(), d = p.dims[k];
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    blocked::BackwardParts parts = pass[k] ? pass[k]->finish() : blocked::BackwardParts{};
    res.grad_stack.push_back(pass[k] && need_w ? parts.grad_stack : at::zeros({ncols, d}, f32));
    if (need_rowsum)
      res.grad_rowsum.push_back(pass[k] ? parts.row_sum : at::zeros({ncols}, f32));
    if (need_x) res.grad_x.push_back(gx[k]);
  }
}

// The backward of both ops. `grad_out` and `out` are [S, B, width] (S = 1 without subsets);
// modality k's block j collects, from the columns [col_offset[k], + widths[k]) of every
// member subset of the block, act'(out) * grad_out on the rows where k is present.
// With need_colsum (concat_project's bias sees every row and column) the pass computes
// act'(out) * grad_out over all of grad_out once, into a row buffer, and stores R_k; without
// it (project_concat) R_k's rows are built straight from the blocks of grad_out and out that
// feed them (with subsets, a subset pads its unused modalities' blocks with zero columns, often
// half of grad_out), and on the blocked path band by band in cache, never stored.
template <typename scalar_t>
BackwardResult backward_gemms(const FusionPlan& p, const std::vector<Operand>& ops,
                              const c10::optional<at::Tensor>& sample_mask,
                              const at::Tensor& grad_out, const at::Tensor& out, int64_t width,
                              const std::vector<int64_t>& col_offset, bool need_x, bool need_w,
                              bool need_colsum, bool need_rowsum) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowSelection sel = select_rows(p, ops, sample_mask);
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const auto acc_opts = at::TensorOptions().dtype(acc);
  auto& ws = Workspace::local();
  ws.reset();
  const bool blocked_path = on_blocked<scalar_t>(), stored = !blocked_path || need_colsum;
  std::vector<at::Tensor> R(p.K);
  for (int64_t k = 0; k < p.K && stored; ++k)
    if (sel.live[k]) R[k] = ws.take({sel.rows(k, p.B), ops[k].ncols()}, acc);
  const auto view = stored ? row_view<acc_t>(p, sel, R)
                           : RowView<acc_t>{p, sel, std::vector<acc_t*>(p.K, nullptr),
                                            std::vector<int64_t>(p.K, 0),
                                            std::vector<int64_t>(p.K, 0)};
  const at::Tensor g = grad_out.contiguous(), o = out.contiguous();
  const scalar_t* gptr = g.data_ptr<scalar_t>();
  const scalar_t* optr = o.data_ptr<scalar_t>();
  const int64_t B = p.B, S = p.S, tasks = num_tasks(B);
  const bool relu = p.relu;
  at::Tensor colsum = need_colsum ? at::zeros({tasks, S * width}, acc_opts) : at::Tensor();

  // Columns [c0, c1) of R_k's row b into dst: zero where k is absent, else in block j the sum
  // over its member subsets (in member order) of what put(dst, s, b, col, len, add) stores or
  // adds: act'(out) * grad_out of subset s's output columns [col, col + len) in row b.
  auto build_cols = [&](int64_t k, int64_t b, int64_t c0, int64_t c1, acc_t* dst, auto&& put) {
    if (c1 <= c0) return;
    if (!view.present(k, b)) {
      std::fill(dst, dst + (c1 - c0), acc_t(0));
      return;
    }
    const int64_t Hk = p.widths[k];
    for (int64_t j = c0 / Hk; j * Hk < c1; ++j) {
      const int64_t from = std::max(c0, j * Hk), to = std::min(c1, (j + 1) * Hk);
      acc_t* part = dst + (from - c0);
      const auto& subsets = p.members[k][j];
      if (subsets.empty()) std::fill(part, part + (to - from), acc_t(0));
      for (size_t m = 0; m < subsets.size(); ++m)
        put(part, subsets[m], b, col_offset[k] + from - j * Hk, to - from, m > 0);
    }
  };
  auto from_grad = [&](acc_t* dst, int64_t s, int64_t b, int64_t col, int64_t len, bool add) {
    const int64_t off = (s * B + b) * width + col;
    activation_grad_into(dst, gptr + off, optr + off, len, relu, add);
  };

  // With no output columns every R_k has none either: no row to visit (B may be huge).
  // Stored without column sums (the MKL path of project_concat), straight from grad_out and
  // out; with them (concat_project), every column once into a row buffer.
  if (S * width > 0 && stored && !need_colsum)
    for_each_task(B, tasks, [&](int64_t, int64_t r0, int64_t r1) {
      for (int64_t b = r0; b < r1; ++b)
        for (int64_t k = 0; k < p.K; ++k)
          if (acc_t* r = view.row(k, b)) build_cols(k, b, 0, ops[k].ncols(), r, from_grad);
    });
  if (S * width > 0 && need_colsum) for_each_task(B, tasks, [&](int64_t t, int64_t r0, int64_t r1) {
    std::vector<acc_t> dz(S * width);
    acc_t* cs = colsum[t].data_ptr<acc_t>();
    for (int64_t b = r0; b < r1; ++b) {
      for (int64_t s = 0; s < S; ++s)
        activation_grad(dz.data() + s * width, cs + s * width, gptr + (s * B + b) * width,
                        optr + (s * B + b) * width, width, relu);
      auto from_dz = [&](acc_t* dst, int64_t s, int64_t, int64_t col, int64_t len, bool add) {
        const acc_t* src = dz.data() + s * width + col;
        if (add) add_into(dst, src, len);
        else std::copy(src, src + len, dst);
      };
      for (int64_t k = 0; k < p.K; ++k)
        if (acc_t* r = view.row(k, b)) build_cols(k, b, 0, ops[k].ncols(), r, from_dz);
    }
  });

  BackwardResult res;
  if (need_colsum) res.grad_colsum = colsum.sum(0).view({S, width});  // fixed order over tasks
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (blocked_path) {
      blocked_backward<scalar_t>(p, ops, sel, R, stored, build_cols, from_grad, need_x, need_w,
                                 need_rowsum, res);
      return res;
    }
  }
  for (int64_t k = 0; k < p.K; ++k) {
    const auto& op = ops[k];
    if (need_x) {
      if (!sel.live[k]) {
        res.grad_x.push_back(at::zeros_like(op.x));
      } else if (!sel.index[k].defined() && op.x.scalar_type() == acc) {
        res.grad_x.push_back(at::mm(R[k], op.w));
      } else {
        at::Tensor part = ws.take({R[k].size(0), p.dims[k]}, acc);
        at::mm_out(part, R[k], op.w);
        res.grad_x.push_back(sel.index[k].defined()
                                 ? scatter_rows<scalar_t>(part, sel.pos[k], tasks)
                                 : part.to(op.x.scalar_type()));
      }
    }
    res.grad_stack.push_back(
        need_w && sel.live[k]
            ? at::mm(R[k].t(), weight_grad_input<scalar_t>(op, sel, k, p.K, tasks))
            : at::zeros({op.ncols(), p.dims[k]}, acc_opts));
    if (need_rowsum)
      res.grad_rowsum.push_back(sel.live[k] ? R[k].sum(0) : at::zeros({op.ncols()}, acc_opts));
  }
  return res;
}

}  // namespace mmkernels::cpu
