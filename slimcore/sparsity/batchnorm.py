"""Modules that slimcore puts into models.

``SlimBatchNorm1d/2d``: drop-in BatchNorm1d/2d whose backward adds the sparsity penalty's
subgradient to the gradient of gamma inside slimcore's fused BatchNorm kernels (``convert_bn`` /
``revert_bn`` swap them in and out of a model; see :class:`SlimBatchNorm2d`).

``CompensatedConv1d/2d/3d``: a conv that also adds the response of its zero-padded input to a
constant plane: what removed input channels that carried a constant (a pruned BN channel with
gamma ~0 emits beta) contributed. Inside the image that is a per-channel bias; at the borders the
zero padding makes it position dependent, so the pruner stores the folded kernel
``compensation`` (out_channels, 1, *kernel) and the forward adds conv(ones, compensation):
exact at any input size, for 1/in_channels of the conv's cost.

``ResidualConstant``: what a residual block becomes when its whole branch is pruned: x + c.

``ChannelAffine``: an eval-mode BatchNorm over a selection of its input channels, with the
activation that reads it, as one pass (``slimcore.deploy`` puts it where a BN cannot fold into a
conv: pre-activation ResNet's ``bn1``, DenseNet's BNs on a concatenation).

``SelectedBatchNorm1d/2d/3d``: a BatchNorm that first keeps a subset of its input channels
(``x.index_select(1, selected_index)``), then normalises them. The pruner turns a selection BN
(one reading a tensor that other layers also read, e.g. pre-activation ResNet's ``bn1`` on the
residual stream or DenseNet's BN on a concatenation) into one when it drops some of the BN's
output channels but must keep its input: the network-slimming reference repo's
``channel_selection`` layer, folded into the BN so the dropped channels are never normalised.
They are BatchNorm subclasses (``isinstance(m, nn.BatchNorm2d)`` holds, ``sparse_bn_step`` finds
them) with the same state_dict keys plus ``selected_index``, and script, trace and export.
"""

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, reference
from .penalties import LpNorm, Penalty
from .penalties import get as get_penalty

__all__ = ["SelectedBatchNorm1d", "SelectedBatchNorm2d", "SelectedBatchNorm3d", "CompensatedConv1d",
           "CompensatedConv2d", "CompensatedConv3d", "ResidualConstant", "SlimBatchNorm1d",
           "SlimBatchNorm2d", "SelectedSlimBatchNorm1d", "SelectedSlimBatchNorm2d", "convert_bn", "revert_bn",
           "set_penalty_scale", "set_input_selection", "set_compensation", "ChannelAffine"]


class _SelectInput:
    """forward() of a BatchNorm over input.index_select(1, selected_index).

    Written out rather than calling super().forward so that TorchScript can compile it; the
    running-statistics logic is nn.BatchNorm's (momentum, momentum=None cumulative average,
    track_running_stats, eval mode).
    """

    def forward(self, input: Tensor) -> Tensor:
        # No _check_input_dim: it branches on x.dim(), which torch.fx cannot trace through (this
        # class is not an nn leaf); F.batch_norm still rejects inputs without a channel dimension.
        x = input.index_select(1, self.selected_index)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )

    def extra_repr(self):
        return f"{super().extra_repr()}, selects {len(self.selected_index)} input channels"


class SelectedBatchNorm1d(_SelectInput, nn.BatchNorm1d):
    selected_index: Tensor


class SelectedBatchNorm2d(_SelectInput, nn.BatchNorm2d):
    selected_index: Tensor


class SelectedBatchNorm3d(_SelectInput, nn.BatchNorm3d):
    selected_index: Tensor


# --------------------------------------------------------------------------------------------
# SlimBatchNorm: BatchNorm with the sparsity penalty fused into its backward.


# torch.fx.symbolic_trace of a model holding a SlimBatchNorm (torch.fx only keeps torch.nn modules
# opaque): its Python checks need concrete tensors, so they are skipped while tracing; the op itself
# is recorded. (slimcore.graph's tracer keeps SlimBatchNorm opaque anyway.)
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


class _SelectSlim:
    """SlimBatchNorm over input.index_select(1, selected_index) (the pruner's selection BN)."""

    def forward(self, input: Tensor) -> Tensor:
        return self._normalize(input.index_select(1, self.selected_index))

    def extra_repr(self):
        return f"{super().extra_repr()}, selects {len(self.selected_index)} input channels"


class SelectedSlimBatchNorm1d(_SelectSlim, SlimBatchNorm1d):
    selected_index: Tensor


class SelectedSlimBatchNorm2d(_SelectSlim, SlimBatchNorm2d):
    selected_index: Tensor


SELECTED_BATCHNORM = {
    nn.BatchNorm1d: SelectedBatchNorm1d,
    nn.BatchNorm2d: SelectedBatchNorm2d,
    nn.BatchNorm3d: SelectedBatchNorm3d,
    SlimBatchNorm1d: SelectedSlimBatchNorm1d,
    SlimBatchNorm2d: SelectedSlimBatchNorm2d,
}
PLAIN_BATCHNORM = {v: k for k, v in SELECTED_BATCHNORM.items()}

# convert_bn / revert_bn: exact types only (a user's BatchNorm subclass may do more than normalise).
_TO_SLIM = {
    nn.BatchNorm1d: SlimBatchNorm1d,
    nn.BatchNorm2d: SlimBatchNorm2d,
    SelectedBatchNorm1d: SelectedSlimBatchNorm1d,
    SelectedBatchNorm2d: SelectedSlimBatchNorm2d,
}
_FROM_SLIM = {v: k for k, v in _TO_SLIM.items()}


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


def set_input_selection(bn, selected_index):
    """Makes ``bn`` select ``selected_index`` of its input channels (None: read all of them), in
    place: the module object, its parameters and hooks stay the same."""
    base = PLAIN_BATCHNORM.get(type(bn), type(bn))
    if selected_index is None:
        if type(bn) in PLAIN_BATCHNORM:
            del bn._buffers["selected_index"]
            bn.__class__ = base
        return bn
    if base not in SELECTED_BATCHNORM:
        raise TypeError(f"{type(bn).__name__} cannot select input channels (only BatchNorm1d/2d/3d can)")
    bn.__class__ = SELECTED_BATCHNORM[base]
    bn.register_buffer("selected_index", selected_index.to(device=bn.weight.device, dtype=torch.long))
    return bn


class CompensatedConv1d(nn.Conv1d):
    compensation: Tensor

    def forward(self, input: Tensor) -> Tensor:
        ones = torch.ones((1, 1) + input.shape[2:], dtype=input.dtype, device=input.device)
        extra = F.conv1d(ones, self.compensation, None, self.stride, self.padding, self.dilation)
        return self._conv_forward(input, self.weight, self.bias) + extra


class CompensatedConv2d(nn.Conv2d):
    compensation: Tensor

    def forward(self, input: Tensor) -> Tensor:
        ones = torch.ones((1, 1) + input.shape[2:], dtype=input.dtype, device=input.device)
        extra = F.conv2d(ones, self.compensation, None, self.stride, self.padding, self.dilation)
        return self._conv_forward(input, self.weight, self.bias) + extra


class CompensatedConv3d(nn.Conv3d):
    compensation: Tensor

    def forward(self, input: Tensor) -> Tensor:
        ones = torch.ones((1, 1) + input.shape[2:], dtype=input.dtype, device=input.device)
        extra = F.conv3d(ones, self.compensation, None, self.stride, self.padding, self.dilation)
        return self._conv_forward(input, self.weight, self.bias) + extra


COMPENSATED_CONV = {nn.Conv1d: CompensatedConv1d, nn.Conv2d: CompensatedConv2d, nn.Conv3d: CompensatedConv3d}
PLAIN_CONV = {v: k for k, v in COMPENSATED_CONV.items()}


class ResidualConstant(nn.Module):
    """What a residual block x + branch(x) becomes when the pruner removes its whole branch: the
    branch's output no longer depends on x (its channels were dead), so the block is x plus that
    constant, per channel."""

    constant: Tensor

    def __init__(self, constant):
        super().__init__()
        self.register_buffer("constant", constant.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x + self.constant.view(shape).to(x.dtype)

    def extra_repr(self):
        return f"{len(self.constant)} channels"


class ChannelAffine(nn.Module):
    """``act(x.index_select(1, index) * scale[c] + shift[c])``: an eval-mode BatchNorm over the
    selected input channels (``index``; None reads them all, in order) and the activation after it
    ("none", "relu", "relu6", "hardswish", "silu"), in one memory pass of
    ``torch.ops.slimcore.channel_affine`` (a BN, an index_select and an activation are three).

    ``portable=True`` computes the same with plain ATen ops (index_select, mul, add, activation)
    instead: ONNX exporters and other runtimes know those, not slimcore's op. Inference only: the
    coefficients are buffers, and the op has no backward.
    """

    index: "Tensor | None"
    scale: Tensor
    shift: Tensor

    def __init__(self, scale, shift, index=None, activation="none", portable=False):
        super().__init__()
        if activation not in reference.ACTIVATIONS:
            raise ValueError(f"ChannelAffine: unknown activation {activation!r}; expected one of "
                             f"{', '.join(reference.ACTIVATIONS)}")
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())
        self.register_buffer("index", None if index is None else index.detach().to(torch.long).clone())
        self.activation = activation
        self.portable = bool(portable)

    @classmethod
    @torch.no_grad()
    def from_batchnorm(cls, bn, activation="none", portable=False):
        """The eval-mode function of ``bn`` (its running statistics; a SelectedBatchNorm's
        ``selected_index`` becomes ``index``), then ``activation``."""
        if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            raise ValueError(f"ChannelAffine.from_batchnorm: {type(bn).__name__} has no running statistics "
                             "(track_running_stats=False normalises with batch statistics even in eval mode)")
        # In float64, then rounded once to the BN's dtype (float32 at least).
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        dtype = torch.float64 if bn.running_mean.dtype == torch.float64 else torch.float32
        return cls(scale.to(dtype), shift.to(dtype), getattr(bn, "selected_index", None), activation, portable)

    def forward(self, x: Tensor) -> Tensor:
        if self.portable:
            y = x if self.index is None else x.index_select(1, self.index)
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            shape = [1, -1] + [1] * (x.dim() - 2)
            y = y.to(acc) * self.scale.to(acc).view(shape) + self.shift.to(acc).view(shape)
            return reference.ACTIVATIONS[self.activation](y).to(x.dtype)
        if reference.affine_memory_format(x) is None:
            x = x.contiguous()  # sliced/transposed input: the kernels read NCHW or channels_last
        return ops.channel_affine(x, self.index, self.scale, self.shift, self.activation)

    def extra_repr(self):
        selects = "" if self.index is None else f", selects {len(self.index)} input channels"
        return f"{len(self.scale)} channels{selects}, activation={self.activation}" + \
            (", portable" if self.portable else "")


# slimcore's pruning artefacts whose channel rules are known at module level: the pruner's capture
# records each call as one node (their ATen ops would hide what the extra buffer is for).
LEAF_MODULES = (*PLAIN_CONV, ResidualConstant)


def set_compensation(conv, kernel):
    """Adds ``kernel`` (out_channels, 1, *kernel_size) to conv's border-exact compensation, turning
    it into a CompensatedConv in place (module object, parameters and hooks unchanged)."""
    base = PLAIN_CONV.get(type(conv), type(conv))
    if base not in COMPENSATED_CONV or conv.padding_mode != "zeros":
        raise TypeError(f"{type(conv).__name__} (padding_mode={conv.padding_mode!r}) takes no compensation map")
    if type(conv) in PLAIN_CONV:
        conv.compensation.add_(kernel.to(conv.compensation.dtype))
        return conv
    conv.__class__ = COMPENSATED_CONV[base]
    conv.register_buffer("compensation", kernel.to(device=conv.weight.device, dtype=conv.weight.dtype).clone())
    return conv
