// CPU kernel of slimcore::penalty_subgradient_: grads[i] += scale[i] * dg(weights[i]).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../penalty_args.h"
#include "multi_tensor_loop.h"
#include "penalty_cost.h"

namespace slimcore {
namespace {

void penalty_subgradient_cpu(at::TensorList weights, at::TensorList grads, c10::string_view penalty,
                             c10::ArrayRef<double> scale, double p, double a, double knee, double eps) {
  const PenaltyParams pp = parse_penalty(penalty, p, a, knee, eps);
  check_tensor_list(weights, "weights");
  check_tensor_list(grads, "grads");
  check_grads_match(weights, grads);
  const std::vector<double> scales = expand_scales(scale, weights.size(), "scale");
  const int64_t grain = cpu::penalty_grain(cpu::PenaltyOp::Subgradient, pp);
  dispatch_penalty_kind(pp.kind, [&](auto kind) {
    constexpr PenaltyKind K = decltype(kind)::value;
    cpu::for_each_range(weights, grain, [&](size_t t, int64_t begin, int64_t end) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[t].scalar_type(), "penalty_subgradient_cpu",
                                      [&] {
                                        using acc_t = at::opmath_type<scalar_t>;
                                        const scalar_t* w = weights[t].const_data_ptr<scalar_t>();
                                        scalar_t* g = grads[t].mutable_data_ptr<scalar_t>();
                                        const acc_t s = static_cast<acc_t>(scales[t]);
                                        for (int64_t i = begin; i < end; ++i) {
                                          const acc_t d = penalty_subgradient<K>(static_cast<acc_t>(w[i]), pp);
                                          g[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) + s * d);
                                        }
                                      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(slimcore, CPU, m) {
  m.impl("penalty_subgradient_", &penalty_subgradient_cpu);
}

}  // namespace slimcore
