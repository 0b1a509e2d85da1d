// The package's one accumulation-dtype rule: float64 inputs accumulate in float64, every other
// floating dtype (float32, bfloat16, float16) in float32. It is ATen's opmath type, which the
// templated kernels use at compile time (at::opmath_type<scalar_t>); the static_asserts below
// keep the run-time rule and that type the same. Python asks for the rule through
// mmkernels._C.accumulation_dtype rather than restating it.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>

namespace mmkernels {

constexpr c10::ScalarType accumulation_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

namespace detail {
template <typename T>
constexpr bool matches_opmath() {
  return accumulation_dtype(c10::CppTypeToScalarType<T>::value) ==
         c10::CppTypeToScalarType<at::opmath_type<T>>::value;
}
static_assert(matches_opmath<float>() && matches_opmath<double>() &&
                  matches_opmath<c10::BFloat16>() && matches_opmath<c10::Half>(),
              "accumulation_dtype must agree with at::opmath_type");
}  // namespace detail

}  // namespace mmkernels
