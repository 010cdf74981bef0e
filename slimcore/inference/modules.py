"""``ChannelAffine``: an eval-mode BatchNorm over a selection of its input channels, with the
activation that reads it, as one pass (``slimcore.deploy`` puts it where a BN cannot fold into a
conv: pre-activation ResNet's ``bn1``, DenseNet's BNs on a concatenation).
"""

import torch
from torch import Tensor, nn

from .. import ops, reference

__all__ = ["ChannelAffine"]


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
