#include "batch_norm_args.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <string>

#include "penalty_args.h"

namespace slimcore {
namespace {

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

BNShape shape_and_layout(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.dim() >= 2, "slimcore.", op, ": input must have a channel dimension (N, C, ...), got shape ",
              input.sizes());
  TORCH_CHECK(input.is_floating_point(), "slimcore.", op,
              ": input must be floating point (float64/32/16 or bfloat16), got ", input.scalar_type());
  BNShape shape{input.size(0), input.size(1), 1, BNLayout::Planes};
  for (int64_t d = 2; d < input.dim(); ++d) shape.S *= input.size(d);
  if (input.is_contiguous()) {
    shape.layout = shape.S == 1 ? BNLayout::Rows : BNLayout::Planes;
  } else if ((input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
             (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d))) {
    shape.layout = BNLayout::Rows;
  } else {
    TORCH_CHECK(false, "slimcore.", op, ": input must be contiguous (NCHW) or channels_last, got sizes ",
                input.sizes(), " and strides ", input.strides(),
                "; call .contiguous() or .contiguous(memory_format=torch.channels_last) first");
  }
  return shape;
}

void check_param(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& input, int64_t C,
                 at::ScalarType param_type, const char* op) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device() == input.device(), "slimcore.", op, ": ", name, " is on ", t->device(), " but input is on ",
              input.device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "slimcore.", op, ": ", name, " must have shape [", C,
              "] (one value per channel), got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == param_type, "slimcore.", op, ": ", name, " is ", t->scalar_type(),
              " but the other BatchNorm parameters/buffers are ", param_type,
              "; weight, bias and running statistics must share one dtype");
  TORCH_CHECK(t->is_contiguous(), "slimcore.", op, ": ", name, " must be contiguous, got strides ", t->strides());
}

at::ScalarType param_type_of(const at::Tensor& input, std::initializer_list<const std::optional<at::Tensor>*> params,
                             const char* op) {
  for (const auto* p : params) {
    if (p->has_value() && (*p)->defined()) {
      const at::ScalarType t = (*p)->scalar_type();
      const at::ScalarType in = input.scalar_type();
      TORCH_CHECK(t == in || (is_half(in) && t == at::kFloat), "slimcore.", op, ": input is ", in,
                  " but the BatchNorm parameters/buffers are ", t,
                  "; they must have the input's dtype (or float32 for float16/bfloat16 input, as under autocast)");
      return t;
    }
  }
  return batch_norm_acc_type(input.scalar_type());
}

}  // namespace

BNShape batch_norm_shape(const at::Tensor& input) { return shape_and_layout(input, "batch_norm"); }

at::ScalarType batch_norm_acc_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

at::ScalarType batch_norm_param_type(const at::Tensor& input,
                                     std::initializer_list<const std::optional<at::Tensor>*> params) {
  return param_type_of(input, params, "batch_norm");
}

at::MemoryFormat batch_norm_memory_format(const BNShape& shape, int64_t dim) {
  if (shape.layout == BNLayout::Planes || shape.S == 1) return at::MemoryFormat::Contiguous;
  return dim == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

bool has_batch_norm_layout(const at::Tensor& t, const BNShape& shape) {
  if (t.is_contiguous()) return shape.layout == BNLayout::Planes || shape.S == 1;
  if (shape.layout == BNLayout::Planes) return false;
  return (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

BNShape check_batch_norm_forward(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var, bool training, double momentum,
                                 double eps) {
  const char* op = "batch_norm";
  const BNShape shape = shape_and_layout(input, op);
  const at::ScalarType pt = param_type_of(input, {&weight, &bias, &running_mean, &running_var}, op);
  check_param(weight, "weight", input, shape.C, pt, op);
  check_param(bias, "bias", input, shape.C, pt, op);
  check_param(running_mean, "running_mean", input, shape.C, pt, op);
  check_param(running_var, "running_var", input, shape.C, pt, op);
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_mean == has_var, "slimcore.batch_norm: running_mean and running_var must both be given or both be None");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, "slimcore.batch_norm: eps must be finite and >= 0, got ", eps);
  if (training) {
    TORCH_CHECK(shape.count() != 1, "slimcore.batch_norm: expected more than 1 value per channel when training, got input size ",
                input.sizes());
    TORCH_CHECK(std::isfinite(momentum), "slimcore.batch_norm: momentum must be finite, got ", momentum);
  } else {
    TORCH_CHECK(has_mean, "slimcore.batch_norm: eval mode (training=False) needs running_mean and running_var");
  }
  return shape;
}

BNShape check_batch_norm_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                                  const at::Tensor& save_invstd) {
  const char* op = "batch_norm_backward";
  const BNShape shape = shape_and_layout(input, op);
  const at::ScalarType pt = param_type_of(input, {&weight}, op);
  check_param(weight, "weight", input, shape.C, pt, op);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "slimcore.batch_norm_backward: grad_out has shape ", grad_out.sizes(),
              " but input has shape ", input.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "slimcore.batch_norm_backward: grad_out is ",
              grad_out.scalar_type(), " but input is ", input.scalar_type());
  TORCH_CHECK(grad_out.device() == input.device(), "slimcore.batch_norm_backward: grad_out is on ", grad_out.device(),
              " but input is on ", input.device());
  TORCH_CHECK(has_batch_norm_layout(grad_out, shape), "slimcore.batch_norm_backward: grad_out (strides ",
              grad_out.strides(), ") must have the input's memory layout (strides ", input.strides(),
              "); call .contiguous(memory_format=...) with the input's format");
  const at::ScalarType acc = batch_norm_acc_type(input.scalar_type());
  for (const auto* t : {&save_mean, &save_invstd}) {
    const char* name = t == &save_mean ? "save_mean" : "save_invstd";
    TORCH_CHECK(t->dim() == 1 && t->size(0) == shape.C && t->scalar_type() == acc && t->is_contiguous() &&
                    t->device() == input.device(),
                "slimcore.batch_norm_backward: ", name, " must be a contiguous ", acc, " tensor of shape [", shape.C,
                "] on ", input.device(), " (the forward's output), got ", t->scalar_type(), " ", t->sizes(), " on ",
                t->device());
  }
  return shape;
}

BNPenalty parse_batch_norm_penalty(c10::string_view penalty, double scale, double p, double a, double knee,
                                   double penalty_eps, bool has_weight) {
  const PenaltyParams pp = parse_penalty(penalty, p, a, knee, penalty_eps);
  TORCH_CHECK(std::isfinite(scale) && scale >= 0.0, "slimcore.batch_norm: penalty scale must be finite and >= 0, got ",
              scale);
  return BNPenalty{pp, scale, has_weight && scale != 0.0};
}

}  // namespace slimcore
