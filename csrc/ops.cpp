// Every slimcore operator schema, in one place. Kernels register per backend in cpu/<op>.cpp and
// cuda/<op>.cu; the pure-PyTorch reference and the fake (meta) kernels live in slimcore/reference.py
// and slimcore/ops.py.
//
// The penalty ops take the penalty by name plus its shape parameters (unused ones are ignored):
//   "l1"   g = |x|
//   "l2"   g = x^2
//   "lp"   g = |x|^p, 0 < p < 1; the subgradient uses p*sign(x)*(|x|+eps)^(p-1)
//   "tl1"  g = (a+1)|x|/(a+|x|), a > 0
//   "scad" SCAD with lambda = knee and shape a > 2
//   "mcp"  MCP with lambda = knee and gamma = a > 1
// `scale` holds one multiplier for all tensors or one per tensor.
//
// The BatchNorm ops normalise each channel (dim 1) of a contiguous (NCHW) or channels_last input;
// `scale` and the penalty's parameters say what their backward adds to grad_weight:
// scale * dg(weight) (csrc/batch_norm_args.h states every rule).
//
// The channel gather ops prune a weight: None keeps that dimension whole; indices are int64 1-D on
// the weight's device (csrc/channel_gather_args.h states every rule).
//
// channel_affine is an eval-mode BatchNorm over selected input channels with the activation that
// reads it, in one pass (deploy's fused selection BN; csrc/channel_affine_args.h states every rule).
#include <torch/library.h>

TORCH_LIBRARY(slimcore, m) {
  // grads[i] += scale[i] * dg(weights[i])   (network slimming's updateBN, any penalty)
  m.def(
      "penalty_subgradient_(Tensor[] weights, Tensor(a!)[] grads, str penalty, float[] scale, "
      "float p, float a, float knee, float eps) -> ()");
  // weights[i] = argmin_x 1/2 (x - weights[i])^2 + scale[i] * g(x)   (proximal step, exact zeros)
  m.def(
      "penalty_prox_(Tensor(a!)[] weights, str penalty, float[] scale, "
      "float p, float a, float knee, float eps) -> ()");
  // sum_i scale[i] * sum_j g(weights[i][j]), as a 0-dim float32 tensor (float64 if any input is)
  m.def(
      "penalty_value(Tensor[] weights, str penalty, float[] scale, "
      "float p, float a, float knee, float eps) -> Tensor");
  // (out, save_mean, save_invstd): BatchNorm with batch statistics (training; running stats updated
  // in place) or running ones (eval); its autograd adds scale * dg(weight) to weight's gradient
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool training, float momentum, float eps, str penalty, float scale, float p, float a, float knee, "
      "float penalty_eps) -> (Tensor, Tensor, Tensor)");
  // (grad_input, grad_weight + scale * dg(weight), grad_bias) in one pass over grad_out and input
  m.def(
      "batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor save_mean, Tensor save_invstd, "
      "bool training, str penalty, float scale, float p, float a, float knee, float penalty_eps) "
      "-> (Tensor, Tensor, Tensor)");
  // weight.index_select(0, out_index).index_select(1, in_index) in one pass, as a new contiguous tensor
  m.def("channel_gather(Tensor weight, Tensor? out_index, Tensor? in_index) -> Tensor");
  // the same in place (strictly increasing indices): kept values move to the front, weight is resized
  m.def("channel_gather_(Tensor(a!) weight, Tensor? out_index, Tensor? in_index) -> Tensor(a!)");
  // act(input.index_select(1, index) * scale[c] + shift[c]) per channel c, in input's layout;
  // activation: none | relu | relu6 | hardswish | silu. Inference only (no autograd).
  m.def("channel_affine(Tensor input, Tensor? index, Tensor scale, Tensor shift, str activation) -> Tensor");
}
