"""Fold BatchNorm into the preceding conv or linear layer, for inference.

In eval mode a BN is an affine map per channel: y = (x - mean) * gamma / sqrt(var + eps) + beta.
When x comes straight from a conv or linear layer that nothing else reads (a *coupled* BN, see
graph.py), the map folds into that layer's weight and bias, and the BN becomes nn.Identity: one
memory pass less per BN. Selection BNs (pre-activation ResNet, DenseNet) normalise a tensor other
layers also read, so they stay.
"""

import torch
from torch import nn

from .._modules import parent_module
from ..pruning.graph import analyze
from ..pruning.modules import SELECTED_BATCHNORM


@torch.no_grad()
def fold_bn(model, example_inputs):
    """Folds every coupled BatchNorm into its conv/linear producer, in place; returns the names of
    the BNs folded. The model must be in eval mode (training-mode BN uses batch statistics)."""
    if model.training:
        raise ValueError("fold_bn: put the model in eval mode first (model.eval())")
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    graph = analyze(model, inputs)
    folded = []
    for mc in graph.modules.values():
        producer = graph.modules.get(mc.producer) if mc.kind == "bn" else None
        bn = mc.module
        # A module called more than once may meet other BNs elsewhere: leave it alone.
        if producer is None or producer.calls > 1 or mc.calls > 1 or getattr(bn, "running_mean", None) is None:
            continue
        # Only BNs whose forward is the batch norm alone (timm's BatchNormAct2d also activates).
        if type(bn) not in SELECTED_BATCHNORM:
            continue
        conv = producer.module
        scale = bn.running_var.add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        conv.weight.mul_(scale.view(shape).to(conv.weight.dtype))
        if "compensation" in conv._buffers:  # a CompensatedConv: its border term scales too
            conv.compensation.mul_(scale.view(shape).to(conv.compensation.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(shift.to(conv.weight.dtype))
        else:
            conv.bias.mul_(scale.to(conv.bias.dtype)).add_(shift.to(conv.bias.dtype))
        parent, attr = parent_module(model, mc.name)
        setattr(parent, attr, nn.Identity())
        folded.append(mc.name)
    return folded
