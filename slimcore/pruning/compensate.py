"""Compensation: a removed channel whose gamma is ~0 still emits a constant (its beta through the
activation) into the next layers; these fold that constant into each consuming conv or linear.
"""


import numpy as np
import torch
from torch import nn

from .._modules import eval_mode
from .apply import channel_dim
from .graph import constants
from .modules import set_compensation


def removed_inputs(plan):
    """Dropped input channels of a consumer, in its input tensor's numbering."""
    gone = np.ones(plan.n_in, dtype=bool)
    gone[plan.in_keep] = False
    local = np.flatnonzero(gone)
    if plan.kind == "grouped_conv":  # the same local channels in every group
        ci = plan.n_in
        return (np.arange(plan.module.groups)[:, None] * ci + local[None, :]).reshape(-1)
    return local


@torch.no_grad()
def constant_run(model, inputs, removed_idx, consumers, blocks=(), betas=True):
    """One forward of the dense model in which every removed channel carries what it emits when
    its gamma is ~0: its beta at a BatchNorm output (the BN of its running mean), 0 anywhere else
    (with betas=False: 0 everywhere, the zeroing semantics). Returns (output, {consumer: (mean
    value per dropped input channel, max deviation from it)}, {block: its output minus its input,
    per channel})."""
    handles, captured, block_constants = [], {}, {}
    for name in blocks:
        block = model.get_submodule(name)

        def block_delta(mod, args, out, name=name):
            delta = (out - args[0]).double().movedim(1, 0).reshape(out.shape[1], -1)
            block_constants[name] = delta.mean(1)

        handles.append(block.register_forward_hook(block_delta))
    for name, idx in removed_idx.items():
        m = model.get_submodule(name)
        index = torch.as_tensor(idx, dtype=torch.long)
        is_bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
        value = m.bias.detach()[index] if betas and is_bn and m.bias is not None else None

        def set_constant(mod, args, out, index=index, value=value, dim=channel_dim(m)):
            out = out.clone()
            idx_dev = index.to(out.device)
            if value is None:
                return out.index_fill_(dim, idx_dev, 0.0)
            shape = [1] * out.dim()
            shape[dim] = len(index)
            return out.index_copy_(dim, idx_dev, value.to(out.dtype).view(shape).expand_as(out.index_select(dim, idx_dev)))

        handles.append(m.register_forward_hook(set_constant))
    for plan, gone in consumers:
        def capture(mod, args, plan=plan, gone=torch.as_tensor(gone, dtype=torch.long)):
            x = args[0].index_select(channel_dim(mod), gone.to(args[0].device)).double()
            x = x.movedim(channel_dim(mod), 0).reshape(len(gone), -1)
            mean = x.mean(1)
            captured[plan.name] = (mean, float((x - mean[:, None]).abs().max()) if x.numel() else 0.0)

        handles.append(plan.module.register_forward_pre_hook(capture))
    try:
        with eval_mode(model):
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return out, captured, block_constants


def compensation_kernel(plan, gone, constant):
    """What the dropped inputs, held at their constants, contribute: for a linear, a bias
    W[:, gone] @ c; for a conv, the kernel sum_c W[:, c] * c_c (out, 1, *kernel), whose
    response to a plane of ones is the contribution at every position."""
    w = plan.module.weight.detach().double()
    c = constant.to(w.device)
    if plan.kind == "linear":
        return w[:, gone] @ c
    if plan.kind == "conv":
        return torch.einsum("oi...,i->o...", w[:, gone], c).unsqueeze(1)
    groups = plan.module.groups  # grouped: output o reads its group's local inputs
    ci, co = plan.n_in, plan.n_out // groups
    local = gone.reshape(groups, -1) - (np.arange(groups) * ci)[:, None]
    c = c.reshape(groups, -1)
    return torch.cat([torch.einsum("oi...,i->o...", w[k * co:(k + 1) * co][:, local[k]], c[k])
                      for k in range(groups)]).unsqueeze(1)


def needs_map(module):
    """A zero-padded conv: the constant's contribution shrinks at the borders, so a bias is not
    exact. (Unpadded convs see the constant everywhere; reflect/replicate/circular padding of a
    constant plane is the same constant.)"""
    padding = module.padding
    padded = padding == "same" or (not isinstance(padding, str) and any(p > 0 for p in padding))
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.padding_mode == "zeros" and padded


def add_compensation(plan, kernel):
    m = plan.module
    if plan.kind != "linear" and needs_map(m):
        set_compensation(m, kernel)
        return
    delta = kernel if plan.kind == "linear" else kernel.flatten(1).sum(1)
    if m.bias is None:
        m.bias = nn.Parameter(torch.zeros(plan.n_out, dtype=m.weight.dtype, device=m.weight.device))
    m.bias.add_(delta.to(m.bias.dtype))


def symbolic_constants(graph, kept_atom, consumers, collapsed, betas):
    """What constant_run measures, derived from the capture (graph.constants): ({consumer: (the
    constant of each dropped input, 0.0)}, {collapsed block: its branch's constant per channel});
    None when some needed constant is not known that way."""

    const = constants(graph, ~kept_atom, betas=betas)
    captured = {}
    for plan, gone in consumers:
        values = [const.get(x) for x in graph.reads.get(plan.name, ())]
        if not values or any(v is None for v in values):
            return None
        first = values[0][gone]
        if not np.isfinite(first).all() or any(not np.array_equal(v[gone], first) for v in values[1:]):
            return None
        captured[plan.name] = (torch.from_numpy(first), 0.0)
    blocks = {}
    stream_of = {b.name: b for b in graph.residual_blocks}
    for name in collapsed:
        block = stream_of[name]
        values = const.get(block.branch)
        keep = kept_atom[block.stream_atoms]
        if values is None or not np.isfinite(values[keep]).all():
            return None
        blocks[name] = torch.from_numpy(np.nan_to_num(values))
    return captured, blocks
