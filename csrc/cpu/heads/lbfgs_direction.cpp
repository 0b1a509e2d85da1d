// mmkernels::lbfgs_direction on the CPU: the L-BFGS two-loop recursion, one problem at a time.
//
// Done as tensor ops, slot by slot over all k problems (what the solver did before), every
// slot's s and y come from memory twice and every dot product writes a temporary: at the
// softmax CV's size (k = 100, P = 5130 float64, m = 10) that is ~30 ms a direction against a
// ~4 ms read of the 82 MB history. Here one problem's 2 m vectors (820 KB there) are read from
// memory by the first loop and are still in L2 for the second, and each axpy is fused with the
// next pair's dot product, so the running vector is passed over once per pair, not twice.
#include "isa.h"

#include <mmkernels/lbfgs_plan.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace mmkernels::cpu {
namespace {

// Vectors of B bytes: 16 (SSE2, the build's baseline), 32 (AVX2) or 64 (AVX-512), each width
// the native one of the copy compiled for it, so nothing is split through the stack.
template <typename T, int B>
struct Vec {
  static constexpr int L = B / static_cast<int>(sizeof(T));
  typedef T V __attribute__((vector_size(B), aligned(sizeof(T))));
};

template <typename T, int B>
MMK_INLINE typename Vec<T, B>::V& at(T* p) {
  return *reinterpret_cast<typename Vec<T, B>::V*>(p);
}
template <typename T, int B>
MMK_INLINE const typename Vec<T, B>::V& at(const T* p) {
  return *reinterpret_cast<const typename Vec<T, B>::V*>(p);
}

template <typename T, int B>
MMK_INLINE T lanes_sum(const typename Vec<T, B>::V& v) {
  T s = 0;
  for (int l = 0; l < Vec<T, B>::L; ++l) s += v[l];
  return s;
}

// sum a[i] w[i], with two accumulators (one would be bound by the adds' latency).
template <typename T, int B>
MMK_INLINE T dot(const T* a, const T* w, int64_t n) {
  constexpr int L = Vec<T, B>::L;
  typename Vec<T, B>::V acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    acc0 += at<T, B>(a + i) * at<T, B>(w + i);
    acc1 += at<T, B>(a + i + L) * at<T, B>(w + i + L);
  }
  T s = lanes_sum<T, B>(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * w[i];
  return s;
}

// v += alpha x, and the dot product of the updated v with w, in one pass.
template <typename T, int B>
MMK_INLINE T axpy_dot(T* v, T alpha, const T* x, const T* w, int64_t n) {
  constexpr int L = Vec<T, B>::L;
  typename Vec<T, B>::V acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    at<T, B>(v + i) += alpha * at<T, B>(x + i);
    at<T, B>(v + i + L) += alpha * at<T, B>(x + i + L);
    acc0 += at<T, B>(v + i) * at<T, B>(w + i);
    acc1 += at<T, B>(v + i + L) * at<T, B>(w + i + L);
  }
  T s = lanes_sum<T, B>(acc0 + acc1);
  for (; i < n; ++i) {
    v[i] += alpha * x[i];
    s += v[i] * w[i];
  }
  return s;
}

// out = -(v + alpha x): the second loop's last update.
template <typename T, int B>
MMK_INLINE void axpy_negate(T* v, T alpha, const T* x, int64_t n) {
  constexpr int L = Vec<T, B>::L;
  int64_t i = 0;
  for (; i + L <= n; i += L) at<T, B>(v + i) = -(at<T, B>(v + i) + alpha * at<T, B>(x + i));
  for (; i < n; ++i) v[i] = -(v[i] + alpha * x[i]);
}

struct Problems {
  int64_t k, P, m;
  const void* grad;
  const void* gamma;
  const void* diag;                    // nullptr: the identity
  std::vector<const void*> s, y, rho;  // newest first, contiguous [n_j, P] / [n_j]
  const int64_t* rows;                 // [m, k]: problem i's row of pair j; nullptr: row i
  void* out;
};

// Problems [i0, i1): the direction of each into its row of out (the running vector, q and then
// r, lives there).
template <typename T, int B>
MMK_INLINE void directions(const Problems& a, int64_t i0, int64_t i1) {
  const int64_t P = a.P, m = a.m;
  std::vector<T> alpha(std::max<int64_t>(m, 1));
  std::vector<int64_t> at_row(std::max<int64_t>(m, 1));
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t j = 0; j < m; ++j) at_row[j] = a.rows ? a.rows[j * a.k + i] : i;
    const auto s = [&](int64_t j) { return static_cast<const T*>(a.s[j]) + at_row[j] * P; };
    const auto y = [&](int64_t j) { return static_cast<const T*>(a.y[j]) + at_row[j] * P; };
    const auto rho = [&](int64_t j) { return static_cast<const T*>(a.rho[j])[at_row[j]]; };
    T* v = static_cast<T*>(a.out) + i * P;
    const T* g = static_cast<const T*>(a.grad) + i * P;
    const T gamma = static_cast<const T*>(a.gamma)[i];
    const T* diag = a.diag ? static_cast<const T*>(a.diag) + i * P : nullptr;
    for (int64_t c = 0; c < P; ++c) v[c] = g[c];
    if (m > 0) alpha[0] = rho(0) * dot<T, B>(s(0), v, P);
    for (int64_t j = 0; j < m; ++j) {
      if (j + 1 < m) {
        alpha[j + 1] = rho(j + 1) * axpy_dot<T, B>(v, -alpha[j], y(j), s(j + 1), P);
      } else {
        const T* yj = y(j);
        for (int64_t c = 0; c < P; ++c) v[c] -= alpha[j] * yj[c];
      }
    }
    for (int64_t c = 0; c < P; ++c) v[c] *= diag ? gamma * diag[c] : gamma;
    if (m == 0) {
      for (int64_t c = 0; c < P; ++c) v[c] = -v[c];
      continue;
    }
    T beta = rho(m - 1) * dot<T, B>(y(m - 1), v, P);
    for (int64_t j = m - 1; j > 0; --j)
      beta = rho(j - 1) * axpy_dot<T, B>(v, alpha[j] - beta, s(j), y(j - 1), P);
    axpy_negate<T, B>(v, alpha[0] - beta, s(0), P);
  }
}

template <typename T>
MMK_AVX512 void directions_avx512(const Problems& a, int64_t i0, int64_t i1) {
  directions<T, 64>(a, i0, i1);
}
template <typename T>
MMK_AVX2 void directions_avx2(const Problems& a, int64_t i0, int64_t i1) {
  directions<T, 32>(a, i0, i1);
}
template <typename T>
void directions_sse2(const Problems& a, int64_t i0, int64_t i1) {
  directions<T, 16>(a, i0, i1);
}

at::Tensor lbfgs_direction_cpu(const at::Tensor& grad_in, at::TensorList s_in,
                               at::TensorList y_in, at::TensorList rho_in,
                               const at::Tensor& gamma_in,
                               const c10::optional<at::Tensor>& diag_in,
                               const c10::optional<at::Tensor>& rows_in) {
  const char* op = "mmkernels::lbfgs_direction";
  const LbfgsPlan plan =
      lbfgs_direction_plan(grad_in, s_in, y_in, rho_in, gamma_in, diag_in, rows_in);
  MMK_CHECK(grad_in.device().is_cpu(), op, ": grad must be a CPU tensor for the CPU kernel, "
            "got ", grad_in.device());
  const int64_t k = grad_in.size(0), P = grad_in.size(1), m = plan.m;
  const at::Tensor grad = grad_in.contiguous(), gamma = gamma_in.contiguous();
  const at::Tensor diag = diag_in.has_value() ? diag_in->contiguous() : at::Tensor();
  const at::Tensor rows = rows_in.has_value() ? rows_in->contiguous() : at::Tensor();
  for (int64_t j = 0; rows.defined() && j < m && k > 0; ++j) {
    const at::Tensor r = rows[j];
    const int64_t lo = r.min().item<int64_t>(), hi = r.max().item<int64_t>();
    MMK_CHECK(lo >= 0 && hi < s_in[j].size(0), op, ": rows[", j, "] must hold rows of s[", j,
              "] (0 <= r < ", s_in[j].size(0), "), got values in [", lo, ", ", hi, "]");
  }
  std::vector<at::Tensor> held;  // keeps contiguous copies alive while their pointers are used
  held.reserve(3 * m);
  for (int64_t j = 0; j < m; ++j) {
    held.push_back(s_in[j].contiguous());
    held.push_back(y_in[j].contiguous());
    held.push_back(rho_in[j].contiguous());
  }
  at::Tensor out = at::empty({k, P}, grad.options());
  if (k == 0 || P == 0) return out;
  Problems problems{k, P, m, grad.data_ptr(), gamma.data_ptr(),
                    diag.defined() ? diag.data_ptr() : nullptr, {}, {}, {},
                    rows.defined() ? rows.data_ptr<int64_t>() : nullptr, out.data_ptr()};
  for (int64_t j = 0; j < m; ++j) {
    problems.s.push_back(held[3 * j].data_ptr());
    problems.y.push_back(held[3 * j + 1].data_ptr());
    problems.rho.push_back(held[3 * j + 2].data_ptr());
  }
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "lbfgs_direction_cpu", [&] {
    using T = scalar_t;
    const auto run = cpu_has_avx512() ? &directions_avx512<T>
                     : cpu_has_avx2_fma() ? &directions_avx2<T> : &directions_sse2<T>;
    // Problems below PyTorch's elementwise grain run serially, like the solver's other ops.
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / P);
    at::parallel_for(0, k, grain, [&](int64_t i0, int64_t i1) { run(problems, i0, i1); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) { m.impl("lbfgs_direction", &lbfgs_direction_cpu); }

}  // namespace mmkernels::cpu
