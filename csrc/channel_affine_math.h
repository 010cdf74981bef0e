// The activations of slimcore::channel_affine on one value, for the CPU and CUDA kernels alike
// (PyTorch's formulas; NaN propagates as in torch.relu / F.relu6).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <type_traits>

#include "channel_affine_args.h"

namespace slimcore {

template <Activation A, typename acc_t>
C10_HOST_DEVICE inline acc_t activate(acc_t x) {
  if constexpr (A == Activation::Relu) {
    return x < acc_t(0) ? acc_t(0) : x;
  } else if constexpr (A == Activation::Relu6) {
    return x < acc_t(0) ? acc_t(0) : (x > acc_t(6) ? acc_t(6) : x);
  } else if constexpr (A == Activation::Hardswish) {
    acc_t r = x + acc_t(3);
    r = r < acc_t(0) ? acc_t(0) : (r > acc_t(6) ? acc_t(6) : r);
    return x * r / acc_t(6);
  } else if constexpr (A == Activation::Silu) {
    return x / (acc_t(1) + std::exp(-x));
  } else {
    return x;
  }
}

// Calls f(std::integral_constant<Activation, a>{}) for the runtime value a.
template <typename F>
inline void dispatch_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::None: f(std::integral_constant<Activation, Activation::None>{}); break;
    case Activation::Relu: f(std::integral_constant<Activation, Activation::Relu>{}); break;
    case Activation::Relu6: f(std::integral_constant<Activation, Activation::Relu6>{}); break;
    case Activation::Hardswish: f(std::integral_constant<Activation, Activation::Hardswish>{}); break;
    case Activation::Silu: f(std::integral_constant<Activation, Activation::Silu>{}); break;
  }
}

}  // namespace slimcore
