"""Modules the pruner puts into models.

``SelectedBatchNorm1d/2d/3d``: a BatchNorm that first keeps a subset of its input channels
(``x.index_select(1, selected_index)``), then normalises them. The pruner turns a selection BN
(one reading a tensor that other layers also read, e.g. pre-activation ResNet's ``bn1`` on the
residual stream or DenseNet's BN on a concatenation) into one when it drops some of the BN's
output channels but must keep its input: the network-slimming reference repo's
``channel_selection`` layer, folded into the BN so the dropped channels are never normalised.
They are BatchNorm subclasses (``isinstance(m, nn.BatchNorm2d)`` holds, ``sparse_bn_step`` finds
them) with the same state_dict keys plus ``selected_index``, and script, trace and export.
``SelectedSlimBatchNorm1d/2d`` are the same over a SlimBatchNorm.

``CompensatedConv1d/2d/3d``: a conv that also adds the response of its zero-padded input to a
constant plane: what removed input channels that carried a constant (a pruned BN channel with
gamma ~0 emits beta) contributed. Inside the image that is a per-channel bias; at the borders the
zero padding makes it position dependent, so the pruner stores the folded kernel
``compensation`` (out_channels, 1, *kernel) and the forward adds conv(ones, compensation):
exact at any input size, for 1/in_channels of the conv's cost.

``ResidualConstant``: what a residual block becomes when its whole branch is pruned: x + c.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..sparsity.batchnorm import SlimBatchNorm1d, SlimBatchNorm2d, register_slim_pair

__all__ = ["SelectedBatchNorm1d", "SelectedBatchNorm2d", "SelectedBatchNorm3d", "SelectedSlimBatchNorm1d",
           "SelectedSlimBatchNorm2d", "CompensatedConv1d", "CompensatedConv2d", "CompensatedConv3d",
           "ResidualConstant", "set_input_selection", "set_compensation"]


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
register_slim_pair(SelectedBatchNorm1d, SelectedSlimBatchNorm1d)
register_slim_pair(SelectedBatchNorm2d, SelectedSlimBatchNorm2d)


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


class _Compensated:
    """forward() of a conv plus conv(ones, compensation): the constant the removed input channels
    carried, seen through this conv's zero padding. ``compensation`` is (out_channels, 1, *kernel):
    one input channel of ones per group."""

    def forward(self, input: Tensor) -> Tensor:
        ones = torch.ones((1, self.groups) + input.shape[2:], dtype=input.dtype, device=input.device)
        return self._conv_forward(input, self.weight, self.bias) + self._conv_forward(ones, self.compensation, None)


class CompensatedConv1d(_Compensated, nn.Conv1d):
    compensation: Tensor


class CompensatedConv2d(_Compensated, nn.Conv2d):
    compensation: Tensor


class CompensatedConv3d(_Compensated, nn.Conv3d):
    compensation: Tensor


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
