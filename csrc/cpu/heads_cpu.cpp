// Head refits on the CPU (mmkernels/heads.py): batched, intercept-augmented Gram matrices for
// ridge, and a fused multinomial-logistic loss/gradient pass for all subsets at once.
//
// Both ops read Z [S, n, H] in row chunks. Within one (subset, chunk) the logits and the
// gradient GEMMs touch the same rows back to back, so the second read of Z hits the cache:
// the fused softmax op reads Z from memory once per evaluation instead of twice.
#include <mmkernels/checks.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace mmkernels::cpu {
namespace {

// float32 accumulation for float32/bfloat16 inputs, float64 for float64.
at::ScalarType gram_acc(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Rows per chunk: small enough that one subset's chunk (plus its logits) stays in L2.
int64_t chunk_rows(int64_t H, int64_t elem) {
  const int64_t target = 512 * 1024;  // bytes of Z per chunk
  return std::max<int64_t>(64, target / std::max<int64_t>(1, H * elem));
}

void check_z(const char* op, const at::Tensor& z) {
  MMK_CHECK(z.dim() == 3, op, ": z must be 3-d [S, n, H], got shape ", shape_str(z.sizes()));
  check_float_dtype(op, "z", z, /*allow_half=*/false);
  MMK_CHECK(z.device().is_cpu(), op, ": z must be a CPU tensor, got ", z.device());
}

// G[s] = [Z_s 1]^T [Z_s 1]  ([S, H+1, H+1]) and R[s] = [Z_s 1]^T Y  ([S, H+1, T]).
std::tuple<at::Tensor, at::Tensor> gram_cpu(const at::Tensor& z, const at::Tensor& y) {
  const char* op = "mmkernels::gram";
  check_z(op, z);
  const int64_t S = z.size(0), n = z.size(1), H = z.size(2);
  MMK_CHECK(y.dim() == 1 || y.dim() == 2, op, ": y must be [n] or [n, T], got shape ",
            shape_str(y.sizes()));
  MMK_CHECK(y.size(0) == n, op, ": y has ", y.size(0), " rows, expected n = ", n,
            " (dim 1 of z)");
  check_float_dtype(op, "y", y, /*allow_half=*/false);
  MMK_CHECK(y.device() == z.device(), op, ": y is on ", y.device(), ", expected ", z.device(),
            " (the device of z)");
  const auto acc = gram_acc(z.scalar_type());
  const at::Tensor y2 = (y.dim() == 1 ? y.unsqueeze(1) : y).to(acc);
  const int64_t T = y2.size(1);
  at::Tensor G = at::zeros({S, H + 1, H + 1}, z.options().dtype(acc));
  at::Tensor R = at::zeros({S, H + 1, T}, z.options().dtype(acc));
  if (n == 0) return {G, R};
  at::Tensor zz = G.narrow(1, 0, H).narrow(2, 0, H);
  at::Tensor zsum = G.narrow(1, 0, H).select(2, H);  // [S, H]
  at::Tensor zy = R.narrow(1, 0, H);                  // [S, H, T]
  // Chunking bounds the float32 copy of bfloat16 input; float32/float64 inputs are views.
  const int64_t rows = chunk_rows(H, 4) * 8;
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

// Runs task(0..tasks-1) on at most `threads` threads (the caller's among them).
template <typename F>
void run_tasks(int64_t tasks, int64_t threads, const F& task) {
  if (tasks <= 1 || threads <= 1) {  // no OpenMP region for work one thread does anyway
    for (int64_t t = 0; t < tasks; ++t) task(t);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, tasks / std::max<int64_t>(1, threads));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) task(t);
  });
}

// ---- fused multinomial-logistic pass ------------------------------------------------------
//
// The class count C is small (a head), so a GEMM with N = C runs far below peak in BLAS (MKL
// takes ~0.4 ms for 1024 x 128 x 6). Instead each row of Z is used twice while it sits in L1:
// C dot products for the logits (LANES independent accumulators, so the compiler vectorises
// without reassociating), softmax, then C axpys into the gradient. Z is read from memory once.
// The gradient is summed in BLOCK-row blocks in the compute dtype, then into float64.

constexpr int64_t LANES = 16;
constexpr int64_t BLOCK = 256;

// The build flags target baseline x86-64 (SSE2); the kernel is compiled a second time for
// AVX2+FMA and picked at run time. (target_clones("arch=haswell") is not used: its resolver
// tests for that exact CPU model, not for its features, and picks SSE2 on newer Xeons.)
#if defined(__GNUC__) && defined(__x86_64__)
#define MMK_HAVE_AVX2_CLONE 1
#define MMK_AVX2 __attribute__((target("avx2,fma")))
#define MMK_INLINE __attribute__((always_inline)) inline
#else
#define MMK_HAVE_AVX2_CLONE 0
#define MMK_AVX2
#define MMK_INLINE inline
#endif

// One subset: loss (float64, without the penalty), gw_t [C, H] and gb [C] (float64, summed).
template <typename T>
MMK_INLINE void softmax_subset_body(const T* z, int64_t ld, int64_t n, int64_t H, int64_t C,
                                    const T* wt, const T* b, const int64_t* y, const T* sw,
                                    double* loss, double* gw_t, double* gb) {
  const int64_t Hv = H / LANES * LANES;
  // Raw pointers, taken once: in the target_clones copies std::vector's members are not
  // inlined (different target), and a call per element access was the bottleneck.
  std::vector<T> buf(3 * C + C * H, T(0));
  T* logit = buf.data();
  T* prob = logit + C;
  T* blk_b = prob + C;
  T* blk_w = blk_b + C;
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T* __restrict__ zi = z + i * ld;
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < C; ++c) {
      const T* __restrict__ wc = wt + c * H;
      T a[LANES] = {};
      for (int64_t h0 = 0; h0 < Hv; h0 += LANES)
        for (int64_t l = 0; l < LANES; ++l) a[l] += zi[h0 + l] * wc[h0 + l];
      T v = b[c];
      for (int64_t l = 0; l < LANES; ++l) v += a[l];
      for (int64_t h = Hv; h < H; ++h) v += zi[h] * wc[h];
      logit[c] = v;
      m = std::max(m, v);
    }
    T sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += (prob[c] = std::exp(logit[c] - m));
    const T lse = m + std::log(sum), inv = T(1) / sum;
    const T wi = sw ? sw[i] : T(1);
    total += static_cast<double>(wi) * static_cast<double>(lse - logit[y[i]]);
    for (int64_t c = 0; c < C; ++c) {
      const T d = wi * (prob[c] * inv - (c == y[i] ? T(1) : T(0)));
      blk_b[c] += d;
      T* __restrict__ g = blk_w + c * H;
      for (int64_t h = 0; h < H; ++h) g[h] += d * zi[h];
    }
    if ((i + 1) % BLOCK == 0 || i + 1 == n) {
      for (int64_t j = 0; j < C * H; ++j) gw_t[j] += blk_w[j];
      for (int64_t c = 0; c < C; ++c) gb[c] += blk_b[c];
      for (int64_t j = 0; j < C * H; ++j) blk_w[j] = T(0);
      for (int64_t c = 0; c < C; ++c) blk_b[c] = T(0);
    }
  }
  *loss = total;
}

// The same for C <= CP with W padded to [H, CP] (zero columns past C): the logits of a row
// are H broadcast-FMAs over CP lanes, in four independent chains (no horizontal sums), and
// the gradient is H FMAs over the same lanes into gw [H, CP]. ~3x the throughput of the
// generic body at H = 64..128, C = 6.
// R rows at once: each W row loaded feeds R independent FMA chains (two per row, over even
// and odd h), and each gradient row is loaded and stored once per R rows instead of per row
// (one row at a time the kernel was bound by FMA latency and by stores).
template <typename T, int CP, int R>
MMK_INLINE void softmax_rows(const T* z, int64_t ld, int64_t i, int64_t H, int64_t C,
                             const T* wp, const T* b, const int64_t* y, const T* sw,
                             double& total, T* blk_w_raw, T* blk_b_raw) {
  typedef T V __attribute__((vector_size(CP * sizeof(T)), aligned(sizeof(T))));
  V* blk_w = reinterpret_cast<V*>(blk_w_raw);
  V* blk_b = reinterpret_cast<V*>(blk_b_raw);
  const V* wv = reinterpret_cast<const V*>(wp);
  const T* zr[R];
  for (int r = 0; r < R; ++r) zr[r] = z + (i + r) * ld;
  V a[R], a2[R], d[R];
  for (int r = 0; r < R; ++r) a[r] = a2[r] = V{};
  int64_t h = 0;
  for (; h + 2 <= H; h += 2) {
    const V w0 = wv[h], w1 = wv[h + 1];
    for (int r = 0; r < R; ++r) {
      a[r] += zr[r][h] * w0;
      a2[r] += zr[r][h + 1] * w1;
    }
  }
  if (h < H)
    for (int r = 0; r < R; ++r) a[r] += zr[r][h] * wv[h];
  for (int r = 0; r < R; ++r) {
    const V acc = a[r] + a2[r];
    T logit[CP];
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < C; ++c) {
      logit[c] = b[c] + acc[c];
      m = logit[c] > m ? logit[c] : m;
    }
    V e = {};
    T sum = 0;
    for (int64_t c = 0; c < C; ++c) {
      e[c] = std::exp(logit[c] - m);
      sum += e[c];
    }
    const int64_t yi = y[i + r];
    const T lse = m + std::log(sum), inv = T(1) / sum;
    const T wi = sw ? sw[i + r] : T(1);
    total += static_cast<double>(wi) * static_cast<double>(lse - logit[yi]);
    d[r] = (wi * inv) * e;  // padded lanes stay 0
    d[r][yi] -= wi;
    *blk_b += d[r];
  }
  for (int64_t hh = 0; hh < H; ++hh) {
    V g = blk_w[hh];
    for (int r = 0; r < R; ++r) g += zr[r][hh] * d[r];
    blk_w[hh] = g;
  }
}

template <typename T, int CP>
MMK_INLINE void softmax_subset_padded(const T* z, int64_t ld, int64_t n, int64_t H, int64_t C,
                                      const T* wp, const T* b, const int64_t* y, const T* sw,
                                      double* loss, double* gw, double* gb) {
  // Explicit GCC vectors of CP lanes (unaligned access allowed): left to itself the
  // auto-vectoriser interleaved the h and c loops with permutes and ran 3x slower.
  constexpr int R = 4;
  std::vector<T> buf(H * CP + CP, T(0));
  T* blk_w = buf.data();
  T* blk_b = blk_w + H * CP;
  double total = 0;
  int64_t i = 0;
  while (i < n) {
    // Flush the block partial sums into float64 every BLOCK rows.
    const int64_t stop = std::min(n, i + BLOCK);
    for (; i + R <= stop; i += R)
      softmax_rows<T, CP, R>(z, ld, i, H, C, wp, b, y, sw, total, blk_w, blk_b);
    for (; i < stop; ++i) softmax_rows<T, CP, 1>(z, ld, i, H, C, wp, b, y, sw, total, blk_w, blk_b);
    for (int64_t j = 0; j < H * CP; ++j) gw[j] += blk_w[j];
    for (int64_t c = 0; c < C; ++c) gb[c] += blk_b[c];
    std::fill(buf.begin(), buf.end(), T(0));
  }
  *loss = total;
}

// Lanes of the padded layout for C classes; 0 = the generic [C, H] layout.
int64_t padded_lanes(int64_t C) { return C <= 8 ? 8 : C <= 16 ? 16 : C <= 32 ? 32 : 0; }

template <typename T>
MMK_INLINE void softmax_subset_any(const T* z, int64_t ld, int64_t n, int64_t H, int64_t C,
                                   const T* w, const T* b, const int64_t* y, const T* sw,
                                   double* loss, double* gw, double* gb) {
  switch (padded_lanes(C)) {
    case 8: return softmax_subset_padded<T, 8>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
    case 16: return softmax_subset_padded<T, 16>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
    case 32: return softmax_subset_padded<T, 32>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
    default: return softmax_subset_body<T>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
  }
}

template <typename T>
void softmax_subset_sse2(const T* z, int64_t ld, int64_t n, int64_t H, int64_t C, const T* w,
                         const T* b, const int64_t* y, const T* sw, double* loss, double* gw,
                         double* gb) {
  softmax_subset_any<T>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
}

#if MMK_HAVE_AVX2_CLONE
template <typename T>
MMK_AVX2 void softmax_subset_avx2(const T* z, int64_t ld, int64_t n, int64_t H, int64_t C,
                                  const T* w, const T* b, const int64_t* y, const T* sw,
                                  double* loss, double* gw, double* gb) {
  softmax_subset_any<T>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
}
#endif

bool cpu_has_avx2_fma() {
#if MMK_HAVE_AVX2_CLONE
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

template <typename T>
void softmax_subset(const T* z, int64_t ld, int64_t n, int64_t H, int64_t C, const T* w,
                    const T* b, const int64_t* y, const T* sw, double* loss, double* gw,
                    double* gb) {
#if MMK_HAVE_AVX2_CLONE
  if (cpu_has_avx2_fma()) {
    softmax_subset_avx2<T>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
    return;
  }
#endif
  softmax_subset_sse2<T>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
}

// loss[s] = sum_i sw_i * CE(z_si W_s + b_s, y_i) + l2/2 ||W_s||^2 and its gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_regression_loss_grad_cpu(
    const at::Tensor& z, const at::Tensor& y, const at::Tensor& w, const at::Tensor& b,
    const c10::optional<at::Tensor>& sample_weight, double l2,
    const c10::optional<at::Tensor>& subset_index) {
  const char* op = "mmkernels::softmax_regression_loss_grad";
  check_z(op, z);
  const int64_t S = z.size(0), n = z.size(1), H = z.size(2);
  // subset_index picks which subsets of z to evaluate (w and b then hold one row per pick),
  // so a solver can skip converged subsets without copying z.
  at::Tensor index;
  if (subset_index.has_value()) {
    index = subset_index->contiguous();
    MMK_CHECK(index.scalar_type() == at::kLong && index.dim() == 1, op,
              ": subset_index must be a 1-d int64 tensor, got ", index.scalar_type(), " ",
              shape_str(index.sizes()));
    if (index.numel() > 0) {
      const int64_t lo = index.min().item<int64_t>(), hi = index.max().item<int64_t>();
      MMK_CHECK(lo >= 0 && hi < S, op, ": subset_index must hold subsets in [0, ", S - 1,
                "] (S = dim 0 of z), got values in [", lo, ", ", hi, "]");
    }
  }
  const int64_t K = index.defined() ? index.size(0) : S;
  MMK_CHECK(w.dim() == 3, op, ": w must be 3-d [S, H, C], got shape ", shape_str(w.sizes()));
  MMK_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble, op,
            ": w must be float32 or float64 (it sets the compute dtype), got ", w.scalar_type());
  const int64_t C = w.size(2);
  MMK_CHECK(C >= 1, op, ": w must have at least one class (dim 2), got shape ",
            shape_str(w.sizes()));
  check_shape(op, "w", w, {K, H, C},
              index.defined() ? "[len(subset_index), H, C]" : "[S, H, C] with S, H from z");
  check_same(op, "b", b, w, "w");
  check_shape(op, "b", b, {K, C}, index.defined() ? "[len(subset_index), C]" : "[S, C]");
  MMK_CHECK(w.device() == z.device(), op, ": w is on ", w.device(), ", expected ", z.device(),
            " (the device of z)");
  MMK_CHECK(y.scalar_type() == at::kLong, op, ": y must be int64 class labels, got ",
            y.scalar_type());
  check_shape(op, "y", y, {n}, "[n], n from z");
  MMK_CHECK(std::isfinite(l2) && l2 >= 0, op, ": l2 must be finite and >= 0, got ", l2);
  const auto acc = w.scalar_type();
  const at::Tensor yc = y.contiguous();
  if (n > 0) {
    const int64_t lo = yc.min().item<int64_t>(), hi = yc.max().item<int64_t>();
    MMK_CHECK(lo >= 0 && hi < C, op, ": y must hold labels in [0, ", C - 1,
              "] (C = dim 2 of w), got labels in [", lo, ", ", hi, "]");
  }
  at::Tensor sw;
  if (sample_weight.has_value()) {
    check_shape(op, "sample_weight", *sample_weight, {n}, "[n], n from z");
    check_float_dtype(op, "sample_weight", *sample_weight, false);
    sw = sample_weight->to(acc).contiguous();
  }
  // z in the compute dtype with unit-stride rows (a no-op for contiguous float32/float64 z).
  at::Tensor zc = z.to(acc);
  if (zc.stride(2) != 1) zc = zc.contiguous();
  // Weights in the kernel's layout: [K, H, CP] zero-padded, or [K, C, H] for large C.
  const int64_t CP = padded_lanes(C);
  at::Tensor wl;
  if (CP) {
    wl = at::zeros({K, H, CP}, w.options());
    wl.narrow(2, 0, C).copy_(w);
  } else {
    wl = w.transpose(1, 2).contiguous();
  }
  const int64_t wsize = H * (CP ? CP : C);
  const at::Tensor bc = b.contiguous();
  at::Tensor loss = at::zeros({K}, w.options().dtype(at::kDouble));
  at::Tensor gw_l = at::zeros(wl.sizes(), w.options().dtype(at::kDouble));
  at::Tensor gb = at::zeros({K, C}, w.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(acc, "softmax_regression_loss_grad", [&] {
    const scalar_t* zp = zc.data_ptr<scalar_t>();
    const int64_t ss = zc.stride(0), ld = zc.stride(1);
    const scalar_t* swp = sw.defined() ? sw.data_ptr<scalar_t>() : nullptr;
    const int64_t* pick = index.defined() ? index.data_ptr<int64_t>() : nullptr;
    // Tasks are (subset, row block) pairs, at least ~4 per thread for balance; each has its
    // own partial sums, added in task order, so a given thread count gives fixed results.
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t want = (4 * threads + K - 1) / std::max<int64_t>(K, 1);
    const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(want, (n + 1023) / 1024));
    std::vector<double> part_loss(K * splits, 0.0), part_w(K * splits * wsize, 0.0),
        part_b(K * splits * C, 0.0);
    const int64_t per = splits > 1 ? (n + splits - 1) / splits : n;
    run_tasks(K * splits, threads, [&](int64_t t) {
      {  // one (subset, row block) task
        const int64_t s = t / splits, part = t % splits;
        const int64_t r0 = std::min(n, part * per), r1 = std::min(n, r0 + per);
        if (r1 <= r0) return;
        const scalar_t* swr = swp ? swp + r0 : nullptr;
        const int64_t zs = pick ? pick[s] : s;
        softmax_subset<scalar_t>(zp + zs * ss + r0 * ld, ld, r1 - r0, H, C,
                                 wl.data_ptr<scalar_t>() + s * wsize,
                                 bc.data_ptr<scalar_t>() + s * C, yc.data_ptr<int64_t>() + r0,
                                 swr, &part_loss[t], part_w.data() + t * wsize,
                                 part_b.data() + t * C);
      }
    });
    double* lp = loss.data_ptr<double>();
    double* gwp = gw_l.data_ptr<double>();
    double* gbp = gb.data_ptr<double>();
    for (int64_t t = 0; t < K * splits; ++t) {
      const int64_t s = t / splits;
      lp[s] += part_loss[t];
      for (int64_t j = 0; j < wsize; ++j) gwp[s * wsize + j] += part_w[t * wsize + j];
      for (int64_t c = 0; c < C; ++c) gbp[s * C + c] += part_b[t * C + c];
    }
  });
  const at::Tensor wd = w.to(at::kDouble);
  loss.add_(wd.square().sum({1, 2}), 0.5 * l2);
  at::Tensor gw = (CP ? gw_l.narrow(2, 0, C) : gw_l.transpose(1, 2)).add(wd, l2);
  return {loss.to(acc), gw.to(acc).contiguous(), gb.to(acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("gram", &gram_cpu);
  m.impl("softmax_regression_loss_grad", &softmax_regression_loss_grad_cpu);
}

}  // namespace mmkernels::cpu
