"""The plan per module (which output and input channels each keeps) and its application: every
affected module rebuilt in place with the ``channel_gather_`` kernel (weights, biases, BN parameters
and buffers, gradients and the optimizer's state compacted in their own storage; Parameter objects
keep their identity).
"""

import math
import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import ops
from .modules import set_input_selection


@dataclass
class ModulePlan:
    name: str
    module: nn.Module
    kind: str
    out_keep: np.ndarray  # kept output channels (original numbering)
    in_keep: np.ndarray  # kept input channels (local within a group for grouped convs)
    selection: np.ndarray = None  # selection BN: input channel of each kept output, after pruning
    current_selection: np.ndarray = None  # selection BN: input channel of each output, now
    n_out: int = 0
    n_in: int = 0
    attrs: tuple = ()  # bn: the tensors its op reads; channel_param: (attribute,)
    dim: int = 0  # channel_param: the parameter's channel dimension


def module_plans(graph, kept_atom):
    plans = []
    for mc in graph.modules.values():
        out_mask, in_mask = kept_atom[mc.out_atoms], kept_atom[mc.in_atoms]
        plan = ModulePlan(mc.name, mc.module, mc.kind, np.nonzero(out_mask)[0], np.nonzero(in_mask)[0],
                          n_out=len(out_mask), n_in=len(in_mask), attrs=mc.attrs, dim=mc.dim)
        if mc.kind == "grouped_conv":
            local = in_mask.reshape(mc.module.groups, -1)
            assert (local == local[0]).all(), f"grouped conv '{mc.name}': groups disagree"
            plan.in_keep = np.nonzero(local[0])[0]
            plan.n_in = local.shape[1]
        elif mc.kind == "selection_bn":
            # Position of each kept output channel's input channel within the pruned input tensor.
            plan.current_selection = _source_positions(mc)
            in_pos = np.cumsum(in_mask) - 1
            plan.selection = in_pos[plan.current_selection[plan.out_keep]]
        plans.append(plan)
    return plans


def _source_positions(mc):
    """For each BN output channel, the index of the input channel it normalises."""
    selected = getattr(mc.module, "selected_index", None)
    if selected is not None:
        return selected.cpu().numpy()
    return np.arange(len(mc.out_atoms))


def plan_changes(plan):
    return len(plan.out_keep) != plan.n_out or len(plan.in_keep) != plan.n_in or (
        plan.selection is not None and not np.array_equal(plan.selection, plan.current_selection))


def new_param_counts(plan, add_bias=False):
    """(params, MAC factor) of the module after the plan (add_bias: compensation gives it a bias)."""
    m = plan.module
    o, i = len(plan.out_keep), len(plan.in_keep)
    bias = o if (getattr(m, "bias", None) is not None or add_bias) else 0
    if plan.kind in ("conv", "grouped_conv"):
        k = math.prod(m.kernel_size)
        return o * i * k + bias, (o / plan.n_out) * (i / plan.n_in)
    if plan.kind == "depthwise_conv":
        k = math.prod(m.kernel_size)
        return o * k * (m.weight.shape[1]) + bias, o / plan.n_out
    if plan.kind == "linear":
        return o * i + bias, (o / plan.n_out) * (i / plan.n_in)
    if plan.kind in ("bn", "selection_bn"):
        return (2 * o if m.affine else 0), 1.0
    if plan.kind == "prelu":
        return o, 1.0
    if plan.kind == "residual_constant":
        return 0, 1.0
    if plan.kind == "channel_param":
        p = getattr(m, plan.attrs[0])
        return (o * (p.numel() // plan.n_out) if isinstance(p, nn.Parameter) else 0), 1.0
    raise AssertionError(plan.kind)


def own_param_count(plan):
    if plan.kind == "channel_param":
        p = getattr(plan.module, plan.attrs[0])
        return p.numel() if isinstance(p, nn.Parameter) else 0
    return sum(p.numel() for p in plan.module.parameters(recurse=False))


def _index(idx, n, device):
    if len(idx) == n:
        return None
    return torch.as_tensor(idx, dtype=torch.long, device=device)


def _gather_tensor(t, out_idx, in_idx):
    if t.is_meta:  # a data-less copy being checked (graph.verify): the shape is all there is
        shape = list(t.shape)
        if out_idx is not None:
            shape[0] = len(out_idx)
        if in_idx is not None:
            shape[1] = len(in_idx)
        return t.new_empty(shape)
    return ops.channel_gather_(t, out_idx, in_idx)


def _gather_param(module, name, out_idx, in_idx, optimizer):
    p = getattr(module, name, None)
    if p is None or (out_idx is None and in_idx is None):
        return
    old_shape = p.shape
    if isinstance(p, nn.Parameter):
        if p.grad is not None:
            _gather_tensor(p.grad, out_idx, in_idx)
        if optimizer is not None:
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == old_shape:
                    _gather_tensor(value, out_idx, in_idx)
        data = p.data
        p.data = _gather_tensor(data, out_idx, in_idx)
    else:
        new = _gather_tensor(p, out_idx, in_idx)
        if new is not p:  # a meta copy's buffer: a new tensor
            setattr(module, name, new)


def apply_plan(plan, optimizer):
    m = plan.module
    if plan.kind == "channel_param":
        dev = getattr(m, plan.attrs[0]).device
    else:
        dev = m.weight.device if getattr(m, "weight", None) is not None else next(
            (b.device for b in m.buffers()), torch.device("cpu"))
    out_idx = _index(plan.out_keep, plan.n_out, dev)
    in_idx = _index(plan.in_keep, plan.n_in, dev)
    if plan.kind in ("conv", "grouped_conv"):
        _gather_param(m, "weight", out_idx, in_idx, optimizer)
        _gather_param(m, "bias", out_idx, None, optimizer)
        _gather_param(m, "compensation", out_idx, None, optimizer)
        m.out_channels = len(plan.out_keep)
        m.in_channels = len(plan.in_keep) * m.groups
    elif plan.kind == "depthwise_conv":
        _gather_param(m, "weight", out_idx, None, optimizer)
        _gather_param(m, "bias", out_idx, None, optimizer)
        _gather_param(m, "compensation", out_idx, None, optimizer)
        m.out_channels = m.in_channels = m.groups = len(plan.out_keep)
    elif plan.kind == "linear":
        _gather_param(m, "weight", out_idx, in_idx, optimizer)
        _gather_param(m, "bias", out_idx, None, optimizer)
        m.out_features, m.in_features = len(plan.out_keep), len(plan.in_keep)
    elif plan.kind in ("bn", "selection_bn"):
        # what its batch-norm op reads (a BN wrapper may name them otherwise), and the usual four
        for name in dict.fromkeys((*plan.attrs, "weight", "bias", "running_mean", "running_var")):
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == plan.n_out:
                _gather_param(m, name, out_idx, None, optimizer)
        if hasattr(m, "num_features"):
            m.num_features = len(plan.out_keep)
        if plan.kind == "selection_bn":
            identity = np.array_equal(plan.selection, np.arange(len(plan.in_keep)))
            set_input_selection(m, None if identity else torch.as_tensor(plan.selection, device=dev))
    elif plan.kind == "channel_param":  # e.g. a layer scale: the channels sit in one dimension
        if plan.dim == 0:
            _gather_param(m, plan.attrs[0], out_idx, None, optimizer)
        else:
            _gather_param(m, plan.attrs[0], None, out_idx, optimizer)
        if isinstance(m, nn.PReLU):
            m.num_parameters = len(plan.out_keep)
    elif plan.kind == "prelu":
        _gather_param(m, "weight", out_idx, None, optimizer)
        m.num_parameters = len(plan.out_keep)
    elif plan.kind == "residual_constant":
        _gather_param(m, "constant", out_idx, None, optimizer)


def channel_dim(module):
    return -1 if isinstance(module, nn.Linear) else 1


# Optimizers that have taken a step since slimcore was imported (weakly held): the ones that can hold
# state for a model's parameters. A global post-step hook costs a set insertion per step, where
# scanning every live object at prune time cost ~0.7 s in a large process.
_STEPPED_OPTIMIZERS = weakref.WeakSet()


register_optimizer_step_post_hook(lambda opt, args, kwargs: _STEPPED_OPTIMIZERS.add(opt))


def warn_unpassed_optimizers(model, plans, optimizer):
    """Warns about optimizers that hold state (momentum, Adam moments) for parameters this prune
    resizes but were not passed as ``optimizer=``: the parameters keep their identity, so such an
    optimizer would later fail (or mix channels) inside its step."""
    resized = {id(p) for plan in plans if plan_changes(plan) for p in plan.module.parameters(recurse=False)}
    if not resized:
        return
    stale = []
    for obj in list(_STEPPED_OPTIMIZERS):  # state exists only after a step, which the hook below saw
        if obj is not optimizer and any(id(p) in resized and state for p, state in obj.state.items()):
            stale.append(type(obj).__name__)
    if stale:
        warnings.warn(f"slimcore.prune: a {', '.join(sorted(set(stale)))} optimizer holds state for parameters this "
                      "prune resizes but was not passed as optimizer=; its state now has the old shapes and its next "
                      "step will fail. Pass it as prune(..., optimizer=opt), or build a new optimizer after pruning",
                      UserWarning, stacklevel=3)


def in_collapsed_blocks(plans, collapsed):
    return {plan.name for plan in plans if any(plan.name.startswith(b + ".") for b in collapsed)}


def count_flops_after(graph, plans, collapsed, in_collapsed):
    """MACs of the model once ``plans`` are applied and the ``collapsed`` blocks are gone."""
    flops = sum(graph.macs.values())
    for name in collapsed:
        flops -= sum(m for n, m in graph.macs.items() if n.startswith(name + "."))
    for plan in plans:
        if plan_changes(plan) and plan.name not in in_collapsed:
            macs = graph.macs.get(plan.name, 0)
            flops += round(macs * new_param_counts(plan)[1]) - macs  # the MAC factor does not depend on biases
    return flops
