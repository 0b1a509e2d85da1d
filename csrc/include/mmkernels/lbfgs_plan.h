// The argument checks of mmkernels::lbfgs_direction, from shapes, dtypes and devices alone: the
// one source run by its CPU, CUDA and Meta kernels (sizes are SymInts, as in heads_plan.h).
//
// lbfgs_direction(grad [k, P], s [m][n_j, P], y [m][n_j, P], rho [m][n_j], gamma [k],
// diag [k, P]?, rows [m, k]?) -> d [k, P] = -H grad, the L-BFGS two-loop recursion of k
// independent problems over m stored pairs (newest first), with the initial inverse Hessian
// gamma * diag (diag None: the identity). Problem i's pair j is row rows[j, i] of s[j], y[j] and
// rho[j]; without rows it is row i (n_j = k). rows lets a solver drop finished problems without
// compacting its history. Whether the rows are in range is the CPU kernel's check (it reads
// them); on CUDA a problem with a row out of range gets a NaN direction.
#pragma once

#include <mmkernels/checks.h>

#include <ATen/ATen.h>

#include <string>

namespace mmkernels {

struct LbfgsPlan {
  c10::SymInt k, P;
  int64_t m;  // stored pairs
};

inline LbfgsPlan lbfgs_direction_plan(const at::Tensor& grad, at::TensorList s,
                                      at::TensorList y, at::TensorList rho,
                                      const at::Tensor& gamma,
                                      const c10::optional<at::Tensor>& diag,
                                      const c10::optional<at::Tensor>& rows) {
  const char* op = "mmkernels::lbfgs_direction";
  check_defined(op, "grad", grad);
  MMK_CHECK(grad.dim() == 2, op, ": grad must be 2-d [k, P] (k problems of P parameters), got "
            "shape ", shape_str(grad.sym_sizes()));
  MMK_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble, op,
            ": grad must be float32 or float64, got ", grad.scalar_type());
  const c10::SymInt k = grad.sym_size(0), P = grad.sym_size(1);
  const int64_t m = (int64_t)s.size();
  MMK_CHECK(y.size() == s.size() && rho.size() == s.size(), op,
            ": s, y and rho must hold one tensor per stored pair each, got ", s.size(), ", ",
            y.size(), " and ", rho.size());
  if (rows.has_value()) {
    check_defined(op, "rows", *rows);
    MMK_CHECK(rows->scalar_type() == at::kLong, op, ": rows must be int64, got ",
              rows->scalar_type());
    check_sym_shape(op, "rows", *rows, {c10::SymInt(m), k}, "[m, k]: a row per pair and problem");
    MMK_CHECK(rows->device() == grad.device(), op, ": rows is on ", rows->device(),
              ", expected ", grad.device(), " (the device of grad)");
  }
  for (int64_t j = 0; j < m; ++j) {
    const std::string at_j = "[" + std::to_string(j) + "]";
    check_same(op, "s" + at_j, s[j], grad, "grad");
    if (rows.has_value()) {
      MMK_CHECK(s[j].dim() == 2 && s[j].sym_size(1) == P, op, ": s", at_j,
                " must be [n, P] with P = ", P, " (dim 1 of grad), got shape ",
                shape_str(s[j].sym_sizes()));
    } else {
      check_sym_shape(op, "s" + at_j, s[j], {k, P}, "[k, P], the shape of grad");
    }
    const c10::SymInt n = s[j].sym_size(0);
    check_same(op, "y" + at_j, y[j], grad, "grad");
    check_sym_shape(op, "y" + at_j, y[j], {n, P}, "the shape of s" + at_j);
    check_same(op, "rho" + at_j, rho[j], grad, "grad");
    check_sym_shape(op, "rho" + at_j, rho[j], {n}, "one per row of s" + at_j);
  }
  check_same(op, "gamma", gamma, grad, "grad");
  check_sym_shape(op, "gamma", gamma, {k}, "[k], one per problem");
  if (diag.has_value()) {
    check_same(op, "diag", *diag, grad, "grad");
    check_sym_shape(op, "diag", *diag, {k, P}, "[k, P], the shape of grad");
  }
  return {k, P, m};
}

}  // namespace mmkernels
