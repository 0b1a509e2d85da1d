// Head refits on the CPU (mmkernels/heads.py): batched, intercept-augmented Gram matrices for
// ridge, and a fused multinomial-logistic loss/gradient pass for all subsets at once.
//
// Both ops read Z [S, n, H] in row chunks. Within one (subset, chunk) the logits and the
// gradient GEMMs touch the same rows back to back, so the second read of Z hits the cache:
// the fused softmax op reads Z from memory once per evaluation instead of twice.
#include <mmkernels/checks.h>
#include <mmkernels/memory_budget.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
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
  check_defined(op, "z", z);
  MMK_CHECK(z.dim() == 3, op, ": z must be 3-d [S, n, H], got shape ", shape_str(z.sizes()));
  check_float_dtype(op, "z", z, /*allow_half=*/false);
  MMK_CHECK(z.device().is_cpu(), op, ": z must be a CPU tensor, got ", z.device());
}

// G[s] = [Z_s 1]^T [Z_s 1]  ([S, H+1, H+1]) and R[s] = [Z_s 1]^T Y  ([S, H+1, T]).
std::tuple<at::Tensor, at::Tensor> gram_cpu(const at::Tensor& z, const at::Tensor& y) {
  const char* op = "mmkernels::gram";
  check_z(op, z);
  const int64_t S = z.size(0), n = z.size(1), H = z.size(2);
  check_defined(op, "y", y);
  MMK_CHECK(y.dim() == 1 || y.dim() == 2, op, ": y must be [n] or [n, T], got shape ",
            shape_str(y.sizes()));
  MMK_CHECK(y.size(0) == n, op, ": y has ", y.size(0), " rows, expected n = ", n,
            " (dim 1 of z)");
  check_float_dtype(op, "y", y, /*allow_half=*/false);
  MMK_CHECK(y.device() == z.device(), op, ": y is on ", y.device(), ", expected ", z.device(),
            " (the device of z)");
  const auto acc = gram_acc(z.scalar_type());
  {  // G and R, the two [S, H, H] temporaries of the symmetrisation, y in acc
    const double a = (double)c10::elementSize(acc), T = y.dim() == 1 ? 1.0 : (double)y.size(1);
    const double H1 = (double)H + 1;
    check_memory_budget(op, a * ((double)S * H1 * (3 * H1 + T) + (double)n * T), z.device(),
                        "the Gram matrices [S, H+1, H+1] of z " + shape_str(z.sizes()));
  }
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

// Runs task(0..tasks-1) on at most `threads` threads, the caller's among them. Threads claim
// tasks from a shared counter, and the helpers come from ATen's inter-op pool (at::launch)
// rather than an OpenMP team: an OpenMP region ends in a barrier that waits for every team
// thread, so on a machine shared with other busy processes a helper that gets a CPU a
// scheduler time slice late (milliseconds) stalled every call. Here the caller runs whatever
// the helpers have not claimed and waits only for tasks a helper is running; a helper that
// starts after the last task was claimed finds nothing and returns (it touches only the
// shared, reference-counted counters). Results do not depend on which thread ran a task:
// each task has its own output slot, summed in task order afterwards.
//
// Exceptions: a task that throws (on any thread) stops the claiming of further tasks (the
// unclaimed ones are counted done at once); the caller still waits for every claimed task,
// so no helper runs a task after this frame is gone, then rethrows the first exception. (The
// inter-op pool would swallow a helper's exception; here it never leaves `work`.) If
// at::launch itself throws, the same: stop, wait for the claimed tasks, rethrow.
template <typename F>
void run_tasks(int64_t tasks, int64_t threads, const F& task) {
  if (tasks <= 1 || threads <= 1) {
    for (int64_t t = 0; t < tasks; ++t) task(t);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<bool> failed{false};
    std::exception_ptr error;  // written once, by the thread that set `failed`
    int64_t total = 0;
    // No further task is claimed; those never claimed count as done.
    void stop() {
      const int64_t first_unclaimed = next.exchange(total);
      if (first_unclaimed < total)
        done.fetch_add(total - first_unclaimed, std::memory_order_release);
    }
    void fail(std::exception_ptr e) {
      if (!failed.exchange(true)) error = std::move(e);
      stop();
    }
  };
  auto shared = std::make_shared<Shared>();
  shared->total = tasks;
  const std::function<void(int64_t)> run = [&task](int64_t t) { task(t); };
  // A helper may outlive this call: it holds `shared`, and dereferences `fn` (this frame's
  // `run`) only for a task it claimed, which this call waits for.
  auto work = [shared](const std::function<void(int64_t)>* fn) {
    for (int64_t t = shared->next.fetch_add(1); t < shared->total;
         t = shared->next.fetch_add(1)) {
      try {
        (*fn)(t);
      } catch (...) {
        shared->fail(std::current_exception());  // before this task's `done`: seen by the caller
      }
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  try {
    for (int64_t h = 1; h < std::min(threads, tasks); ++h)
      at::launch([work, fn = &run]() { work(fn); });
  } catch (...) {
    shared->fail(std::current_exception());
  }
  work(&run);
  while (shared->done.load(std::memory_order_acquire) < shared->total) std::this_thread::yield();
  if (shared->failed.load(std::memory_order_acquire)) std::rethrow_exception(shared->error);
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
#define MMK_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))
#define MMK_INLINE __attribute__((always_inline)) inline
#else
#define MMK_HAVE_AVX2_CLONE 0
#define MMK_AVX2
#define MMK_AVX512
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

// Lanes of the padded layout for C classes; 0 = the [C, H] layout (the rows-in-lanes kernel
// for C <= 8, the generic body above 32).
int64_t padded_lanes(int64_t C) { return C <= 8 ? 0 : C <= 16 ? 16 : C <= 32 ? 32 : 0; }

// ---- rows in vector lanes, for C <= 8 ------------------------------------------------------
//
// The padded kernel above puts classes in the lanes: 8 lanes for 6 classes, a broadcast per
// multiply-add, and one scalar exp per class and row. This one runs one 64-byte vector (16
// float32 or 8 float64 lanes) along h for the logits and the gradient, and along rows for
// the softmax:
// * logits: for each row and class, a vector of partial dot products over h (the FMAs read Z
//   row-major, as stored); the L partial vectors of a class over L rows are folded into one
//   vector of L row logits by a log2(L)-level shuffle tree (lane j ends up holding the sum of
//   input bitrev(j), so rows are placed at bit-reversed slots).
// * softmax, loss, d = p - onehot: on those row vectors, with a polynomial exp (Cody-Waite
//   reduction; Cephes' float polynomial, a degree-13 Taylor series for float64).
// * gradient: gw[c, h-vector] += d[row, c] * z[row, h-vector], the accumulators held in
//   registers over a block of rows (C x HC vectors at a time).
// Measured 5-7x the padded kernel's rate at H = 128, C = 6 (AVX-512).

template <typename T>
struct Lanes {
  static constexpr int L = 64 / static_cast<int>(sizeof(T));
  typedef T V __attribute__((vector_size(64)));
  typedef T VU __attribute__((vector_size(64), aligned(sizeof(T))));  // unaligned loads
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I M __attribute__((vector_size(64)));
};

template <int L>
constexpr int bitrev(int j) {
  int r = 0;
  for (int b = 1; b < L; b <<= 1, j >>= 1) r = (r << 1) | (j & 1);
  return r;
}

// One level of the fold: out lane block q (size B) = sum of blocks 2(q/2) and 2(q/2)+1 of
// a (q even) or b (q odd). Lane j of the shuffle takes input lane fold_index(j) of a:b.
template <typename T, int B, bool HI>
constexpr int fold_index(int j) {
  constexpr int L = Lanes<T>::L;
  const int q = j / B, o = j % B, blk = (q / 2) * 2 + (HI ? 1 : 0);
  return (q % 2 ? L : 0) + blk * B + o;
}

#if defined(__clang__)
// Clang has no __builtin_shuffle; __builtin_shufflevector takes the lanes as constants.
template <typename T, int B, bool HI, int... J>
MMK_INLINE typename Lanes<T>::V fold_shuffle(const typename Lanes<T>::V& a,
                                             const typename Lanes<T>::V& b,
                                             std::integer_sequence<int, J...>) {
  return __builtin_shufflevector(a, b, fold_index<T, B, HI>(J)...);
}

template <typename T, int B>
MMK_INLINE void fold_levels(typename Lanes<T>::V* v, int count) {
  using Seq = std::make_integer_sequence<int, Lanes<T>::L>;
  for (int k = 0; k < count / 2; ++k)
    v[k] = fold_shuffle<T, B, false>(v[2 * k], v[2 * k + 1], Seq{}) +
           fold_shuffle<T, B, true>(v[2 * k], v[2 * k + 1], Seq{});
  if constexpr (B > 1) fold_levels<T, B / 2>(v, count / 2);
}
#else
template <typename T, int B, bool HI>
MMK_INLINE typename Lanes<T>::M fold_mask() {
  constexpr int L = Lanes<T>::L;
  typename Lanes<T>::M m;
  for (int j = 0; j < L; ++j) m[j] = fold_index<T, B, HI>(j);
  return m;
}

template <typename T, int B>
MMK_INLINE void fold_levels(typename Lanes<T>::V* v, int count) {
  const auto lo = fold_mask<T, B, false>(), hi = fold_mask<T, B, true>();
  for (int k = 0; k < count / 2; ++k)
    v[k] = __builtin_shuffle(v[2 * k], v[2 * k + 1], lo) +
           __builtin_shuffle(v[2 * k], v[2 * k + 1], hi);
  if constexpr (B > 1) fold_levels<T, B / 2>(v, count / 2);
}
#endif

// exp of x <= ~0 (x is a logit minus the row maximum); underflow clamps near the denormals.
template <typename T>
MMK_INLINE void vexp(const typename Lanes<T>::V& xin, typename Lanes<T>::V& out) {
  using V = typename Lanes<T>::V;
  using M = typename Lanes<T>::M;
  if constexpr (sizeof(T) == 4) {
    V x = xin < T(-87) ? V{} + T(-87) : xin;
    x = x > T(88) ? V{} + T(88) : x;
    const V t = x * T(1.44269504088896341);
    const V k = (t + T(12582912.0f)) - T(12582912.0f);  // round to nearest
    const V r = (x - k * T(0.693359375)) - k * T(-2.12194440e-4);
    V p = V{} + T(1.9875691500E-4);
    p = p * r + T(1.3981999507E-3);
    p = p * r + T(8.3334519073E-3);
    p = p * r + T(4.1665795894E-2);
    p = p * r + T(1.6666665459E-1);
    p = p * r + T(5.0000001201E-1);
    const V e = p * (r * r) + r + T(1);
    const M bits = (__builtin_convertvector(k, M) + 127) << 23;
    V scale;
    __builtin_memcpy(&scale, &bits, sizeof(V));
    out = e * scale;
  } else {
    V x = xin < T(-708) ? V{} + T(-708) : xin;
    x = x > T(709) ? V{} + T(709) : x;
    const V t = x * T(1.4426950408889634074);
    const V k = (t + T(6755399441055744.0)) - T(6755399441055744.0);
    const V r = (x - k * T(6.93145751953125E-1)) - k * T(1.42860682030941723212E-6);
    // Taylor to r^13 / 13!: |r| <= 0.347, truncation error < 1e-17 relative.
    V p = V{} + T(1.0 / 6227020800.0);
    const double inv_fact[] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                               1.0 / 362880.0,    1.0 / 40320.0,    1.0 / 5040.0,
                               1.0 / 720.0,       1.0 / 120.0,      1.0 / 24.0,
                               1.0 / 6.0,         0.5,              1.0,
                               1.0};
    for (double f : inv_fact) p = p * r + T(f);
    const M bits = (__builtin_convertvector(k, M) + 1023) << 52;
    V scale;
    __builtin_memcpy(&scale, &bits, sizeof(V));
    out = p * scale;
  }
}

// log of x > 0 normal (a softmax denominator, >= 1): Cephes' logf polynomial for float32,
// the scalar std::log per lane for float64.
template <typename T>
MMK_INLINE void vlog(const typename Lanes<T>::V& xin, typename Lanes<T>::V& out) {
  using V = typename Lanes<T>::V;
  using M = typename Lanes<T>::M;
  if constexpr (sizeof(T) == 4) {
    M bits;
    __builtin_memcpy(&bits, &xin, sizeof(V));
    M e = ((bits >> 23) & 0xff) - 126;
    const M mant = (bits & 0x807fffff) | 0x3f000000;  // x = mant * 2^e, mant in [0.5, 1)
    V x;
    __builtin_memcpy(&x, &mant, sizeof(V));
    const M small = x < T(0.707106781186547524);
    e = small ? e - 1 : e;
    x = small ? x + x - T(1) : x - T(1);
    const V z = x * x;
    V p = V{} + T(7.0376836292E-2);
    p = p * x + T(-1.1514610310E-1);
    p = p * x + T(1.1676998740E-1);
    p = p * x + T(-1.2420140846E-1);
    p = p * x + T(1.4249322787E-1);
    p = p * x + T(-1.6668057665E-1);
    p = p * x + T(2.0000714765E-1);
    p = p * x + T(-2.4999993993E-1);
    p = p * x + T(3.3333331174E-1);
    p = p * x * z;
    const V ef = __builtin_convertvector(e, V);
    p += ef * T(-2.12194440e-4);
    p += z * T(-0.5);
    out = x + p + ef * T(0.693359375);
  } else {
    for (int l = 0; l < Lanes<T>::L; ++l) out[l] = std::log(xin[l]);
  }
}

// One subset, rows [0, n): loss (float64, without the penalty), gw [C, H] and gb [C] (float64,
// added to). wt is W transposed: [C, H].
template <typename T, int C>
MMK_INLINE void softmax_subset_lanes(const T* z, int64_t ld, int64_t n, int64_t H, const T* wt,
                                     const T* b, const int64_t* y, const T* sw, double* loss,
                                     double* gw, double* gb) {
  using V = typename Lanes<T>::V;
  using VU = typename Lanes<T>::VU;
  constexpr int L = Lanes<T>::L;
  constexpr int HC = 24 / C >= 16 ? 16 : 24 / C >= 8 ? 8 : 24 / C >= 4 ? 4 : 2;
  constexpr int64_t FLUSH = 256;  // rows between float32 -> float64 flushes
  const int64_t NV = H / L, Hv = NV * L, Ht = H - Hv;
  // Workspace: row partial sums [C][L], gradient accumulators [C][NV] (vectors), bias
  // accumulators [C], gradient tail [C][Ht], d [C][L] and weights [L] (scalars).
  // (std::vector<V> would not honour V's 64-byte alignment: the attribute is dropped on
  // template arguments.)
  std::vector<char> raw((C * L + C * NV + C + 1) * sizeof(V));
  V* part = reinterpret_cast<V*>((reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t(63));
  V* gacc = part + C * L;
  V* bacc = gacc + C * NV;
  std::vector<T> sbuf(C * Ht + C * L + L, T(0));
  T* gtail = sbuf.data();
  T* dbuf = gtail + C * Ht;
  T* wbuf = dbuf + C * L;
  for (int64_t j = 0; j < C * NV + C; ++j) gacc[j] = V{};
  double total = 0;
#define load(p) (*reinterpret_cast<const VU*>(p))
  for (int64_t i0 = 0; i0 < n; i0 += L) {
    const int nb = static_cast<int>(std::min<int64_t>(L, n - i0));
    const T* zb = z + i0 * ld;
    // Logits: partial vectors over h, two rows at a time (2C independent FMA chains).
    int r = 0;
    for (; r + 2 <= nb; r += 2) {
      const T* z0 = zb + r * ld;
      const T* z1 = z0 + ld;
      V a0[C], a1[C];
      for (int c = 0; c < C; ++c) a0[c] = a1[c] = V{};
      // Z streams from memory here (the gradient re-reads it from cache): fetch the rows two
      // blocks ahead (prefetches never fault past the end). A separate loop: inside the FMA
      // loop they made GCC spill the accumulators.
      for (int64_t v = 0; v < NV; ++v) {
        __builtin_prefetch(z0 + 2 * L * ld + v * L);
        __builtin_prefetch(z1 + 2 * L * ld + v * L);
      }
      for (int64_t v = 0; v < NV; ++v) {
        const V x0 = load(z0 + v * L), x1 = load(z1 + v * L);
        for (int c = 0; c < C; ++c) {
          const V w = load(wt + c * H + v * L);
          a0[c] += x0 * w;
          a1[c] += x1 * w;
        }
      }
      for (int c = 0; c < C; ++c) {
        part[c * L + bitrev<L>(r)] = a0[c];
        part[c * L + bitrev<L>(r + 1)] = a1[c];
      }
    }
    for (; r < nb; ++r) {
      const T* z0 = zb + r * ld;
      V a0[C];
      for (int c = 0; c < C; ++c) a0[c] = V{};
      for (int64_t v = 0; v < NV; ++v) {
        const V x0 = load(z0 + v * L);
        for (int c = 0; c < C; ++c) a0[c] += x0 * load(wt + c * H + v * L);
      }
      for (int c = 0; c < C; ++c) part[c * L + bitrev<L>(r)] = a0[c];
    }
    for (; r < L; ++r)
      for (int c = 0; c < C; ++c) part[c * L + bitrev<L>(r)] = V{};
    V lg[C];
    for (int c = 0; c < C; ++c) {
      fold_levels<T, L / 2>(part + c * L, L);
      lg[c] = part[c * L] + b[c];
    }
    if (Ht > 0)
      for (int rr = 0; rr < nb; ++rr)
        for (int c = 0; c < C; ++c) {
          T s = 0;
          for (int64_t h = Hv; h < H; ++h) s += zb[rr * ld + h] * wt[c * H + h];
          lg[c][rr] += s;
        }
    // Softmax over classes, per row lane; rows past nb get weight 0.
    for (int l = 0; l < L; ++l) wbuf[l] = l < nb ? (sw ? sw[i0 + l] : T(1)) : T(0);
    V m = lg[0];
    for (int c = 1; c < C; ++c) m = m > lg[c] ? m : lg[c];
    V e[C];
    V sum = V{};
    for (int c = 0; c < C; ++c) {
      vexp<T>(lg[c] - m, e[c]);
      sum += e[c];
    }
    // Loss w (lse - logit[y]) and d = w (p - onehot(y)), on lane vectors (label 0 and weight
    // 0 past nb).
    using M = typename Lanes<T>::M;
    M yv = M{};
    for (int l = 0; l < nb; ++l) yv[l] = static_cast<typename Lanes<T>::I>(y[i0 + l]);
    const V wv = load(wbuf);
    const V scale = wv / sum;
    V lse;
    vlog<T>(sum, lse);
    lse += m;
    V ly = V{};
    for (int c = 0; c < C; ++c) {
      const M is = yv == c;
      ly = is ? lg[c] : ly;
      const V pc = e[c] * scale;
      const V d = is ? pc - wv : pc;
      *reinterpret_cast<VU*>(dbuf + c * L) = d;
      bacc[c] += d;
    }
    const V lv = wv * (lse - ly);
    double block_loss = 0;
    for (int l = 0; l < L; ++l) block_loss += static_cast<double>(lv[l]);
    total += block_loss;
    // Gradient: HC vectors of h for all classes in registers over the block's rows.
    int64_t v0 = 0;
    for (; v0 + HC <= NV; v0 += HC) {
      V g[C][HC];
      for (int c = 0; c < C; ++c)
        for (int j = 0; j < HC; ++j) g[c][j] = gacc[c * NV + v0 + j];
      for (int rr = 0; rr < nb; ++rr) {
        const T* zr = zb + rr * ld + v0 * L;
        V x[HC];
        for (int j = 0; j < HC; ++j) x[j] = load(zr + j * L);
        for (int c = 0; c < C; ++c) {
          const T d = dbuf[c * L + rr];
          for (int j = 0; j < HC; ++j) g[c][j] += d * x[j];
        }
      }
      for (int c = 0; c < C; ++c)
        for (int j = 0; j < HC; ++j) gacc[c * NV + v0 + j] = g[c][j];
    }
    for (; v0 < NV; ++v0) {
      V g[C];
      for (int c = 0; c < C; ++c) g[c] = gacc[c * NV + v0];
      for (int rr = 0; rr < nb; ++rr) {
        const V x = load(zb + rr * ld + v0 * L);
        for (int c = 0; c < C; ++c) g[c] += dbuf[c * L + rr] * x;
      }
      for (int c = 0; c < C; ++c) gacc[c * NV + v0] = g[c];
    }
    if (Ht > 0)
      for (int rr = 0; rr < nb; ++rr)
        for (int c = 0; c < C; ++c) {
          const T d = dbuf[c * L + rr];
          for (int64_t h = 0; h < Ht; ++h) gtail[c * Ht + h] += d * zb[rr * ld + Hv + h];
        }
    if ((i0 + L) % FLUSH == 0 || i0 + L >= n) {  // float32 partial sums into float64
      for (int c = 0; c < C; ++c) {
        for (int64_t v = 0; v < NV; ++v) {
          for (int l = 0; l < L; ++l) gw[c * H + v * L + l] += gacc[c * NV + v][l];
          gacc[c * NV + v] = V{};
        }
        for (int64_t h = 0; h < Ht; ++h) {
          gw[c * H + Hv + h] += gtail[c * Ht + h];
          gtail[c * Ht + h] = T(0);
        }
        double s = 0;
        for (int l = 0; l < L; ++l) s += bacc[c][l];
        gb[c] += s;
        bacc[c] = V{};
      }
    }
  }
#undef load
  *loss = total;
}

template <typename T>
MMK_INLINE void softmax_subset_lanes_any(const T* z, int64_t ld, int64_t n, int64_t H,
                                         int64_t C, const T* wt, const T* b, const int64_t* y,
                                         const T* sw, double* loss, double* gw, double* gb) {
  switch (C) {
#define MMK_LANES_CASE(K) \
  case K: return softmax_subset_lanes<T, K>(z, ld, n, H, wt, b, y, sw, loss, gw, gb);
    MMK_LANES_CASE(1) MMK_LANES_CASE(2) MMK_LANES_CASE(3) MMK_LANES_CASE(4)
    MMK_LANES_CASE(5) MMK_LANES_CASE(6) MMK_LANES_CASE(7) MMK_LANES_CASE(8)
#undef MMK_LANES_CASE
    default: return softmax_subset_body<T>(z, ld, n, H, C, wt, b, y, sw, loss, gw, gb);
  }
}

template <typename T>
MMK_INLINE void softmax_subset_any(const T* z, int64_t ld, int64_t n, int64_t H, int64_t C,
                                   const T* w, const T* b, const int64_t* y, const T* sw,
                                   double* loss, double* gw, double* gb) {
  switch (padded_lanes(C)) {
    case 16: return softmax_subset_padded<T, 16>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
    case 32: return softmax_subset_padded<T, 32>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
    default: return softmax_subset_lanes_any<T>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
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

template <typename T>
MMK_AVX512 void softmax_subset_avx512(const T* z, int64_t ld, int64_t n, int64_t H, int64_t C,
                                      const T* w, const T* b, const int64_t* y, const T* sw,
                                      double* loss, double* gw, double* gb) {
  softmax_subset_any<T>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
}
#endif

bool cpu_has_avx512() {
#if MMK_HAVE_AVX2_CLONE
  static const bool ok = __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

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
  if (cpu_has_avx512()) {
    softmax_subset_avx512<T>(z, ld, n, H, C, w, b, y, sw, loss, gw, gb);
    return;
  }
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
  check_defined(op, "w", w);
  check_defined(op, "y", y);
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
  // z in the compute dtype with unit-stride rows: a view of contiguous float32/float64 z. When
  // z must be converted (bfloat16) and only some subsets are picked, those are selected before
  // the conversion, so a solver that skips converged subsets does not convert all S each call.
  const bool convert = z.scalar_type() != acc || z.stride(2) != 1;
  const bool select_first = convert && index.defined() && K < S;
  // Tasks are (subset, row block) pairs, at least ~4 per thread for balance; each has its own
  // partial sums, added in task order, so a given thread count (and K) gives fixed results.
  // One thread below ~1M elements of Z per call (~0.3 ms of work): handing tasks to the
  // inter-op pool costs microseconds per helper on a quiet machine, and a helper that claims a
  // task and then waits for a CPU (a busy, shared machine) holds up the caller for that task.
  const int64_t threads =
      K * n * H < (int64_t(1) << 20) ? 1 : std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = (4 * threads + K - 1) / std::max<int64_t>(K, 1);
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
        + (double)n * (a + 8);              // sample weights, labels
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
  if (sample_weight.has_value()) {
    check_shape(op, "sample_weight", *sample_weight, {n}, "[n], n from z");
    check_float_dtype(op, "sample_weight", *sample_weight, false);
    sw = sample_weight->to(acc).contiguous();
  }
  at::Tensor zc = select_first ? z.index_select(0, index).to(acc) : z.to(acc);
  if (zc.stride(2) != 1) zc = zc.contiguous();
  // Weights in the kernel's layout: [K, H, CP] zero-padded, or [K, C, H] for large C.
  at::Tensor wl;
  if (CP) {
    wl = at::zeros({K, H, CP}, w.options());
    wl.narrow(2, 0, C).copy_(w);
  } else {
    wl = w.transpose(1, 2).contiguous();
  }
  const at::Tensor bc = b.contiguous();
  at::Tensor loss = at::zeros({K}, w.options().dtype(at::kDouble));
  at::Tensor gw_l = at::zeros(wl.sizes(), w.options().dtype(at::kDouble));
  at::Tensor gb = at::zeros({K, C}, w.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(acc, "softmax_regression_loss_grad", [&] {
    const scalar_t* zp = zc.data_ptr<scalar_t>();
    const int64_t ss = zc.stride(0), ld = zc.stride(1);
    const scalar_t* swp = sw.defined() ? sw.data_ptr<scalar_t>() : nullptr;
    // With select_first, zc holds the picked subsets in order.
    const int64_t* pick = index.defined() && !select_first ? index.data_ptr<int64_t>() : nullptr;
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
