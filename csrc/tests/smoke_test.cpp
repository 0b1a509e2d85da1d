// C++ smoke test: the ops are reachable through the dispatcher from libtorch alone, and
// concat_project equals relu(linear(cat(masked xs))) on a small batch.
#include <torch/torch.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  const auto xs = std::vector<at::Tensor>{torch::randn({5, 3}), torch::randn({5, 4})};
  const auto weight = torch::randn({6, 7});
  const auto bias = torch::randn({6});
  const auto mask = torch::rand({5, 2}) < 0.6;
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("mmkernels::concat_project", "")
                .typed<at::Tensor(at::TensorList, const at::Tensor&, const c10::optional<at::Tensor>&,
                                  const c10::optional<at::Tensor>&,
                                  const c10::optional<at::Tensor>&, c10::string_view)>();
  const auto out = op.call(xs, weight, bias, c10::nullopt, mask, "relu");
  const auto masked = torch::cat({xs[0] * mask.slice(1, 0, 1), xs[1] * mask.slice(1, 1, 2)}, 1);
  const auto expected = torch::relu(torch::nn::functional::linear(masked, weight, bias));
  if (!torch::allclose(out, expected, 1e-5, 1e-6)) {
    std::cerr << "concat_project differs from the libtorch composition\n";
    return 1;
  }
  std::cout << "mmkernels C++ smoke test passed\n";
  return 0;
}
