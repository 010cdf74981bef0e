// The per-ISA copies of the CPU BatchNorm kernels (batch_norm_kernel.h) and the table batch_norm.cpp
// dispatches through.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "../batch_norm_args.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SLIMCORE_BN_HAVE_AVX 1
#else
#define SLIMCORE_BN_HAVE_AVX 0
#endif

namespace slimcore {

#define SLIMCORE_BN_DECLARE(ns)                                                                                    \
  namespace ns {                                                                                                   \
  void forward(const BNShape& s, const at::Tensor& input, at::Tensor& out, const std::optional<at::Tensor>& weight, \
               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,               \
               const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps,           \
               at::Tensor& save_mean, at::Tensor& save_invstd, at::ScalarType param_type);                         \
  void backward(const BNShape& s, const at::Tensor& grad_out, const at::Tensor& input,                             \
                const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,                              \
                const at::Tensor& save_invstd, bool training, const BNPenalty& pen, at::Tensor& grad_input,        \
                at::Tensor& grad_weight, at::Tensor& grad_bias, at::ScalarType param_type);                        \
  }

SLIMCORE_BN_DECLARE(isa_default)
SLIMCORE_BN_DECLARE(isa_avx2)
SLIMCORE_BN_DECLARE(isa_avx512)
#undef SLIMCORE_BN_DECLARE

struct BNKernels {
  decltype(&isa_default::forward) forward;
  decltype(&isa_default::backward) backward;
};

}  // namespace slimcore
