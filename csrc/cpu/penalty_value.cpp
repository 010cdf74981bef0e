// CPU kernel of slimcore::penalty_value: sum_i scale[i] * sum_j g(weights[i][j]).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <mutex>

#include "../penalty_args.h"
#include "multi_tensor_loop.h"
#include "penalty_cost.h"

namespace slimcore {
namespace {

at::Tensor penalty_value_cpu(at::TensorList weights, c10::string_view penalty, c10::ArrayRef<double> scale,
                             double p, double a, double knee, double eps) {
  const PenaltyParams pp = parse_penalty(penalty, p, a, knee, eps);
  check_tensor_list(weights, "weights");
  const std::vector<double> scales = expand_scales(scale, weights.size(), "scale");
  bool any_double = false;
  for (const auto& w : weights) any_double = any_double || w.scalar_type() == at::kDouble;

  // Per-range partial sums in double, combined under a lock: the lists are small (BN layers).
  double total = 0.0;
  std::mutex total_mutex;
  const int64_t grain = cpu::penalty_grain(cpu::PenaltyOp::Value, pp);
  dispatch_penalty_kind(pp.kind, [&](auto kind) {
    constexpr PenaltyKind K = decltype(kind)::value;
    cpu::for_each_range(weights, grain, [&](size_t t, int64_t begin, int64_t end) {
      double partial = 0.0;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[t].scalar_type(), "penalty_value_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* w = weights[t].const_data_ptr<scalar_t>();
        for (int64_t i = begin; i < end; ++i) {
          partial += static_cast<double>(penalty_value<K>(static_cast<acc_t>(w[i]), pp));
        }
      });
      std::lock_guard<std::mutex> lock(total_mutex);
      total += scales[t] * partial;
    });
  });
  return at::scalar_tensor(total, at::TensorOptions().dtype(any_double ? at::kDouble : at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(slimcore, CPU, m) {
  m.impl("penalty_value", &penalty_value_cpu);
}

}  // namespace slimcore
