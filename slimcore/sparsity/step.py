"""``sparse_bn_step``: the network-slimming penalty step over every BatchNorm scaling factor.

Subgradient mode (the paper's and the reference repo's ``updateBN``)::

    loss.backward()
    slimcore.sparse_bn_step(model, lam=1e-4)          # gamma.grad += lam * dg(gamma)
    optimizer.step()

Proximal mode (exact zeros)::

    loss.backward()
    optimizer.step()                                  # loss-only step
    slimcore.sparse_bn_step(model, lam=1e-4, mode="proximal", optimizer=optimizer)
    scheduler.step()                                  # after: the prox uses the lr the step used

Each call is one fused multi-tensor kernel launch on CUDA and one parallel pass on CPU.

How it interacts with the rest of the training loop (docs/penalties.md §7):

* AMP: call it after ``scaler.unscale_(optimizer)`` in subgradient mode (else the penalty is
  divided by the loss scale), and skip the proximal step when the scaler skipped ``step()``.
  With gradient clipping, call it after clipping.
* Momentum: in subgradient mode SGD momentum amplifies the penalty by 1/(1-m). The proximal step
  is applied outside the momentum buffer, so at equal ``lam`` it is 1/(1-m) weaker; pass
  ``momentum=m`` to use step size ``t = lr/(1-m)`` and match subgradient mode's strength.
* Weight decay on gamma: with proximal mode either keep the optimizer's (coupled) weight decay on
  gamma, or set it to 0 for BN weights and add ``L2`` yourself; not both.
* Adam: low-gradient gamma move by ~lr per step whatever ``lam`` is; prefer SGD for sparsity
  training.
* DDP: deterministic and local (gradients are already all-reduced), no communication.
* ``sparse_bn_step`` re-collects the BN layers on every call; :class:`SparseBNStep` collects them
  once (cheaper per step; rebuild it if the model's BN parameters are replaced).
"""

import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import ops
from .penalties import LpNorm, get as get_penalty

MODES = ("subgradient", "proximal")


def bn_weights(model):
    """[(name, weight)] of every BatchNorm (1d/2d/3d, SyncBatchNorm, subclasses) with a learnable
    weight, in module order, each parameter once."""
    found, seen = [], set()
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and isinstance(module.weight, torch.Tensor):
            if id(module.weight) not in seen:
                seen.add(id(module.weight))
                found.append((f"{name}.weight" if name else "weight", module.weight))
    return found


def _bn_weight_list(model):
    # bn_weights() without building names: module traversal dominates a per-step call. Frozen
    # gammas (requires_grad=False) are skipped: they get no gradient, as in SlimBatchNorm.
    found, seen = [], set()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            w = module._parameters.get("weight")
            if w is not None and w.requires_grad and id(w) not in seen:
                seen.add(id(w))
                found.append(w)
    return found


def _collect(model_or_params):
    """The tensors to regularise, and a function giving their names (only needed for errors)."""
    if isinstance(model_or_params, nn.Module):
        weights = _bn_weight_list(model_or_params)
        if not weights and bn_weights(model_or_params):
            raise ValueError(
                f"sparse_bn_step: every BatchNorm weight of {type(model_or_params).__name__} is frozen "
                "(requires_grad=False); nothing to regularise"
            )
        if not weights:
            raise ValueError(
                f"sparse_bn_step: {type(model_or_params).__name__} has no BatchNorm layer with a learnable "
                "weight (affine=True); nothing to regularise"
            )
        return weights, lambda: [n for n, w in bn_weights(model_or_params) if w.requires_grad]
    if isinstance(model_or_params, torch.Tensor):
        raise TypeError("sparse_bn_step: pass a model or an iterable of parameters, not a single tensor")
    weights = list(model_or_params)
    for i, p in enumerate(weights):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"sparse_bn_step: params[{i}] is a {type(p).__name__}, not a tensor")
    if not weights:
        raise ValueError("sparse_bn_step: the parameter iterable is empty; nothing to regularise")
    return weights, lambda: [f"params[{i}]" for i in range(len(weights))]


def _check_scalar(value, name, low=0.0, high=math.inf, high_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and value >= low and (value < high if high_open else value <= high)
    if not ok:
        bound = f"in [{low}, {high})" if high_open else f">= {low}"
        raise ValueError(f"sparse_bn_step: {name} must be a finite number {bound}, got {value!r}")


class SparseBNStep:
    """A prepared penalty step: collects the BN weights and parses the penalty once.

    ``step = SparseBNStep(model, lam=1e-4, penalty="l1")`` then ``step()`` after every backward
    (subgradient mode) or ``step(lr=...)`` / ``step(optimizer=...)`` after every optimizer step
    (proximal mode). Arguments are those of :func:`sparse_bn_step`.
    """

    def __init__(self, model_or_params, lam=1e-4, penalty="l1", *, mode="subgradient", momentum=0.0):
        _check_scalar(lam, "lam")
        _check_scalar(momentum, "momentum", 0.0, 1.0, high_open=True)
        if mode not in MODES:
            raise ValueError(f"sparse_bn_step: mode must be one of {MODES}, got {mode!r}")
        self.penalty = get_penalty(penalty)
        if mode == "proximal" and not self.penalty.supports_prox:
            raise ValueError(
                f"sparse_bn_step: {type(self.penalty).__name__} has no proximal operator (it is not separable); "
                "use mode='subgradient'"
            )
        self.lam, self.mode, self.momentum = float(lam), mode, float(momentum)
        self.weights, self._names = _collect(model_or_params)
        self.term = self.penalty.term(self.lam)

    def __call__(self, lr=None, optimizer=None):
        if self.mode == "subgradient":
            if lr is not None or optimizer is not None:
                raise ValueError("sparse_bn_step: lr/optimizer are for mode='proximal'; subgradient mode adds to .grad")
            self._subgradient()
        else:
            self._proximal(self._step_sizes(lr, optimizer))

    def _subgradient(self):
        grads = [w.grad for w in self.weights]
        if any(g is None for g in grads):
            missing = [n for n, g in zip(self._names(), grads) if g is None]
            raise ValueError(
                f"sparse_bn_step: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} has no .grad; "
                "call loss.backward() first (subgradient mode adds lam * dg(gamma) to the gradient)"
            )
        t = self.term
        scale = self._lpnorm_scale() if isinstance(self.penalty, LpNorm) else t.strength
        with torch.no_grad():
            if scale is None:
                torch._foreach_add_(grads, float("nan"))  # NaN stays visible, as for the other penalties
                return
            ops.penalty_subgradient_(self.weights, grads, t.op, [scale], t.p, t.a, t.knee, t.eps)

    def _lpnorm_scale(self):
        # d/dx_i lam*||x||_p = lam*||x||_p^(1-p) * |x_i|^(p-1)*sign(x_i) = (lam*||x||_p^(1-p)/p) * d|x_i|^p.
        # One reduction (and a device sync) per step: the factor depends on all gammas.
        p = self.term.p
        with torch.no_grad():
            s = float(ops.penalty_value(self.weights, "lp", [1.0], p, 0.0, 0.0, 0.0))
        if not math.isfinite(s):
            return None  # a NaN/Inf gamma: the norm, hence every partial derivative, is undefined
        return self.lam * s ** ((1 - p) / p) / p if s > 0 else 0.0

    def _step_sizes(self, lr, optimizer):
        if (lr is None) == (optimizer is None):
            raise ValueError("sparse_bn_step: mode='proximal' needs exactly one of lr= or optimizer= (to read its lr)")
        if lr is not None:
            _check_scalar(lr, "lr")
            return [lr / (1.0 - self.momentum)]
        group_lr = {}
        for group in optimizer.param_groups:
            _check_scalar(group["lr"], "the lr of an optimizer param group")
            for p in group["params"]:
                group_lr[id(p)] = group["lr"]
        lrs = [group_lr.get(id(w)) for w in self.weights]
        if None in lrs:
            name = self._names()[lrs.index(None)]
            raise ValueError(f"sparse_bn_step: {name} is not in any param group of the given optimizer")
        return [lr / (1.0 - self.momentum) for lr in lrs]

    def _proximal(self, step_sizes):
        t = self.term
        mus = [s * t.strength for s in step_sizes]
        with torch.no_grad():
            ops.penalty_prox_(self.weights, t.op, mus, t.p, t.a, t.knee, t.eps)


def sparse_bn_step(model_or_params, lam=1e-4, penalty="l1", *, mode="subgradient", lr=None, optimizer=None,
                   momentum=0.0):
    """Applies the sparsity penalty ``lam * sum g(gamma)`` to every BatchNorm weight gamma.

    Args:
        model_or_params: a model (all BatchNorm1d/2d/3d/SyncBatchNorm weights) or an iterable of
            parameters.
        lam: penalty strength (>= 0). For native SCAD/MCP it is their own lambda.
        penalty: a name ("l1", "l2", "tl1", "scad", "mcp") or a :mod:`slimcore.penalties` object
            (``Lp(0.5)``, ``TL1(a=0.5)``, ``LpNorm(0.5)``, ``SCAD(theta=...)``, ...).
        mode: "subgradient" adds ``lam * dg(gamma)`` to ``gamma.grad`` (call after backward, before
            ``optimizer.step()``), reproducing the reference repo's ``updateBN`` for L1.
            "proximal" replaces gamma by ``argmin_x 1/2 (x-gamma)^2 + t*lam*g(x)`` (call after
            ``optimizer.step()``); it produces exact zeros.
        lr: step size t of the proximal step, or
        optimizer: read t from the lr of the param group holding each gamma.
        momentum: proximal mode uses ``t = lr / (1 - momentum)``; pass your SGD momentum to match
            the strength of subgradient mode (default 0: the textbook proximal step).
    """
    SparseBNStep(model_or_params, lam, penalty, mode=mode, momentum=momentum)(lr=lr, optimizer=optimizer)


def sparsity_loss(model_or_params, lam=1e-4, penalty="l1"):
    """The penalty term ``lam * sum_i g(gamma_i)`` (``lam * ||gamma||_p`` for LpNorm) as a 0-dim
    tensor, differentiable in gamma: for logging, or to add to the loss instead of calling
    :func:`sparse_bn_step` (then autograd applies the same subgradient)."""
    _check_scalar(lam, "lam")
    pen = get_penalty(penalty)
    weights, _ = _collect(model_or_params)
    t = pen.term(float(lam))
    if isinstance(pen, LpNorm):
        s = ops.penalty_value(weights, "lp", [1.0], t.p, 0.0, 0.0, 0.0)
        return t.strength * s ** (1.0 / t.p)
    return ops.penalty_value(weights, t.op, [t.strength], t.p, t.a, t.knee, t.eps)
