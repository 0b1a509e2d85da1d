// The argument checks of mmkernels::lbfgs_direction, from shapes, dtypes and devices alone: the
// one source run by its CPU, CUDA and Meta kernels (sizes are SymInts, as in heads_plan.h).
//
// lbfgs_direction(grad [k, P], s [m][k, P], y [m][k, P], rho [m][k], gamma [k], diag [k, P]?)
// -> d [k, P] = -H grad, the L-BFGS two-loop recursion of k independent problems over m stored
// pairs (newest first), with the initial inverse Hessian gamma * diag (diag None: the identity).
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
                                      const c10::optional<at::Tensor>& diag) {
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
  for (int64_t j = 0; j < m; ++j) {
    const std::string at_j = "[" + std::to_string(j) + "]";
    check_same(op, "s" + at_j, s[j], grad, "grad");
    check_sym_shape(op, "s" + at_j, s[j], {k, P}, "[k, P], the shape of grad");
    check_same(op, "y" + at_j, y[j], grad, "grad");
    check_sym_shape(op, "y" + at_j, y[j], {k, P}, "[k, P], the shape of grad");
    check_same(op, "rho" + at_j, rho[j], grad, "grad");
    check_sym_shape(op, "rho" + at_j, rho[j], {k}, "[k], one per problem");
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
