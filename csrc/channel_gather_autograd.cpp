// Autograd of slimcore::channel_gather, for every backend: the gradient of a gather is a
// scatter-add (duplicate indices accumulate, dropped channels get zero).
//
// Registered in C++ rather than with torch.library.register_autograd: a Python autograd kernel
// runs on every call, gradient or not, and costs ~6 us, as much as gathering a 64x64x3x3 weight.
// channel_gather_ has no autograd kernel: it resizes its input and is meant for param.data.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace slimcore {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_channel_gather(const at::Tensor& weight, const std::optional<at::Tensor>& out_index,
                               const std::optional<at::Tensor>& in_index) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("slimcore::channel_gather", "")
          .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  return op.call(weight, out_index, in_index);
}

class ChannelGather : public torch::autograd::Function<ChannelGather> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const std::optional<at::Tensor>& out_index,
                            const std::optional<at::Tensor>& in_index) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->saved_data["sizes"] = weight.sym_sizes();
    ctx->save_for_backward({out_index.value_or(at::Tensor()), in_index.value_or(at::Tensor())});
    return call_channel_gather(weight, out_index, in_index);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& out_index = saved[0];
    const at::Tensor& in_index = saved[1];
    const std::vector<c10::SymInt> sizes = ctx->saved_data["sizes"].toSymIntVector();
    at::Tensor grad = grad_outputs[0];
    if (grad.defined() && in_index.defined()) {
      std::vector<c10::SymInt> shape = grad.sym_sizes().vec();
      shape[1] = sizes[1];
      grad = at::zeros_symint(shape, grad.options()).index_add_(1, in_index, grad);
    }
    if (grad.defined() && out_index.defined()) {
      grad = at::zeros_symint(sizes, grad.options()).index_add_(0, out_index, grad);
    }
    return {grad, at::Tensor(), at::Tensor()};
  }
};

at::Tensor channel_gather_autograd(const at::Tensor& weight, const std::optional<at::Tensor>& out_index,
                                   const std::optional<at::Tensor>& in_index) {
  if (!(c10::GradMode::is_enabled() && weight.requires_grad())) {  // pruning: no graph to record
    at::AutoDispatchBelowADInplaceOrView below;
    return call_channel_gather(weight, out_index, in_index);
  }
  return ChannelGather::apply(weight, out_index, in_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(slimcore, Autograd, m) {
  m.impl("channel_gather", &channel_gather_autograd);
}

}  // namespace slimcore
