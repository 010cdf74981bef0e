"""Thin wrappers over ``torch.ops.slimcore.*``: fake (meta) kernels for torch.compile, the autograd
formula of ``penalty_value`` (``channel_gather``'s and ``batch_norm``'s are in C++:
csrc/channel_gather_autograd.cpp, csrc/batch_norm_autograd.cpp), and
the fallback to slimcore.reference when the extension is not loaded. Empty tensor lists are handled
here (the dispatcher cannot pick a backend without a tensor): their arguments are still checked.

Device checks in the fake kernels: a call mixing ``meta`` tensors with real ones dispatches to the
Meta kernel (Meta outranks every backend), which would otherwise return uninitialised memory or
do nothing; they raise as the real kernels do for mixed devices.
"""

import torch

from . import reference
from ._ext import LOADED


def penalty_subgradient_(weights, grads, penalty, scale, p=0.0, a=0.0, knee=0.0, eps=0.0):
    """grads[i] += scale[i] * dg(weights[i]) in place, over the whole list in one kernel launch."""
    if not weights and not grads:
        reference.check_penalty(penalty, p, a, knee, eps)
        reference._scales(scale, 1)
        return
    if LOADED:
        torch.ops.slimcore.penalty_subgradient_.default(weights, grads, penalty, scale, p, a, knee, eps)
    else:
        reference.penalty_subgradient_(weights, grads, penalty, scale, p, a, knee, eps)


def penalty_prox_(weights, penalty, scale, p=0.0, a=0.0, knee=0.0, eps=0.0):
    """weights[i] = argmin_x 1/2 (x - weights[i])^2 + scale[i] * g(x) in place, in one kernel launch."""
    if not weights:
        reference.check_penalty(penalty, p, a, knee, eps)
        reference._scales(scale, 1)
        return
    if LOADED:
        torch.ops.slimcore.penalty_prox_.default(weights, penalty, scale, p, a, knee, eps)
    else:
        reference.penalty_prox_(weights, penalty, scale, p, a, knee, eps)


def penalty_value(weights, penalty, scale, p=0.0, a=0.0, knee=0.0, eps=0.0):
    """sum_i scale[i] * sum_j g(weights[i][j]) as a 0-dim tensor; differentiable in weights.

    An empty list sums nothing: a float32 zero on the CPU (after the arguments are checked)."""
    if not weights:
        reference.check_penalty(penalty, p, a, knee, eps)
        reference._scales(scale, 1)
        return torch.zeros((), dtype=torch.float32)
    if LOADED:
        return torch.ops.slimcore.penalty_value.default(weights, penalty, scale, p, a, knee, eps)
    return reference.penalty_value(weights, penalty, scale, p, a, knee, eps)


def channel_gather(weight, out_index=None, in_index=None):
    """weight.index_select(0, out_index).index_select(1, in_index) in one pass, as a new contiguous tensor.

    None keeps that dimension whole; indices are int64 1-D tensors on weight's device, in any order,
    duplicates allowed. Works for any dtype and for 1-D (bias, BatchNorm: out_index only), Linear and
    conv weights. Differentiable in weight.
    """
    if LOADED:
        return torch.ops.slimcore.channel_gather.default(weight, out_index, in_index)
    return reference.channel_gather(weight, out_index, in_index)


def channel_gather_(weight, out_index=None, in_index=None):
    """The same gather in place: the kept values move to the front of weight's storage, weight is
    resized to the gathered shape and returned (same tensor, same storage, no second copy).

    Indices must be strictly increasing; weight must be contiguous. Not differentiable (it resizes
    its input): call it on ``param.data`` and then assign ``param.data = result``.
    """
    if LOADED:
        return torch.ops.slimcore.channel_gather_.default(weight, out_index, in_index)
    return reference.channel_gather_(weight, out_index, in_index)


def channel_affine(input, index, scale, shift, activation="none"):
    """act(input.index_select(1, index) * scale[c] + shift[c]) per output channel c, in one pass.

    An eval-mode BatchNorm (scale = gamma / sqrt(var + eps), shift = beta - mean * scale) over a
    selection of its input channels, with the activation that reads it ("none", "relu", "relu6",
    "hardswish", "silu"). index: int64 1-D on input's device, any order, duplicates allowed; None
    keeps every channel. input: contiguous or channels_last (the output has its layout), float32,
    float64, float16 or bfloat16; scale/shift of input's dtype or float32. Inference only: not
    differentiable.
    """
    if LOADED:
        return torch.ops.slimcore.channel_affine.default(input, index, scale, shift, activation)
    return reference.channel_affine(input, index, scale, shift, activation)


def batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps,
               penalty="l1", scale=0.0, p=0.0, a=0.0, knee=0.0, penalty_eps=0.0):
    """BatchNorm over every dim but 1 -> (out, save_mean, save_invstd), differentiable in input, weight
    and bias; its backward adds ``scale * dg(weight)`` to weight's gradient (the sparsity penalty).

    ``training``: normalise with the batch statistics (float32, float64 for float64 input) and update
    running_mean/running_var in place (``momentum`` is the weight of the new value; the variance is
    unbiased); otherwise normalise with the running statistics. input must be contiguous (NCHW) or
    channels_last; the output has its layout. weight/bias/running stats have input's dtype, or
    float32 for float16/bfloat16 input.
    """
    if LOADED:
        return torch.ops.slimcore.batch_norm.default(input, weight, bias, running_mean, running_var, training,
                                                     momentum, eps, penalty, scale, p, a, knee, penalty_eps)
    return reference.BatchNormFunction.apply(input, weight, bias, running_mean, running_var, training, momentum, eps,
                                             penalty, scale, p, a, knee, penalty_eps)


def batch_norm_backward(grad_out, input, weight, save_mean, save_invstd, training,
                        penalty="l1", scale=0.0, p=0.0, a=0.0, knee=0.0, penalty_eps=0.0):
    """(grad_input, grad_weight + scale * dg(weight), grad_bias) of :func:`batch_norm` in one pass."""
    if LOADED:
        return torch.ops.slimcore.batch_norm_backward.default(grad_out, input, weight, save_mean, save_invstd,
                                                              training, penalty, scale, p, a, knee, penalty_eps)
    return reference.batch_norm_backward(grad_out, input, weight, save_mean, save_invstd, training, penalty, scale,
                                         p, a, knee, penalty_eps)


def _check_same_device(op, first_name, first, tensors):
    """Fake-kernel twin of the kernels' device checks: ``tensors`` is [(name, tensor or None)]."""
    for name, t in tensors:
        if t is not None and t.device != first.device:
            raise RuntimeError(f"slimcore.{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                               "all tensors of one call must be on one device")


def _check_list_devices(op, *lists):
    """[(list name, tensors)]: every tensor on the device of the first one."""
    named = [(f"{name}[{i}]", t) for name, ts in lists for i, t in enumerate(ts)]
    if named:
        _check_same_device(op, named[0][0], named[0][1], named[1:])


def _bn_acc_dtype(input):
    return torch.float64 if input.dtype == torch.float64 else torch.float32


if LOADED:

    @torch.library.register_fake("slimcore::batch_norm")
    def _batch_norm_fake(input, weight, bias, running_mean, running_var, training, momentum, eps, penalty, scale, p,
                         a, knee, penalty_eps):
        reference.check_batch_norm_penalty(penalty, scale, p, a, knee, penalty_eps)
        _check_same_device("batch_norm", "input", input, [("weight", weight), ("bias", bias),
                                                           ("running_mean", running_mean), ("running_var", running_var)])
        channels = input.shape[1]
        acc = _bn_acc_dtype(input)
        return torch.empty_like(input), input.new_empty((channels,), dtype=acc), input.new_empty((channels,), dtype=acc)

    @torch.library.register_fake("slimcore::batch_norm_backward")
    def _batch_norm_backward_fake(grad_out, input, weight, save_mean, save_invstd, training, penalty, scale, p, a,
                                  knee, penalty_eps):
        reference.check_batch_norm_penalty(penalty, scale, p, a, knee, penalty_eps)
        _check_same_device("batch_norm_backward", "input", input, [("grad_out", grad_out), ("weight", weight),
                                                                    ("save_mean", save_mean),
                                                                    ("save_invstd", save_invstd)])
        channels = input.shape[1]
        dtype = weight.dtype if weight is not None else _bn_acc_dtype(input)
        return torch.empty_like(input), input.new_empty((channels,), dtype=dtype), input.new_empty((channels,), dtype=dtype)

    @torch.library.register_fake("slimcore::penalty_subgradient_")
    def _penalty_subgradient_fake(weights, grads, penalty, scale, p, a, knee, eps):
        _check_list_devices("penalty_subgradient_", ("weights", weights), ("grads", grads))
        return None

    @torch.library.register_fake("slimcore::penalty_prox_")
    def _penalty_prox_fake(weights, penalty, scale, p, a, knee, eps):
        _check_list_devices("penalty_prox_", ("weights", weights))
        return None

    @torch.library.register_fake("slimcore::penalty_value")
    def _penalty_value_fake(weights, penalty, scale, p, a, knee, eps):
        _check_list_devices("penalty_value", ("weights", weights))
        dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
        return weights[0].new_empty((), dtype=dtype)

    def _penalty_value_setup_context(ctx, inputs, output):
        weights, penalty, scale, p, a, knee, eps = inputs
        ctx.save_for_backward(*weights)
        ctx.args = (penalty, scale, p, a, knee, eps)

    def _penalty_value_backward(ctx, grad_out):
        # d/dw sum_i scale_i sum_j g(w_ij) = scale_i * g'(w_ij): the subgradient op on zeros.
        weights = list(ctx.saved_tensors)
        grads = [torch.zeros_like(w) for w in weights]
        torch.ops.slimcore.penalty_subgradient_.default(weights, grads, *ctx.args)
        grads = [g * grad_out.to(g.dtype) for g in grads]
        return grads, None, None, None, None, None, None

    torch.library.register_autograd(
        "slimcore::penalty_value", _penalty_value_backward, setup_context=_penalty_value_setup_context
    )

    @torch.library.register_fake("slimcore::channel_gather")
    def _channel_gather_fake(weight, out_index, in_index):
        reference.check_gather("channel_gather", weight, out_index, in_index, False, check_values=False)
        return weight.new_empty(reference.gathered_shape(weight, out_index, in_index))

    @torch.library.register_fake("slimcore::channel_affine")
    def _channel_affine_fake(input, index, scale, shift, activation):
        shape = reference.check_channel_affine(input, index, scale, shift, activation, check_values=False)
        fmt = reference.affine_memory_format(input)
        return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt)

    @torch.library.register_fake("slimcore::channel_gather_")
    def _channel_gather__fake(weight, out_index, in_index):
        # first the argument errors (a meta index with a CPU weight lands here), then the tracing one
        reference.check_gather("channel_gather_", weight, out_index, in_index, True, check_values=False)
        # channel_gather_ changes its input's shape, which no functionalization pass can express
        # (auto_functionalize handles value mutation only): it is an eager-only op, so
        # torch.compile / export must not trace it. The eager kernels are checked by opcheck's
        # test_schema (mutation and aliasing match the schema); test_faketensor and
        # test_aot_dispatch_* need a traceable op and do not apply.
        raise NotImplementedError(
            "slimcore::channel_gather_ resizes its input in place and is an eager-only op "
            "(it cannot be traced by torch.compile or torch.export); use channel_gather inside compiled code"
        )
