"""SlimBatchNorm1d/2d: drop-in BatchNorm1d/2d whose backward adds the sparsity penalty's
subgradient to the gradient of gamma inside slimcore's fused BatchNorm kernels. ``convert_bn`` /
``revert_bn`` swap them in and out of a model (see :class:`SlimBatchNorm2d`).
"""

import math

import torch
import torch.fx
from torch import Tensor, nn

from .. import ops
from .penalties import LpNorm, Penalty
from .penalties import get as get_penalty

__all__ = ["SlimBatchNorm1d", "SlimBatchNorm2d", "convert_bn", "revert_bn", "set_penalty_scale"]


# torch.fx.symbolic_trace of a model holding a SlimBatchNorm (torch.fx only keeps torch.nn modules
# opaque): its Python checks need concrete tensors, so they are skipped while tracing; the op itself
# is recorded. (slimcore.pruning.graph's tracer keeps SlimBatchNorm opaque anyway.)
_is_fx_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing)


def _check_number(value, name, owner="SlimBatchNorm"):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok:
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _slim_penalty(penalty):
    pen = get_penalty(penalty)
    if isinstance(pen, LpNorm):
        raise ValueError(
            "SlimBatchNorm: LpNorm couples every BN weight of the model (lam * ||gamma||_p over all layers), so a "
            "single layer cannot apply it; use slimcore.sparse_bn_step(model, lam, LpNorm(p)) instead, or Lp(p)"
        )
    return pen


class _SlimBatchNorm:
    """The penalty configuration and forward() shared by SlimBatchNorm1d/2d."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None,
                 dtype=None, *, penalty="l1", lam=0.0, penalty_scale=1.0):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_penalty(penalty, lam, penalty_scale)

    def _init_penalty(self, penalty, lam, penalty_scale):
        self._penalty = _slim_penalty(penalty)
        self._lam = _check_number(lam, "lam")
        self._penalty_scale = _check_number(penalty_scale, "penalty_scale")
        self._update_penalty_args()

    def _update_penalty_args(self):
        # The op arguments (penalty, scale, p, a, knee, penalty_eps), computed once per change.
        t = self._penalty.term(self._lam)
        scale = t.strength * self._penalty_scale if self._lam != 0 else 0.0  # lam = 0: exactly plain BN
        self._penalty_args = (t.op, float(scale), t.p, t.a, t.knee, t.eps)

    @property
    def penalty(self) -> Penalty:
        """The penalty g (a slimcore.penalties object; set a name or an object)."""
        return self._penalty

    @penalty.setter
    def penalty(self, value):
        self._penalty = _slim_penalty(value)
        self._update_penalty_args()

    @property
    def lam(self) -> float:
        """Penalty strength: the backward adds lam * penalty_scale * dg(gamma) to gamma's gradient."""
        return self._lam

    @lam.setter
    def lam(self, value):
        self._lam = _check_number(value, "lam")
        self._update_penalty_args()

    @property
    def penalty_scale(self) -> float:
        """Multiplier of the penalty per backward call (1 / micro-batches under gradient accumulation)."""
        return self._penalty_scale

    @penalty_scale.setter
    def penalty_scale(self, value):
        self._penalty_scale = _check_number(value, "penalty_scale")
        self._update_penalty_args()

    def _normalize(self, input: Tensor) -> Tensor:
        # nn.BatchNorm's running-statistics logic (momentum, momentum=None cumulative average,
        # track_running_stats, eval mode), then slimcore's fused op.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        if not _is_fx_tracing():
            if use_batch_stats:
                size = input.size()
                values = size[0]
                for d in size[2:]:
                    values *= d
                if values == 1:
                    raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
            if not (input.is_contiguous() or (input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last))):
                input = input.contiguous()  # sliced/transposed input: the kernels read NCHW or channels_last
        return ops.batch_norm(
            input, self.weight, self.bias,
            self.running_mean if track else None, self.running_var if track else None,
            use_batch_stats, factor, self.eps, *self._penalty_args,
        )[0]

    def forward(self, input: Tensor) -> Tensor:
        if not _is_fx_tracing():
            self._check_input_dim(input)
        return self._normalize(input)

    def extra_repr(self):
        text = f"{super().extra_repr()}, penalty={self._penalty!r}, lam={self._lam:g}"
        return text + (f", penalty_scale={self._penalty_scale:g}" if self._penalty_scale != 1.0 else "")


class SlimBatchNorm1d(_SlimBatchNorm, nn.BatchNorm1d):
    """nn.BatchNorm1d with the sparsity penalty in its backward; see :class:`SlimBatchNorm2d`."""


class SlimBatchNorm2d(_SlimBatchNorm, nn.BatchNorm2d):
    """Drop-in ``nn.BatchNorm2d`` whose backward adds ``lam * penalty_scale * dg(gamma)`` to gamma's
    gradient, inside slimcore's fused BatchNorm backward kernel (no separate penalty pass).

    Same constructor arguments, parameters, buffers, ``state_dict`` keys and training/eval semantics as
    ``nn.BatchNorm2d`` (a checkpoint of either loads into the other), plus keyword-only ``penalty``
    (a name or a :mod:`slimcore.penalties` object, as for ``sparse_bn_step``; not ``LpNorm``, which
    couples all layers), ``lam`` (default 0: plain BatchNorm) and ``penalty_scale`` (default 1). All
    three can be set at any time. Forward and backward run ``torch.ops.slimcore.batch_norm`` and its
    backward (CPU and CUDA; NCHW and channels_last in and out; fp64/fp32/fp16/bf16 with fp32
    statistics; fp32 parameters with half input, as under autocast).

    The penalty is added once per backward call, to the gradient the backward produces:

    * **Gradient accumulation** over k micro-batches: set ``penalty_scale = 1/k`` (e.g.
      ``slimcore.set_penalty_scale(model, 1/k)``) so one optimizer step carries ``lam * dg(gamma)``
      once, or set it to 0 for the first k-1 micro-batches and 1 for the last.
    * **AMP**: the penalty joins the *scaled* gradient, so ``scaler.unscale_`` divides it by the loss
      scale; multiply ``penalty_scale`` by ``scaler.get_scale()`` (or use ``sparse_bn_step`` after
      ``unscale_``). Gradient clipping clips it together with the loss gradient.
    * **Do not combine** with ``sparse_bn_step``/``sparsity_loss`` on the same layers unless
      ``lam = 0`` here: the penalty would be counted twice.
    * ``gamma = 0`` gets subgradient 0, like ``sparse_bn_step``; a frozen gamma
      (``requires_grad=False``) gets no gradient at all.
    """


# convert_bn / revert_bn: exact types only (a user's BatchNorm subclass may do more than normalise).
# The pruner's selection BNs add their pair (slimcore/pruning/modules.py: register_slim_pair).
_TO_SLIM = {nn.BatchNorm1d: SlimBatchNorm1d, nn.BatchNorm2d: SlimBatchNorm2d}
_FROM_SLIM = {v: k for k, v in _TO_SLIM.items()}


def register_slim_pair(plain, slim):
    """Lets convert_bn turn ``plain`` modules into ``slim`` ones and revert_bn turn them back."""
    _TO_SLIM[plain] = slim
    _FROM_SLIM[slim] = plain


def is_slim_batchnorm(module):
    """True for every SlimBatchNorm (also the pruner's selection variants)."""
    return isinstance(module, _SlimBatchNorm)


def convert_bn(model, penalty="l1", lam=1e-4, *, penalty_scale=1.0):
    """Turns every ``nn.BatchNorm1d/2d`` of ``model`` (and the pruner's SelectedBatchNorm1d/2d) into
    a :class:`SlimBatchNorm1d/2d` with this penalty, in place, and returns ``model``.

    The modules keep their identity, parameters (so an optimizer keeps working), buffers, hooks and
    state; only their class changes, as ``SyncBatchNorm.convert_sync_batchnorm`` would keep their
    state. Already converted layers get the new penalty settings. BatchNorm3d, SyncBatchNorm and
    other BatchNorm subclasses are left alone. ``penalty`` is a name or a :mod:`slimcore.penalties`
    object (not LpNorm). :func:`revert_bn` undoes it.
    """
    pen = _slim_penalty(penalty)
    lam = _check_number(lam, "lam", "convert_bn")
    penalty_scale = _check_number(penalty_scale, "penalty_scale", "convert_bn")
    for m in model.modules():
        cls = _TO_SLIM.get(type(m))
        if cls is not None:
            m.__class__ = cls
        if isinstance(m, _SlimBatchNorm):
            m._init_penalty(pen, lam, penalty_scale)
    return model


def revert_bn(model):
    """Turns every SlimBatchNorm1d/2d of ``model`` back into ``nn.BatchNorm1d/2d`` (selection BNs into
    SelectedBatchNorm1d/2d), in place, keeping their state; returns ``model``."""
    for m in model.modules():
        cls = _FROM_SLIM.get(type(m))
        if cls is not None:
            m.__class__ = cls
            for attr in ("_penalty", "_lam", "_penalty_scale", "_penalty_args"):
                m.__dict__.pop(attr, None)
    return model


def set_penalty_scale(model, scale):
    """Sets ``penalty_scale`` of every SlimBatchNorm in ``model`` (e.g. 1/k for k accumulated
    micro-batches); returns how many layers it set."""
    scale = _check_number(scale, "penalty_scale", "set_penalty_scale")
    count = 0
    for m in model.modules():
        if isinstance(m, _SlimBatchNorm):
            m.penalty_scale = scale
            count += 1
    return count
