// CPU kernel of slimcore::penalty_prox_: weights[i] = prox_{scale[i] g}(weights[i]) in place.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../penalty_args.h"
#include "multi_tensor_loop.h"
#include "penalty_cost.h"

namespace slimcore {
namespace {

void penalty_prox_cpu(at::TensorList weights, c10::string_view penalty, c10::ArrayRef<double> scale, double p,
                      double a, double knee, double eps) {
  const PenaltyParams pp = parse_penalty(penalty, p, a, knee, eps);
  check_tensor_list(weights, "weights");
  const std::vector<double> scales = expand_scales(scale, weights.size(), "scale");
  const int64_t grain = cpu::penalty_grain(cpu::PenaltyOp::Prox, pp);
  dispatch_penalty_kind(pp.kind, [&](auto kind) {
    constexpr PenaltyKind K = decltype(kind)::value;
    cpu::for_each_range(weights, grain, [&](size_t t, int64_t begin, int64_t end) {
      if (scales[t] == 0.0) return;  // prox of a zero step is the identity
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[t].scalar_type(), "penalty_prox_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        scalar_t* w = weights[t].mutable_data_ptr<scalar_t>();
        const acc_t mu = static_cast<acc_t>(scales[t]);
        for (int64_t i = begin; i < end; ++i) {
          w[i] = static_cast<scalar_t>(penalty_prox<K>(static_cast<acc_t>(w[i]), mu, pp));
        }
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(slimcore, CPU, m) {
  m.impl("penalty_prox_", &penalty_prox_cpu);
}

}  // namespace slimcore
