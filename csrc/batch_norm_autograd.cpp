// Autograd of slimcore::batch_norm, for every backend: its backward is slimcore::batch_norm_backward,
// which returns grad_weight with the sparsity penalty scale * dg(weight) already added. The penalty
// is an input of the forward op only so that it reaches the backward; the forward ignores it.
//
// Registered in C++ rather than with torch.library.register_autograd: a Python autograd kernel costs
// ~6 us per call, which on small activations is as much as the BatchNorm itself.
// batch_norm_backward has no autograd kernel (no double backward).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>

#include "batch_norm_args.h"

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
    auto [grad_input, grad_weight, grad_bias] =
        call_backward(grad, input, weight, saved[2], saved[3], ctx->saved_data["training"].toBool(), penalty, args[0],
                      args[1], args[2], args[3], args[4]);
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
