"""Thin wrappers over ``torch.ops.slimcore.*``: fake (meta) kernels for torch.compile, the autograd
formula of ``penalty_value``, and the fallback to slimcore.reference when the extension is not
loaded. Empty tensor lists are handled here (the dispatcher cannot pick a backend without a tensor).
"""

import torch

from . import reference
from ._ext import LOADED


def penalty_subgradient_(weights, grads, penalty, scale, p=0.0, a=0.0, knee=0.0, eps=0.0):
    """grads[i] += scale[i] * dg(weights[i]) in place, over the whole list in one kernel launch."""
    if not weights and not grads:
        return
    if LOADED:
        torch.ops.slimcore.penalty_subgradient_.default(weights, grads, penalty, scale, p, a, knee, eps)
    else:
        reference.penalty_subgradient_(weights, grads, penalty, scale, p, a, knee, eps)


def penalty_prox_(weights, penalty, scale, p=0.0, a=0.0, knee=0.0, eps=0.0):
    """weights[i] = argmin_x 1/2 (x - weights[i])^2 + scale[i] * g(x) in place, in one kernel launch."""
    if not weights:
        return
    if LOADED:
        torch.ops.slimcore.penalty_prox_.default(weights, penalty, scale, p, a, knee, eps)
    else:
        reference.penalty_prox_(weights, penalty, scale, p, a, knee, eps)


def penalty_value(weights, penalty, scale, p=0.0, a=0.0, knee=0.0, eps=0.0):
    """sum_i scale[i] * sum_j g(weights[i][j]) as a 0-dim tensor; differentiable in weights."""
    if LOADED:
        return torch.ops.slimcore.penalty_value.default(weights, penalty, scale, p, a, knee, eps)
    return reference.penalty_value(weights, penalty, scale, p, a, knee, eps)


if LOADED:

    @torch.library.register_fake("slimcore::penalty_subgradient_")
    def _penalty_subgradient_fake(weights, grads, penalty, scale, p, a, knee, eps):
        return None

    @torch.library.register_fake("slimcore::penalty_prox_")
    def _penalty_prox_fake(weights, penalty, scale, p, a, knee, eps):
        return None

    @torch.library.register_fake("slimcore::penalty_value")
    def _penalty_value_fake(weights, penalty, scale, p, a, knee, eps):
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
