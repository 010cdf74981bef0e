// CPU kernels of slimcore::batch_norm and slimcore::batch_norm_backward (the penalty's subgradient
// is added to grad_weight inside the backward): argument checks, allocation, and the choice of the
// kernels' instruction set. The kernels themselves are in batch_norm_kernel.h, compiled here for the
// baseline ISA and in batch_norm_avx2.cpp / batch_norm_avx512.cpp for AVX2 / AVX-512.
#define SLIMCORE_BN_ISA isa_default
#include "batch_norm_kernel.h"
#undef SLIMCORE_BN_ISA

#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "batch_norm_isa.h"

namespace slimcore {
namespace {

// The kernels of the best ISA this CPU and ATen's CPU capability allow (ATEN_CPU_CAPABILITY=default
// or avx2 lowers it, as for ATen's own kernels). The AVX copies exist on x86-64 GCC builds only.
const BNKernels& kernels() {
  static const BNKernels chosen = [] {
    BNKernels k{&isa_default::forward, &isa_default::backward};
#if SLIMCORE_BN_HAVE_AVX
    const std::string cap = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512"
    if (cap == "AVX512" && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")) {
      k = BNKernels{&isa_avx512::forward, &isa_avx512::backward};
    } else if ((cap == "AVX2" || cap == "AVX512") && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
      k = BNKernels{&isa_avx2::forward, &isa_avx2::backward};
    }
#endif
    return k;
  }();
  return chosen;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    double momentum, double eps, c10::string_view penalty, double scale, double p, double a, double knee,
    double penalty_eps) {
  const BNShape s = check_batch_norm_forward(input, weight, bias, running_mean, running_var, training, momentum, eps);
  parse_batch_norm_penalty(penalty, scale, p, a, knee, penalty_eps, weight.has_value() && weight->defined());
  const at::ScalarType acc = batch_norm_acc_type(input.scalar_type());
  const at::ScalarType param_type = batch_norm_param_type(input, {&weight, &bias, &running_mean, &running_var});
  at::Tensor out = at::empty_like(input);
  at::Tensor save_mean = at::empty({s.C}, input.options().dtype(acc));
  at::Tensor save_invstd = at::empty({s.C}, input.options().dtype(acc));
  kernels().forward(s, input, out, weight, bias, running_mean, running_var, training, momentum, eps, save_mean,
                    save_invstd, param_type);
  return {out, save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, c10::string_view penalty, double scale,
    double p, double a, double knee, double penalty_eps) {
  const BNShape s = check_batch_norm_backward(grad_out, input, weight, save_mean, save_invstd);
  const bool has_weight = weight.has_value() && weight->defined();
  const BNPenalty pen = parse_batch_norm_penalty(penalty, scale, p, a, knee, penalty_eps, has_weight);
  const at::ScalarType param_type = batch_norm_param_type(input, {&weight});
  at::Tensor grad_input = at::empty_like(input);
  at::Tensor grad_weight = at::empty({s.C}, input.options().dtype(param_type));
  at::Tensor grad_bias = at::empty({s.C}, input.options().dtype(param_type));
  kernels().backward(s, grad_out, input, weight, save_mean, save_invstd, training, pen, grad_input, grad_weight,
                     grad_bias, param_type);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimcore, CPU, m) {
  m.impl("batch_norm", &batch_norm_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

}  // namespace slimcore
