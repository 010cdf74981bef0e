"""FLOPs and parameter counts, with the convention of the filter-pruning papers (Li et al., ICLR 2017).

* conv: k_h * k_w * (C_in / groups) * H_out * W_out * C_out multiply-accumulates (any conv dimension);
* fully connected: C_in * C_out (times any extra leading dimensions, per sample);
* nothing else (BatchNorm, activations, pooling, additions) is counted.

"FLOPs" here are multiply-accumulates per sample, as in most pruning papers
(VGG-16 on CIFAR: 3.1e8, Li et al.'s Table 1); multiply by 2 for floating-point operations. Parameters are all of the
model's parameters (BN and biases included). Counted with forward hooks on nn.Conv1d/2d/3d and
nn.Linear modules, so convolutions written as functional calls in a forward are not seen.
"""

import math

import torch
from torch import nn

from .._modules import eval_mode

_COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def layer_macs(module, output_numel):
    """Multiply-accumulates of one conv/linear call producing output_numel values (whole batch)."""
    if isinstance(module, nn.Linear):
        return output_numel * module.in_features
    return output_numel * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def as_input_tuple(example_inputs):
    return example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def profile_layers(model, example_inputs):
    """{module name: MACs per sample} of every conv/linear call (summed over repeated calls)."""
    inputs = as_input_tuple(example_inputs)
    batch = inputs[0].shape[0] if inputs and torch.is_tensor(inputs[0]) and inputs[0].dim() > 0 else 1
    counts = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, _COUNTED):
            def hook(mod, args, out, name=name):
                counts[name] = counts.get(name, 0) + layer_macs(mod, out.numel())
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), eval_mode(model):
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return {name: c // batch for name, c in counts.items()}


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def profile(model, example_inputs):
    """(FLOPs, params): multiply-accumulates per sample of conv and linear layers, and parameters."""
    return sum(profile_layers(model, example_inputs).values()), count_params(model)
