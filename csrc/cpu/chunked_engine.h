// The CPU engine behind both fused ops. Rows are processed in chunks small enough that a
// chunk's GEMM results stay in L2 while the op-specific epilogue reads them, so no [B, D]
// concatenation and no full-size partial product is ever written to memory.
//
// Per chunk and modality k: T_k = x_k[chunk] @ stack_k^T (one GEMM for all of k's weight
// blocks), skipped when no subset uses k or no row of the chunk has k. The epilogue combines
// the T_k into the output. Backward mirrors it: a builder turns grad_out into R_k (the gradient
// w.r.t. T_k), then grad_x_k = R_k @ stack_k and grad_stack_k += R_k^T @ x_k.
//
// Work is split into a fixed number of tasks, each reducing into its own partial sums, and
// the partials are added in task order: the result does not depend on thread scheduling.
#pragma once

#include <mmkernels/fusion_plan.h>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <array>
#include <vector>

namespace mmkernels::cpu {

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Modality k as a GEMM operand: its rows, and its weight blocks stacked as [ncols, d_k].
struct Operand {
  at::Tensor x;         // [B, d_k], input dtype, contiguous
  at::Tensor w;         // [ncols, d_k], accumulation dtype, unit stride along d_k
  bool active = false;  // some subset uses this modality
  int64_t ncols() const { return active ? w.size(0) : 0; }
};

struct ChunkLayout {
  int64_t rows;    // rows per chunk
  int64_t chunks;  // number of chunks
  int64_t tasks;   // number of independent tasks (each owns a contiguous run of chunks)
};

inline ChunkLayout chunk_layout(const std::vector<Operand>& ops, int64_t B, int64_t elem_size) {
  int64_t bytes_per_row = 0;
  for (const auto& o : ops) bytes_per_row += (o.ncols() + o.x.size(1)) * elem_size;
  constexpr int64_t kChunkBytes = 1 << 20;  // well inside a 2 MiB L2
  int64_t rows = bytes_per_row ? kChunkBytes / bytes_per_row : 512;
  rows = std::clamp<int64_t>(rows, 16, 512);
  rows = std::min(rows, std::max<int64_t>(B, 1));
  const int64_t chunks = (B + rows - 1) / rows;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks));
  return {rows, chunks, tasks};
}

// Which modalities have at least one present row in [r0, r0 + rows).
inline void live_modalities(const std::vector<Operand>& ops, const bool* sample_mask, int64_t K,
                            int64_t r0, int64_t rows, std::vector<uint8_t>& live) {
  for (int64_t k = 0; k < K; ++k) {
    bool any = ops[k].active;
    if (any && sample_mask) {
      any = false;
      for (int64_t i = 0; i < rows && !any; ++i) any = sample_mask[(r0 + i) * K + k];
    }
    live[k] = any ? 1 : 0;
  }
}

// x_k[r0 : r0 + rows] in the accumulation dtype (a view when no conversion is needed).
inline at::Tensor chunk_input(const Operand& op, at::Tensor& buf, int64_t r0, int64_t rows,
                              int64_t capacity) {
  const at::Tensor src = op.x.narrow(0, r0, rows);
  if (src.scalar_type() == op.w.scalar_type()) return src;
  if (!buf.defined()) buf = at::empty({capacity, op.x.size(1)}, op.w.options());
  at::Tensor dst = buf.narrow(0, 0, rows);
  dst.copy_(src);
  return dst;
}

// The sample mask as a host pointer ([B, K], row-major), or null when every sample is complete.
inline const bool* mask_ptr(const c10::optional<at::Tensor>& m, at::Tensor& holder) {
  if (!m.has_value()) return nullptr;
  holder = m->contiguous();
  return holder.data_ptr<bool>();
}

template <typename acc_t>
struct ChunkView {
  int64_t r0, rows;
  std::vector<acc_t*> T;        // per modality: [rows, ld[k]] (T_k in forward, R_k in backward)
  std::vector<int64_t> ld;
  const uint8_t* live;
};

// Runs `epilogue(const ChunkView&)` on every chunk after computing its T_k.
template <typename acc_t, typename Epilogue>
void forward_chunks(const FusionPlan& p, const std::vector<Operand>& ops, const bool* sample_mask,
                    Epilogue&& epilogue) {
  const int64_t K = p.K;
  const ChunkLayout lay = chunk_layout(ops, p.B, sizeof(acc_t));
  at::parallel_for(0, lay.tasks, 1, [&](int64_t t0, int64_t t1) {
    c10::NoGradGuard no_grad;
    std::vector<at::Tensor> T(K), xbuf(K);
    std::vector<uint8_t> live(K);
    ChunkView<acc_t> view{0, 0, std::vector<acc_t*>(K, nullptr), std::vector<int64_t>(K, 0),
                          live.data()};
    for (int64_t k = 0; k < K; ++k)
      if (ops[k].active) {
        T[k] = at::empty({lay.rows, ops[k].ncols()}, ops[k].w.options());
        view.T[k] = T[k].data_ptr<acc_t>();
        view.ld[k] = ops[k].ncols();
      }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c_begin = t * lay.chunks / lay.tasks, c_end = (t + 1) * lay.chunks / lay.tasks;
      for (int64_t c = c_begin; c < c_end; ++c) {
        view.r0 = c * lay.rows;
        view.rows = std::min(lay.rows, p.B - view.r0);
        live_modalities(ops, sample_mask, K, view.r0, view.rows, live);
        for (int64_t k = 0; k < K; ++k) {
          if (!live[k]) continue;
          at::Tensor out = T[k].narrow(0, 0, view.rows);
          at::mm_out(out, chunk_input(ops[k], xbuf[k], view.r0, view.rows, lay.rows), ops[k].w.t());
        }
        epilogue(view);
      }
    }
  });
}

struct BackwardResult {
  std::vector<at::Tensor> grad_x;      // [B, d_k] in the input dtype (empty when not needed)
  std::vector<at::Tensor> grad_stack;  // [ncols_k, d_k] in the accumulation dtype
  at::Tensor grad_bias;                // [nbias] in the accumulation dtype
};

// `builder(const ChunkView&, acc_t* grad_bias_partial)` adds each chunk's R_k into the zeroed
// view (rows of modalities that are not live are never read) and its bias gradient into the
// task's partial.
template <typename acc_t, typename Builder>
BackwardResult backward_chunks(const FusionPlan& p, const std::vector<Operand>& ops,
                               const bool* sample_mask, bool need_x, bool need_w, int64_t nbias,
                               Builder&& builder) {
  const int64_t K = p.K;
  const ChunkLayout lay = chunk_layout(ops, p.B, sizeof(acc_t));
  const at::TensorOptions acc_opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  BackwardResult res;
  for (int64_t k = 0; k < K; ++k)
    res.grad_x.push_back(need_x ? at::empty({p.B, p.dims[k]}, ops[k].x.options()) : at::Tensor());
  std::vector<std::vector<at::Tensor>> part_w(lay.tasks, std::vector<at::Tensor>(K));
  at::Tensor part_b = at::zeros({lay.tasks, nbias}, acc_opts);

  at::parallel_for(0, lay.tasks, 1, [&](int64_t t0, int64_t t1) {
    c10::NoGradGuard no_grad;
    std::vector<at::Tensor> R(K), xbuf(K);
    std::vector<uint8_t> live(K);
    ChunkView<acc_t> view{0, 0, std::vector<acc_t*>(K, nullptr), std::vector<int64_t>(K, 0),
                          live.data()};
    for (int64_t k = 0; k < K; ++k)
      if (ops[k].active) {
        R[k] = at::empty({lay.rows, ops[k].ncols()}, acc_opts);
        view.T[k] = R[k].data_ptr<acc_t>();
        view.ld[k] = ops[k].ncols();
      }
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t k = 0; k < K; ++k)
        if (need_w && ops[k].active) part_w[t][k] = at::zeros({ops[k].ncols(), p.dims[k]}, acc_opts);
      acc_t* gb = part_b[t].data_ptr<acc_t>();
      const int64_t c_begin = t * lay.chunks / lay.tasks, c_end = (t + 1) * lay.chunks / lay.tasks;
      for (int64_t c = c_begin; c < c_end; ++c) {
        view.r0 = c * lay.rows;
        view.rows = std::min(lay.rows, p.B - view.r0);
        live_modalities(ops, sample_mask, K, view.r0, view.rows, live);
        for (int64_t k = 0; k < K; ++k)
          if (live[k]) R[k].narrow(0, 0, view.rows).zero_();
        builder(view, gb);
        for (int64_t k = 0; k < K; ++k) {
          if (!live[k]) {
            if (need_x) res.grad_x[k].narrow(0, view.r0, view.rows).zero_();
            continue;
          }
          const at::Tensor Rk = R[k].narrow(0, 0, view.rows);
          if (need_x) {
            at::Tensor gx = res.grad_x[k].narrow(0, view.r0, view.rows);
            if (gx.scalar_type() == Rk.scalar_type()) at::mm_out(gx, Rk, ops[k].w);
            else gx.copy_(at::mm(Rk, ops[k].w));
          }
          if (need_w) part_w[t][k].addmm_(Rk.t(), chunk_input(ops[k], xbuf[k], view.r0, view.rows, lay.rows));
        }
      }
    }
  });

  for (int64_t k = 0; k < K; ++k) {
    at::Tensor gw = at::zeros({ops[k].ncols(), p.dims[k]}, acc_opts);
    if (need_w && ops[k].active)
      for (int64_t t = 0; t < lay.tasks; ++t) gw.add_(part_w[t][k]);
    res.grad_stack.push_back(gw);
  }
  res.grad_bias = part_b.sum(0);  // fixed reduction order over tasks
  return res;
}

}  // namespace mmkernels::cpu
