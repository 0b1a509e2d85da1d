// Autocast kernels of the two fused ops (AutocastCPU, AutocastCUDA), the way torchvision's
// ops take part in torch.autocast: cast the floating inputs to the autocast dtype, then call the
// op again with this autocast key excluded, so it reaches autograd and the backend kernel.
//
// The casts run under autograd, so each input's gradient comes back in its own dtype. The
// kernels accumulate in float32 as always and return the autocast dtype: these ops are
// GEMMs, which autocast runs in lower precision. float64 tensors are not cast (autocast's rule),
// and bool masks are not floating point. cached_cast reuses the cast of a leaf weight within
// one autocast region, as torch's own ops do.
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace mmkernels::autocast {
namespace {

using at::autocast::cached_cast;

template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor concat_project_autocast(at::TensorList xs, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias,
                                   const c10::optional<at::Tensor>& subset_mask,
                                   const c10::optional<at::Tensor>& sample_mask,
                                   c10::string_view activation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mmkernels::concat_project", "")
                             .typed<decltype(concat_project_autocast<key, device>)>();
  const auto dtype = at::autocast::get_autocast_dtype(device);
  return op.call(cached_cast(dtype, xs, device), cached_cast(dtype, weight, device),
                 cached_cast(dtype, bias, device), subset_mask, sample_mask, activation);
}

template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor project_concat_autocast(at::TensorList xs, at::TensorList weights,
                                   at::TensorList biases,
                                   const c10::optional<at::Tensor>& subset_mask,
                                   const c10::optional<at::Tensor>& sample_mask,
                                   c10::string_view activation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mmkernels::project_concat", "")
                             .typed<decltype(project_concat_autocast<key, device>)>();
  const auto dtype = at::autocast::get_autocast_dtype(device);
  return op.call(cached_cast(dtype, xs, device), cached_cast(dtype, weights, device),
                 cached_cast(dtype, biases, device), subset_mask, sample_mask, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, AutocastCPU, m) {
  constexpr auto key = c10::DispatchKey::AutocastCPU;
  m.impl("concat_project", &concat_project_autocast<key, c10::DeviceType::CPU>);
  m.impl("project_concat", &project_concat_autocast<key, c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(mmkernels, AutocastCUDA, m) {
  constexpr auto key = c10::DispatchKey::AutocastCUDA;
  m.impl("concat_project", &concat_project_autocast<key, c10::DeviceType::CUDA>);
  m.impl("project_concat", &project_concat_autocast<key, c10::DeviceType::CUDA>);
}

}  // namespace mmkernels::autocast
