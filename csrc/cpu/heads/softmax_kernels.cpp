// The softmax-regression kernels, instantiated once (softmax_kernels.h).
#include "softmax_kernels.h"

#include "softmax_dispatch.h"
#include "softmax_grouped.h"

#include <vector>

namespace mmkernels::cpu {

template void softmax_subset<float>(const float*, int64_t, int64_t, int64_t, int64_t,
                                    const float*, const float*, const int64_t*, const float*,
                                    double*, double*, double*);
template void softmax_subset<double>(const double*, int64_t, int64_t, int64_t, int64_t,
                                     const double*, const double*, const int64_t*,
                                     const double*, double*, double*, double*);

bool softmax_grouped_available(int64_t C) {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  // The float32 ukernel is fast where oneDNN packs bfloat16 (AMX CPUs: the fused ops' blocked
  // path asks the same); C <= 16 is where the op lays the weights out as [C, H].
  return C >= 1 && 2 * C <= kGroupWidth && padded_lanes(C) == 0 && cpu_has_avx512() &&
         at::native::cpublas::could_pack(at::kBFloat16);
#else
  (void)C;
  return false;
#endif
}

void softmax_group(const float* z, int64_t ld, int64_t n, int64_t H, int64_t C, int64_t g,
                   const float* w, const float* b, const int64_t* y, const float* sw,
                   double* loss, double* gw, double* gb, int64_t stride, bool h_major) {
  std::vector<float> w_cat(H * g * C);  // the weights side by side: [H, g C]
  for (int64_t i = 0; i < g; ++i)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t c = 0; c < C; ++c) w_cat[(h * g + i) * C + c] = w[(i * H + h) * C + c];
  softmax_grouped(z, ld, n, H, C, g, w_cat.data(), b, y, sw, loss, gw, gb, stride, h_major);
}

}  // namespace mmkernels::cpu
