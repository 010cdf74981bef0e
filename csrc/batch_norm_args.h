// Argument checking and layout analysis shared by the CPU and CUDA kernels of slimcore::batch_norm
// and slimcore::batch_norm_backward, so both backends accept the same inputs and reject bad ones
// with the same messages.
//
// BatchNorm normalises every channel (dim 1) over all other dims. The kernels read the input in
// one of two memory layouts, never copying it:
//   Planes  contiguous (N, C, S...) with S = prod(sizes[2:]) > 1: each (n, c) is a contiguous run
//           of S elements (NCHW, NCL, NCDHW);
//   Rows    N*S rows of C contiguous channels: channels_last / channels_last_3d, or any input with
//           S == 1 (BatchNorm1d on (N, C)).
// Inputs in neither layout (sliced, transposed, expanded) are refused with a message naming the fix.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/string_view.h>

#include <initializer_list>
#include <optional>

#include "penalties.h"

namespace slimcore {

enum class BNLayout { Planes, Rows };

struct BNShape {
  int64_t N;  // sizes[0]
  int64_t C;  // sizes[1]
  int64_t S;  // product of sizes[2:] (1 for 2-D input)
  BNLayout layout;
  int64_t count() const { return N * S; }  // values per channel
};

// What the backward's penalty term is: grad_weight += scale * dg(weight); `active` is false when
// scale == 0 or there is no weight, so lam = 0 is exactly plain BatchNorm (even for NaN weights).
struct BNPenalty {
  PenaltyParams params;
  double scale;
  bool active;
};

// The input's shape and layout (errors for inputs in neither layout).
BNShape batch_norm_shape(const at::Tensor& input);

// Checks the forward's arguments and returns the input's shape and layout. In training mode a
// channel must see more than one value (PyTorch's rule); eval mode needs both running statistics.
BNShape check_batch_norm_forward(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var, bool training, double momentum,
                                 double eps);

// Checks the backward's arguments: grad_out must have the input's shape, dtype and memory layout
// (the autograd kernel converts it when it does not); save_mean/save_invstd are the forward's.
BNShape check_batch_norm_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                                  const at::Tensor& save_invstd);

// Parses the penalty (csrc/penalty_args.h) and checks its scale (finite, >= 0).
BNPenalty parse_batch_norm_penalty(c10::string_view penalty, double scale, double p, double a, double knee,
                                   double penalty_eps, bool has_weight);

// The memory format whose contiguous tensors have `shape`'s layout (for a dim-D input).
at::MemoryFormat batch_norm_memory_format(const BNShape& shape, int64_t dim);

// Whether `t` (same sizes as the input) is laid out as `shape.layout` says.
bool has_batch_norm_layout(const at::Tensor& t, const BNShape& shape);

// The dtype of statistics and accumulators: float64 for float64 input, float32 otherwise.
at::ScalarType batch_norm_acc_type(at::ScalarType input_type);

// The dtype shared by the defined ones of weight/bias/running stats (the acc type if none is).
at::ScalarType batch_norm_param_type(const at::Tensor& input, std::initializer_list<const std::optional<at::Tensor>*> params);

// Runs f (a generic lambda taking a param_t value) with param_t = scalar_t, or float when the
// parameters are float32 for half input.
template <typename scalar_t, typename F>
void with_param_type(at::ScalarType param_type, F&& f) {
  using acc_t = at::opmath_type<scalar_t>;
  if (param_type == c10::CppTypeToScalarType<scalar_t>::value) {
    f(scalar_t{});
  } else {
    f(acc_t{});
  }
}

}  // namespace slimcore
