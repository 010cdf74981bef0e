// Autograd of slimcore::batch_norm, for every backend: its backward is slimcore::batch_norm_backward,
// which returns grad_weight with the sparsity penalty scale * dg(weight) already added. The penalty
// is an input of the forward op only so that it reaches the backward; the forward ignores it.
//
// Registered in C++ rather than with torch.library.register_autograd: a Python autograd kernel costs
// ~6 us per call, which on small activations is as much as the BatchNorm itself.
// batch_norm_backward has no autograd kernel; when the backward itself must be differentiable
// (create_graph=True: gradient penalties, double backward) it is computed from ATen ops instead
// (differentiable_backward below), the penalty's subgradient included.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>

#include "batch_norm_args.h"
#include "penalty_args.h"

namespace slimcore {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

TensorTriple call_forward(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                          const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
                          c10::string_view penalty, double scale, double p, double a, double knee,
                          double penalty_eps) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("slimcore::batch_norm", "")
          .typed<TensorTriple(const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double,
                              double, c10::string_view, double, double, double, double, double)>();
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps, penalty, scale, p, a, knee,
                 penalty_eps);
}

TensorTriple call_backward(const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
                           c10::string_view penalty, double scale, double p, double a, double knee,
                           double penalty_eps) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("slimcore::batch_norm_backward", "")
          .typed<TensorTriple(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                              const at::Tensor&, const at::Tensor&, bool, c10::string_view, double, double, double,
                              double, double)>();
  return op.call(grad_out, input, weight, save_mean, save_invstd, training, penalty, scale, p, a, knee, penalty_eps);
}

bool requires_grad(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined() && t->requires_grad(); }

// An element of dg(x) from differentiable ATen ops (slimcore.reference.subgradient's formulas):
// 0 at x = 0, NaN at NaN.
at::Tensor penalty_subgradient_aten(const at::Tensor& x, const PenaltyParams& pp) {
  const at::Tensor s = at::sign(x), u = at::abs(x);
  at::Tensor d;
  switch (pp.kind) {
    case PenaltyKind::L1:
      d = s;
      break;
    case PenaltyKind::L2:
      d = 2 * x;
      break;
    case PenaltyKind::Lp: {
      const at::Tensor zero = x == 0;
      const at::Tensor safe = at::where(zero, at::ones_like(u), u);  // the unused branch stays finite
      d = at::where(zero, at::zeros_like(x), s * pp.p * at::pow(safe + pp.eps, pp.p - 1));
      break;
    }
    case PenaltyKind::TL1:
      d = s * (pp.a * (pp.a + 1)) / at::pow(u + pp.a, 2);
      break;
    case PenaltyKind::SCAD:
      d = s * at::where(u <= pp.knee, at::full_like(u, pp.knee), at::clamp_min(pp.a * pp.knee - u, 0) / (pp.a - 1));
      break;
    case PenaltyKind::MCP:
      d = s * at::clamp_min(pp.knee - u / pp.a, 0);
      break;
  }
  return at::where(at::isnan(x), x, d);
}

// The BatchNorm backward (plus the penalty) from differentiable ATen ops, for create_graph=True.
// Training recomputes the batch statistics from the input, so second derivatives through the
// mean and variance are right; eval mode uses the running statistics (constants).
TensorTriple differentiable_backward(const at::Tensor& grad, const at::Tensor& input,
                                     const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                                     const at::Tensor& save_invstd, bool training, double eps,
                                     const std::string& penalty, const std::vector<double>& args) {
  const at::ScalarType acc = batch_norm_acc_type(input.scalar_type());
  std::vector<int64_t> dims{0}, view(input.dim(), 1);
  for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  view[1] = input.size(1);
  const at::Tensor x = input.to(acc), g = grad.to(acc);
  at::Tensor mean, invstd;
  if (training) {
    mean = x.mean(dims, /*keepdim=*/true);
    invstd = at::rsqrt((x - mean).pow(2).mean(dims, /*keepdim=*/true) + eps);
  } else {
    mean = save_mean.view(view);
    invstd = save_invstd.view(view);
  }
  const at::Tensor xhat = (x - mean) * invstd;
  const at::Tensor scale = weight ? invstd * weight->to(acc).view(view) : invstd;
  at::Tensor grad_input = training
                              ? (g - g.mean(dims, true) - xhat * (g * xhat).mean(dims, true)) * scale
                              : g * scale;
  at::Tensor grad_weight = (g * xhat).sum(dims), grad_bias = g.sum(dims);
  const BNPenalty pen = parse_batch_norm_penalty(penalty, args[0], args[1], args[2], args[3], args[4],
                                                 weight.has_value());
  if (pen.active) grad_weight = grad_weight + args[0] * penalty_subgradient_aten(weight->to(acc), pen.params);
  const at::ScalarType param_type = weight ? weight->scalar_type() : acc;
  return {grad_input.to(input.scalar_type()), grad_weight.to(param_type), grad_bias.to(param_type)};
}

class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, bool training, double momentum,
                               double eps, c10::string_view penalty, double scale, double p, double a, double knee,
                               double penalty_eps) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, save_mean, save_invstd] = call_forward(input, weight, bias, running_mean, running_var, training,
                                                      momentum, eps, penalty, scale, p, a, knee, penalty_eps);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), save_mean, save_invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    // needs_input_grad() counts only the tensors actually passed, so record which need a gradient.
    ctx->saved_data["needs"] = std::vector<bool>{input.requires_grad(), requires_grad(weight),
                                                 requires_grad(bias)};
    ctx->saved_data["penalty"] = std::string(penalty);
    ctx->saved_data["args"] = std::vector<double>{scale, p, a, knee, penalty_eps};
    ctx->mark_non_differentiable({save_mean, save_invstd});
    return {out, save_mean, save_invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(14);
    at::Tensor grad = grad_outputs[0];
    if (!grad.defined()) return grads;  // the output does not reach the loss
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const std::optional<at::Tensor> weight =
        saved[1].defined() ? std::optional<at::Tensor>(saved[1]) : std::optional<at::Tensor>();
    // The kernels read grad_out in the input's layout; a gradient arriving in another one (e.g. the
    // expanded ones of out.sum().backward()) is copied once, as ATen's batch norm does.
    const BNShape shape = batch_norm_shape(input);
    if (!has_batch_norm_layout(grad, shape)) grad = grad.contiguous(batch_norm_memory_format(shape, input.dim()));
    const std::vector<double> args = ctx->saved_data["args"].toDoubleVector();
    const std::string penalty = ctx->saved_data["penalty"].toStringRef();
    const bool training = ctx->saved_data["training"].toBool();
    // Grad mode is on inside a backward only under create_graph=True: the gradients must then be
    // differentiable, which the fused kernel's are not.
    auto [grad_input, grad_weight, grad_bias] =
        c10::GradMode::is_enabled()
            ? differentiable_backward(grad, input, weight, saved[2], saved[3], training,
                                      ctx->saved_data["eps"].toDouble(), penalty, args)
            : call_backward(grad, input, weight, saved[2], saved[3], training, penalty, args[0], args[1], args[2],
                            args[3], args[4]);
    const c10::List<bool> needs = ctx->saved_data["needs"].toBoolList();
    if (needs[0]) grads[0] = grad_input;
    if (needs[1]) grads[1] = grad_weight;
    if (needs[2]) grads[2] = grad_bias;
    return grads;
  }
};

TensorTriple batch_norm_autograd(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var, bool training, double momentum,
                                 double eps, c10::string_view penalty, double scale, double p, double a, double knee,
                                 double penalty_eps) {
  if (!(c10::GradMode::is_enabled() && (input.requires_grad() || requires_grad(weight) || requires_grad(bias)))) {
    at::AutoDispatchBelowADInplaceOrView below;  // inference: no graph to record
    return call_forward(input, weight, bias, running_mean, running_var, training, momentum, eps, penalty, scale, p, a,
                        knee, penalty_eps);
  }
  const variable_list out = BatchNormFunction::apply(input, weight, bias, running_mean, running_var, training, momentum,
                                                     eps, penalty, scale, p, a, knee, penalty_eps);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimcore, Autograd, m) {
  m.impl("batch_norm", &batch_norm_autograd);
}

}  // namespace slimcore
