// C++ test of slimcore's penalty ops through torch's dispatcher, as a libtorch user calls them.
// Checks a few hand-derived values (independent of the Python reference) and the error path.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++failures;
  }
}

bool close(const at::Tensor& got, const std::vector<float>& want, double tol = 1e-6) {
  const at::Tensor w = at::tensor(want);
  return got.sizes() == w.sizes() && at::allclose(got, w, tol, tol, /*equal_nan=*/true);
}

}  // namespace

int main() {
  auto& dispatcher = c10::Dispatcher::singleton();
  auto subgradient = dispatcher.findSchemaOrThrow("slimcore::penalty_subgradient_", "")
                         .typed<void(at::TensorList, at::TensorList, c10::string_view, c10::ArrayRef<double>, double,
                                     double, double, double)>();
  auto prox = dispatcher.findSchemaOrThrow("slimcore::penalty_prox_", "")
                  .typed<void(at::TensorList, c10::string_view, c10::ArrayRef<double>, double, double, double, double)>();
  auto value = dispatcher.findSchemaOrThrow("slimcore::penalty_value", "")
                   .typed<at::Tensor(at::TensorList, c10::string_view, c10::ArrayRef<double>, double, double, double,
                                     double)>();

  // L1 subgradient = network slimming's updateBN: grad += lam * sign(gamma), 0 at 0, NaN stays NaN.
  std::vector<at::Tensor> weights = {at::tensor({0.5f, -2.0f, 0.0f}), at::tensor({std::nanf(""), 3.0f})};
  std::vector<at::Tensor> grads = {at::tensor({1.0f, 1.0f, 1.0f}), at::zeros({2})};
  subgradient.call(weights, grads, "l1", {0.25}, 0.0, 0.0, 0.0, 0.0);
  expect(close(grads[0], {1.25f, 0.75f, 1.0f}), "l1 subgradient adds lam*sign(w)");
  expect(std::isnan(grads[1][0].item<float>()) && grads[1][1].item<float>() == 0.25f, "l1 subgradient on NaN");

  // Soft thresholding gives exact zeros; per-tensor step sizes.
  std::vector<at::Tensor> gammas = {at::tensor({0.3f, -0.05f, -1.0f}), at::tensor({0.3f})};
  prox.call(gammas, "l1", {0.1, 0.5}, 0.0, 0.0, 0.0, 0.0);
  expect(close(gammas[0], {0.2f, 0.0f, -0.9f}), "l1 prox soft-thresholds");
  expect(gammas[0][1].item<float>() == 0.0f && gammas[1][0].item<float>() == 0.0f, "l1 prox gives exact zeros");

  // MCP firm thresholding: gamma*(|v| - c*lam)/(gamma - c) inside, identity beyond gamma*lam.
  std::vector<at::Tensor> firm = {at::tensor({0.5, 2.0}, at::kDouble)};
  prox.call(firm, "mcp", {0.5}, 0.0, 3.0, 0.3, 0.0);
  expect(close(firm[0].to(at::kFloat), {static_cast<float>(3.0 * (0.5 - 0.15) / 2.5), 2.0f}), "mcp prox");

  // TL1 value: (a+1)|x|/(a+|x|) with a = 1: x = 1 -> 1, x = -3 -> 1.5; scaled by 2.
  const at::Tensor v = value.call({at::tensor({1.0f, -3.0f})}, "tl1", {2.0}, 0.0, 1.0, 0.0, 0.0);
  expect(v.dim() == 0 && std::abs(v.item<float>() - 5.0f) < 1e-6f, "tl1 value");

  // Bad input is a c10::Error with a message, not a crash.
  bool threw = false;
  try {
    prox.call(gammas, "scad", {0.1}, 0.0, 1.5, 0.1, 0.0);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("SCAD penalty needs a finite a > 2") != std::string::npos;
  }
  expect(threw, "scad with a <= 2 raises a clear error");

  // Every op has a CPU kernel, and a CUDA kernel when the library was built with CUDA.
  for (const char* name : {"slimcore::penalty_subgradient_", "slimcore::penalty_prox_", "slimcore::penalty_value"}) {
    const auto op = dispatcher.findSchemaOrThrow(name, "");
    expect(op.hasKernelForDispatchKey(c10::DispatchKey::CPU), std::string(name) + " has a CPU kernel");
#ifdef SLIMCORE_EXPECT_CUDA_KERNELS
    expect(op.hasKernelForDispatchKey(c10::DispatchKey::CUDA), std::string(name) + " has a CUDA kernel");
#endif
  }

  if (failures == 0) std::printf("test_penalty_ops: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
