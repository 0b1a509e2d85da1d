// From an op-level FusedProblem to kernel launches: picks the math policy from the dtype (and
// torch's TF32 permission), the kernel mode from the subset layout, fills the parameter blocks
// and launches. Compiled twice: by nvcc in csrc/cuda/fused_kernels.cu, and as host C++ against
// the emulator in csrc/emulator/driver.cpp, so the emulator tests run this code too.
#pragma once

#include "fused_backward.cuh"
#include "fused_forward.cuh"

#include <algorithm>
#include <initializer_list>
#include <string>
#include <vector>
#include <stdexcept>

#if defined(MMKERNELS_EMULATOR)
#define MMK_LAUNCH(kernel, blocks, threads, smem, stream, ...) \
  do {                                                            \
    (void)(stream);                                               \
    ::mmk_emu::launch(::mmk_emu::dim3((unsigned)(blocks)), ::mmk_emu::dim3(threads), smem, \
                      [&] { kernel(__VA_ARGS__); });              \
  } while (0)
#else
#define MMK_LAUNCH(kernel, blocks, threads, smem, stream, ...)                              \
  do {                                                                                      \
    kernel<<<(unsigned)(blocks), threads, smem, static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__); \
    const cudaError_t err_ = cudaGetLastError();                                            \
    if (err_ != cudaSuccess)                                                                \
      throw std::runtime_error(std::string("mmkernels: CUDA launch failed: ") +             \
                               cudaGetErrorString(err_));                                   \
  } while (0)
#endif

namespace mmkernels::cuda {

inline int elem_bytes(DType t) {
  return t == DType::f64 ? 8 : (t == DType::f32 ? 4 : 2);
}

// The widest cp.async (bytes) that a base pointer and every given stride (elements) allow.
inline int widest_copy(const void* base, std::initializer_list<int64_t> strides, int E) {
  int64_t ld = 0;
  for (int64_t s : strides) ld |= s;
  return copy_width(base, ld, E);
}

inline const void* offset_ptr(const void* p, int64_t elems, int E) {
  return static_cast<const char*>(p) + elems * E;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Column offsets of the modalities in the concatenated feature axis (concat) or in the
// output (project).
inline void prefix(const int64_t* v, int K, int64_t* off) {
  int64_t o = 0;
  for (int k = 0; k < K; ++k) {
    off[k] = o;
    o += v[k];
  }
}

inline int64_t out_width(const FusedProblem& f) {
  if (!f.late) return f.widths[0];
  int64_t w = 0;
  for (int k = 0; k < f.K; ++k) w += f.widths[k];
  return w;
}

template <class P>
ForwardParams forward_params(const FusedProblem& f, bool& emit_all_concat) {
  const int E = elem_bytes((DType)f.dtype);
  ForwardParams p{};
  p.K = f.K;
  p.late = f.late;
  p.relu = f.relu;
  p.has_subsets = f.has_subsets;
  p.per_subset = f.per_subset;
  p.B = f.B;
  p.S = f.has_subsets ? f.S : 1;
  p.subset_mask = f.has_subsets ? f.subset_mask : nullptr;
  p.sample_mask = f.sample_mask;
  p.out = f.out;
  p.out_ld = out_width(f);
  p.out_step = f.B * p.out_ld;
  int64_t D = 0;
  for (int k = 0; k < f.K; ++k) D += f.dims[k];
  int64_t feat_off[kMaxModalities], out_off[kMaxModalities];
  prefix(f.dims, f.K, feat_off);
  prefix(f.widths, f.K, out_off);
  for (int k = 0; k < f.K; ++k) {
    p.dims[k] = (int32_t)f.dims[k];
    p.x[k] = f.x[k];
    p.ldx[k] = f.ldx[k];
    p.vec_x[k] = widest_copy(f.x[k], {f.ldx[k]}, E);
    if (f.late) {
      p.w[k] = f.weight[k];
      p.ldw[k] = f.dims[k];
      p.w_step[k] = f.per_subset ? f.widths[k] * f.dims[k] : 0;
      p.bias[k] = f.has_bias ? f.bias[k] : nullptr;
      p.bias_step[k] = f.widths[k];
    } else {
      p.w[k] = offset_ptr(f.weight[0], feat_off[k], E);
      p.ldw[k] = D;
      p.w_step[k] = f.per_subset ? f.widths[0] * D : 0;
    }
    p.vec_w[k] = widest_copy(p.w[k], {p.ldw[k], p.w_step[k]}, E);
  }
  if (!f.late) {
    p.bias[0] = f.has_bias ? f.bias[0] : nullptr;
    p.bias_step[0] = f.widths[0];
  }
  // Column groups and their tiles.
  p.n_colgroups = f.late ? f.K : 1;
  int tiles = 0;
  for (int c = 0; c < p.n_colgroups; ++c) {
    p.col_tile_start[c] = tiles;
    p.width[c] = (int32_t)f.widths[c];
    p.col_off[c] = f.late ? out_off[c] : 0;
    tiles += (int)ceil_div(f.widths[c], P::BN);
  }
  p.col_tile_start[p.n_colgroups] = tiles;
  p.n_coltiles = tiles;
  // The kernel mode.
  emit_all_concat = !f.late && f.has_subsets && !f.per_subset && f.K <= 4;
  if (f.late) {
    p.emit_all = f.has_subsets && !f.per_subset;
    p.item_subsets = f.per_subset;
  } else {
    p.emit_all = emit_all_concat;
    p.item_subsets = f.has_subsets && !emit_all_concat;
  }
  p.n_groups = p.item_subsets ? (int32_t)p.S : 1;
  return p;
}

template <class P, int FaultKind = kNoFault>
void launch_forward(const FusedProblem& f, void* stream) {
  bool nk4 = false;
  const ForwardParams p = forward_params<P>(f, nk4);
  const int64_t blocks = ceil_div(f.B, P::BM) * p.n_groups * p.n_coltiles;
  if (blocks == 0 || (f.has_subsets && f.S == 0)) return;
  constexpr int smem = ForwardSmem<P>::bytes();
  if (nk4) MMK_LAUNCH((fused_forward_kernel<P, 4, FaultKind>), blocks, P::THREADS, smem, stream, p);
  else MMK_LAUNCH((fused_forward_kernel<P, 1, FaultKind>), blocks, P::THREADS, smem, stream, p);
}

template <class P>
BackwardParams backward_params(const FusedProblem& f, ReduceParams& red) {
  const int E = elem_bytes((DType)f.dtype);
  BackwardParams p{};
  p.K = f.K;
  p.late = f.late;
  p.relu = f.relu;
  p.has_subsets = f.has_subsets;
  p.per_subset = f.per_subset;
  p.B = f.B;
  p.S = f.has_subsets ? f.S : 1;
  p.out = f.out;
  p.grad_out = f.grad_out;
  p.out_ld = out_width(f);
  p.out_step = f.B * p.out_ld;
  p.subset_mask = f.has_subsets ? f.subset_mask : nullptr;
  p.sample_mask = f.sample_mask;
  int64_t D = 0;
  for (int k = 0; k < f.K; ++k) D += f.dims[k];
  int64_t feat_off[kMaxModalities], out_off[kMaxModalities];
  prefix(f.dims, f.K, feat_off);
  prefix(f.widths, f.K, out_off);
  int gx_tiles = 0, gw_tiles = 0;
  for (int k = 0; k < f.K; ++k) {
    p.dims[k] = (int32_t)f.dims[k];
    p.width[k] = (int32_t)f.widths[k];
    p.dz_off[k] = f.late ? out_off[k] : 0;
    p.x[k] = f.x[k];
    p.ldx[k] = f.ldx[k];
    p.vec_x[k] = widest_copy(f.x[k], {f.ldx[k]}, E);
    if (f.late) {
      p.w[k] = f.weight[k];
      p.ldw[k] = f.dims[k];
      p.w_step[k] = f.per_subset ? f.widths[k] * f.dims[k] : 0;
    } else {
      p.w[k] = offset_ptr(f.weight[0], feat_off[k], E);
      p.ldw[k] = D;
      p.w_step[k] = f.per_subset ? f.widths[0] * D : 0;
    }
    p.vec_w[k] = widest_copy(p.w[k], {p.ldw[k], p.w_step[k]}, E);
    p.gx[k] = f.grad_x[k];
    p.gx_tile_start[k] = gx_tiles;
    gx_tiles += (int)ceil_div(f.dims[k], P::BN);
    p.gw_tile_start[k] = gw_tiles;
    gw_tiles += (int)(ceil_div(f.widths[k], P::BM) * ceil_div(f.dims[k], P::BN));
  }
  p.gx_tile_start[f.K] = gx_tiles;
  p.gw_tile_start[f.K] = gw_tiles;
  const int64_t groups = f.per_subset ? p.S : 1;
  p.n_wgroups = p.n_bgroups = (int32_t)groups;
  p.want_w = f.grad_weight[0] != nullptr;
  p.want_b = f.grad_bias[0] != nullptr;
  // One split of each region mirrors the gradients' own layouts, one after the other.
  red = ReduceParams{};
  struct Seg {
    int64_t off, len;
    void* dst;
  };
  std::vector<Seg> w_segs, b_segs;
  int64_t w_len = 0, b_len = 0;
  if (p.want_w) {
    for (int k = 0; k < f.K; ++k) {
      p.gw_off[k] = f.late ? w_len : feat_off[k];
      p.gw_ld[k] = f.late ? f.dims[k] : D;
      p.gw_group_step[k] = f.late ? f.widths[k] * f.dims[k] : f.widths[0] * D;
      if (f.late) {
        w_segs.push_back({w_len, groups * f.widths[k] * f.dims[k], f.grad_weight[k]});
        w_len += w_segs.back().len;
      }
    }
    if (!f.late) {
      w_segs.push_back({0, groups * f.widths[0] * D, f.grad_weight[0]});
      w_len = w_segs.back().len;
    }
  }
  if (p.want_b) {
    for (int k = 0; k < (f.late ? f.K : 1); ++k) {
      p.gb_off[k] = b_len;
      p.gb_group_step[k] = f.widths[k];
      b_segs.push_back({b_len, groups * f.widths[k], f.grad_bias[k]});
      b_len += b_segs.back().len;
    }
  }
  // grad_W: split the batch so that the partial-sum blocks fill the device about twice.
  const int64_t tiles = std::max<int64_t>(1, groups * gw_tiles);
  int64_t ns = ceil_div(2 * (int64_t)std::max(1, f.num_sms), tiles);
  ns = std::min<int64_t>(std::max<int64_t>(ns, 1), std::max<int64_t>(1, ceil_div(f.B, 64)));
  ns = std::min<int64_t>(ns, 256);
  p.chunk = f.B > 0 ? ceil_div(ceil_div(f.B, ns), P::BK) * P::BK : 0;
  p.nsplit = f.B > 0 ? (int32_t)ceil_div(f.B, p.chunk) : 1;
  // grad_b: one thread per column walks its chunk's rows: about 8 chunks per multiprocessor,
  // of at least 64 rows.
  const int64_t target_b = std::min<int64_t>(4096, 8 * (int64_t)std::max(1, f.num_sms));
  p.chunk_b = f.B > 0 ? std::max<int64_t>(64, ceil_div(f.B, target_b)) : 0;
  p.nsplit_b = f.B > 0 ? (int32_t)ceil_div(f.B, p.chunk_b) : 1;
  p.split_elems = w_len;
  p.b_split_elems = b_len;
  p.b_base = (int64_t)p.nsplit * w_len;
  for (const Seg& g : w_segs) {
    red.seg_src[red.nseg] = g.off;
    red.seg_len[red.nseg] = g.len;
    red.seg_stride[red.nseg] = w_len;
    red.seg_nsplit[red.nseg] = p.nsplit;
    red.seg_dst[red.nseg] = g.dst;
    red.total += g.len;
    ++red.nseg;
  }
  for (const Seg& g : b_segs) {
    red.seg_src[red.nseg] = p.b_base + g.off;
    red.seg_len[red.nseg] = g.len;
    red.seg_stride[red.nseg] = b_len;
    red.seg_nsplit[red.nseg] = p.nsplit_b;
    red.seg_dst[red.nseg] = g.dst;
    red.total += g.len;
    ++red.nseg;
  }
  return p;
}

template <class P>
int64_t backward_workspace_elems_for(const FusedProblem& f) {
  ReduceParams red;
  const BackwardParams p = backward_params<P>(f, red);
  return p.b_base + (int64_t)p.nsplit_b * p.b_split_elems;
}

template <class P, int FaultKind = kNoFault>
void launch_backward(const FusedProblem& f, void* stream) {
  ReduceParams red;
  BackwardParams p = backward_params<P>(f, red);
  p.ws = f.workspace;
  red.ws = f.workspace;
  using Elem = typename P::elem;
  if (f.grad_x[0] != nullptr && f.B > 0 && p.gx_tile_start[f.K] > 0) {
    const int64_t blocks = ceil_div(f.B, P::BM) * p.gx_tile_start[f.K];
    MMK_LAUNCH((fused_grad_x_kernel<P, FaultKind>), blocks, P::THREADS, GradXSmem<P>::bytes(),
               stream, p);
  }
  if (p.want_w) {
    const int64_t blocks = (int64_t)p.nsplit * p.n_wgroups * p.gw_tile_start[f.K];
    if (blocks > 0)
      MMK_LAUNCH((fused_grad_w_kernel<P, FaultKind>), blocks, P::THREADS, GradWSmem<P>::bytes(),
                 stream, p);
  }
  if (p.want_b) {
    const int64_t blocks = (int64_t)p.nsplit_b * p.n_bgroups * ceil_div(p.out_ld, kBiasThreads);
    if (blocks > 0) MMK_LAUNCH(fused_grad_b_kernel<Elem>, blocks, kBiasThreads, 0, stream, p);
  }
  if (red.total > 0) {
    const int64_t blocks = std::min<int64_t>(ceil_div(red.total, kReduceThreads), 4096);
    MMK_LAUNCH(fused_reduce_kernel<Elem>, blocks, kReduceThreads, 0, stream, red);
  }
}

// Runs BODY with `P` naming the math policy of the problem's dtype (TF32 tensor cores for
// float32 when allowed, else SIMT FMA; SIMT for float64).
#define MMK_WITH_POLICY(f, ...)                                                  \
  switch ((::mmkernels::cuda::DType)(f).dtype) {                                \
    case ::mmkernels::cuda::DType::bf16: {                                      \
      using P = ::mmkernels::cuda::MmaPolicy<::mmkernels::cuda::bf16, 32>;      \
      __VA_ARGS__;                                                              \
    } break;                                                                    \
    case ::mmkernels::cuda::DType::f16: {                                       \
      using P = ::mmkernels::cuda::MmaPolicy<::mmkernels::cuda::f16, 32>;       \
      __VA_ARGS__;                                                              \
    } break;                                                                    \
    case ::mmkernels::cuda::DType::f32:                                         \
      if ((f).allow_tf32) {                                                     \
        using P = ::mmkernels::cuda::MmaPolicy<float, 16>;                      \
        __VA_ARGS__;                                                            \
      } else {                                                                  \
        using P = ::mmkernels::cuda::SimtPolicy<float>;                         \
        __VA_ARGS__;                                                            \
      }                                                                         \
      break;                                                                    \
    case ::mmkernels::cuda::DType::f64: {                                       \
      using P = ::mmkernels::cuda::SimtPolicy<double>;                          \
      __VA_ARGS__;                                                              \
    } break;                                                                    \
    default: throw std::invalid_argument("mmkernels: unknown dtype code");      \
  }

template <int FaultKind = kNoFault>
void forward(const FusedProblem& f, void* stream) {
  MMK_WITH_POLICY(f, launch_forward<P, FaultKind>(f, stream));
}

template <int FaultKind = kNoFault>
void backward(const FusedProblem& f, void* stream) {
  MMK_WITH_POLICY(f, launch_backward<P, FaultKind>(f, stream));
}

// Elements (float32, or float64 for float64) of the workspace backward() needs.
inline int64_t backward_workspace_elems(const FusedProblem& f) {
  int64_t n = 0;
  MMK_WITH_POLICY(f, n = backward_workspace_elems_for<P>(f));
  return n;
}

}  // namespace mmkernels::cuda
