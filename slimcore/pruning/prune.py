"""Structured channel pruning: ``slimcore.prune`` and ``PruneReport``, ``save_pruned`` / ``load_pruned``.

How a prune works: graph.py finds the classes of channels that must go together; criteria.py
scores them; this module decides which classes go (a global threshold or per layer, then
``min_channels`` and ``round_to`` per layer), then rebuilds every affected module in place with
the ``channel_gather_`` kernel: weights, biases, BN parameters and buffers, gradients and the
optimizer's state are compacted in their own storage, and Parameter objects keep their identity.

The contract, checked by the tests: the pruned model computes exactly what the dense model
computes when the channels listed in ``PruneReport.removed`` are zeroed at the outputs of the
listed modules.
"""

import copy
import functools
import gc
import inspect
import itertools
import math
import numbers
import os
import time
import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import ops
from ._modules import eval_mode
from .criteria import CRITERIA, atom_scores
from .capture import flat_tensors
from .graph import analyze, attribute_fixes, meta_copy, size_changes, verify
from .nn import ResidualConstant, set_compensation, set_input_selection
from .profile import _as_tuple, count_params
from .widths import LatencyTable, choose_widths

SCOPES = ("global", "layer")


@dataclass
class PruneReport:
    """What a prune did (or, with ``dry_run=True``, would do).

    ``flops_*`` are multiply-accumulates per sample of conv and linear layers (slimcore.profile's
    convention); ``channels`` maps every conv, linear and BN to its (before, after) output channel
    count (after = 0: the module went with a collapsed residual block); ``removed`` maps every
    module whose output channels shrank to the removed indices, in that module's original
    numbering.
    """

    ratio: float
    criterion: str
    scope: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    channels: dict
    removed: dict
    threshold: float = None
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    dry_run: bool = False
    compensated: dict = field(default_factory=dict)  # consumer -> number of dropped inputs folded into its bias
    # |pruned - dense with removed channels at their constants| on the example inputs (nonzero only at
    # padded conv borders); None when the constants came from the parameters (check_compensation=False)
    compensation_max_error: float = 0.0
    compensation_mean_error: float = 0.0
    collapsed: list = field(default_factory=list)  # residual blocks replaced by x + constant
    widths: list = field(default_factory=list)  # round_to="auto": per layer asked/chosen width and timings (ms)
    latency_check: dict = None  # round_to="auto": whole-model ms per candidate ("auto", "1", "8", ...) and the chosen one
    # Share of the scored channels (the pool a global ``ratio`` is a share of: every output channel
    # of a conv, linear or selection BN that has a score and is not frozen, channels tied together
    # going together) actually removed: min_channels, max_layer_ratio and round_to put channels
    # back, collapsed blocks and selection fixes take more.
    channels_removed_share: float = 0.0
    # Coverage: conv/linear name -> (output channels that could be removed, output channels, whether
    # a BN normalises them). The rest are frozen for the reasons in ``notes``.
    prunable: dict = field(default_factory=dict)
    # Conv/linear layers left with only min_channels: the criterion would have emptied them.
    starved: list = field(default_factory=list)

    @property
    def prunable_share(self):
        """Share of the conv/linear output channels that are prunable (not frozen)."""
        total = sum(t for _, t, _ in self.prunable.values())
        return sum(p for p, _, _ in self.prunable.values()) / total if total else 0.0

    @property
    def channels_removed(self):
        return sum(len(v) for v in self.removed.values())

    def __str__(self):
        p = 100 * (1 - self.params_after / max(self.params_before, 1))
        f = 100 * (1 - self.flops_after / max(self.flops_before, 1))
        lines = [
            f"slimcore.prune{' (dry run)' if self.dry_run else ''}: criterion={self.criterion} scope={self.scope} "
            f"ratio={self.ratio} in {self.seconds:.3f} s",
            f"  params {self.params_before:,} -> {self.params_after:,} (-{p:.1f}%)",
            f"  FLOPs  {self.flops_before:,} -> {self.flops_after:,} (-{f:.1f}%)",
            f"  channels removed: {100 * self.channels_removed_share:.1f}% of the scored ones (ratio asked {self.ratio:g})",
            f"  prunable: {100 * self.prunable_share:.1f}% of the conv/linear output channels (frozen: see notes)",
        ]
        shrunk = [(n, b, a) for n, (b, a) in self.channels.items() if a != b]
        lines.append(f"  {len(shrunk)} of {len(self.channels)} layers narrowed")
        for n, b, a in shrunk[:40]:
            lines.append(f"    {n:<40} {b:>6} -> {a}")
        if len(shrunk) > 40:
            lines.append(f"    ... {len(shrunk) - 40} more")
        widened = [w for w in self.widths if w["chosen"] != w["asked"]]
        if self.widths:
            lines.append(f"  round_to=auto: {len(widened)} of {len(self.widths)} layers widened to a faster width")
            for w in widened[:20]:
                lines.append(f"    {w['layer'][:40]:<40} {w['asked']:>6} -> {w['chosen']}  (ms: {w['ms']})")
        if self.latency_check:
            c = self.latency_check
            times = ", ".join(f"{k if k == 'auto' else 'round_to=' + k} {v:.3f}" for k, v in c["ms"].items())
            chosen = "the per-layer widths" if c["chosen"] == "auto" else f"round_to={c['chosen']}'s widths"
            lines.append(f"  whole model (ms): {times}; using {chosen}")
        lines += [f"  note: {n}" for n in self.notes[:10]]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- decision


def _is_real(value):
    """A real number, numpy's included (np.float32(0.5) from a sweep), but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _check_args(ratio, criterion, scope, round_to, min_channels):
    if not (_is_real(ratio) and 0.0 <= ratio < 1.0):
        raise ValueError(f"slimcore.prune: ratio must be a number in [0, 1), got {ratio!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"slimcore.prune: unknown criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")
    if scope not in SCOPES:
        raise ValueError(f"slimcore.prune: scope must be one of {SCOPES}, got {scope!r}")
    if not (isinstance(round_to, str) and round_to == "auto" or _is_integer(round_to) and round_to >= 1):
        raise ValueError(f"slimcore.prune: round_to must be an integer >= 1 or 'auto', got {round_to!r}")
    if not (_is_integer(min_channels) and min_channels >= 1):
        raise ValueError(f"slimcore.prune: min_channels must be an integer >= 1, got {min_channels!r}")


class _Classes:
    """Per-class arrays derived from the graph: class of each atom, score, frozen, layer."""

    def __init__(self, graph, scores):
        self.graph = graph
        _, self.of_atom = np.unique(graph.classes(), return_inverse=True)
        n = int(self.of_atom.max()) + 1 if graph.n_atoms else 0
        self.n = n
        self.frozen = np.zeros(n, dtype=bool)
        self.frozen[self.of_atom[graph.frozen]] = True
        self.score = np.full(n, np.nan)
        np.fmax.at(self.score, self.of_atom, scores)
        self.size = np.bincount(self.of_atom, minlength=n)
        # Selection atoms and their parents (a selection channel must go when its input goes).
        sel = np.fromiter(graph.selection_parent.keys(), dtype=np.int64, count=len(graph.selection_parent))
        par = np.fromiter(graph.selection_parent.values(), dtype=np.int64, count=len(graph.selection_parent))
        self.sel_class, self.parent_class = self.of_atom[sel], self.of_atom[par]
        self.is_selection = np.zeros(n, dtype=bool)
        self.is_selection[self.sel_class] = True
        # A selection channel that must stay needs its input channel: freeze parents of frozen ones.
        while True:
            need = self.frozen[self.sel_class] & ~self.frozen[self.parent_class]
            if not need.any():
                break
            self.frozen[self.parent_class[need]] = True
        self._layers(graph.owner, len(graph.owner_names))
        self.candidate = ~self.frozen & np.isfinite(self.score)

    def _layers(self, owner, n_owners):
        """layer[c]: an id for the set of modules owning class c's atoms (classes of one conv share
        it; a residual stream's classes share theirs); multiplicity[c]: atoms per owning module."""
        n = self.n
        owned = owner >= 0
        pairs, counts = np.unique(self.of_atom[owned] * n_owners + owner[owned], return_counts=True)
        pair_class, pair_owner = pairs // n_owners, pairs % n_owners
        self.multiplicity = np.ones(n, dtype=np.int64)
        np.maximum.at(self.multiplicity, pair_class, counts)
        # The owner set of a class, hashed: a sum of fixed random 64-bit keys, one per module
        # (collisions need two different sets with equal sums: probability ~ 2^-64 per pair).
        keys = np.random.default_rng(0).integers(1, 2**63, size=max(n_owners, 1), dtype=np.uint64)
        signature = np.zeros(n, dtype=np.uint64)
        np.add.at(signature, pair_class, keys[pair_owner])
        _, self.layer = np.unique(signature, return_inverse=True)

    def layers(self, mask):
        """{layer id: array of class ids} for the classes in mask."""
        idx = np.nonzero(mask)[0]
        order = idx[np.argsort(self.layer[idx], kind="stable")]
        bounds = np.flatnonzero(np.diff(self.layer[order])) + 1
        return {int(self.layer[g[0]]): g for g in np.split(order, bounds) if len(g)}


def _global_removal(classes, ratio):
    """(removed mask, threshold): the lowest-scoring candidate classes, each weighted by the
    channels it holds, up to a share ``ratio`` of all candidate channels. For a plain conv-BN chain
    under bn_scale this is the paper's percentile of |gamma|; ties are broken by position, so
    equal scores (e.g. an untrained model) still lose the requested share."""
    removed = np.zeros(classes.n, dtype=bool)
    idx = np.nonzero(classes.candidate)[0]
    order = idx[np.argsort(classes.score[idx], kind="stable")]
    weights = classes.size[order].astype(np.float64)
    k = int(np.searchsorted(np.cumsum(weights), ratio * weights.sum(), side="right"))
    removed[order[:k]] = True
    return removed, float(classes.score[order[k]]) if k < len(order) else math.inf


def _round_up(k, multiplicity, round_to, n):
    step = round_to // math.gcd(round_to, int(multiplicity))
    return min(n, -(-k // step) * step)


def _restore(classes, removed, groups, round_to, min_channels, allowed, max_layer_ratio=1.0):
    """Per layer: put back the best removed classes until min_channels, max_layer_ratio and
    round_to hold."""
    for layer, members in groups.items():
        m = int(classes.multiplicity[members[0]])
        n = len(members)
        kept = int((~removed[members]).sum())
        need = max(kept, min(n, -(-min_channels // m)), n - int(math.floor(max_layer_ratio * n)))
        need = _round_up(need, m, round_to, n)
        if need <= kept:
            continue
        back = members[removed[members] & allowed[members]]
        back = back[np.argsort(-classes.score[back], kind="stable")][: need - kept]
        removed[back] = False


def _down_selections(classes, mask):
    """Grows a class mask (in place, and returns it) along selection edges: a selection class
    whose input class is in the mask joins it, to a fixed point (selections can chain)."""
    while True:
        newly = mask[classes.parent_class] & ~mask[classes.sel_class]
        if not newly.any():
            return mask
        mask[classes.sel_class[newly]] = True


def decide(classes, ratio, scope, round_to, min_channels, max_layer_ratio=1.0, blocks=(), widen=None):
    """Boolean array: class removed. Returns (removed, threshold, collapsed block names).

    ``widen(removed, layers, allowed)`` (round_to="auto": slimcore.widths) may put back removed
    classes per layer after the criterion's, min_channels' and max_layer_ratio's choices.

    ``blocks``: [(name, internal class ids)] of residual blocks that may collapse: if the
    threshold empties any layer inside a block's branch, the whole branch goes (the block becomes
    x + constant) instead of min_channels keeping a sliver of it.
    """
    removed = np.zeros(classes.n, dtype=bool)
    threshold = None
    if scope == "global":
        removed, threshold = _global_removal(classes, ratio)
    else:
        for members in classes.layers(classes.candidate).values():
            k = int(math.floor(ratio * len(members)))
            order = members[np.argsort(classes.score[members], kind="stable")]
            removed[order[:k]] = True
    collapsed = []
    for name, internal in blocks:
        layers = classes.layers(np.isin(np.arange(classes.n), internal))
        if any(removed[members].all() for members in layers.values()):
            removed[internal] = True
            collapsed.append(name)
    protected = np.zeros(classes.n, dtype=bool)  # inside a collapsed block: no sliver to keep
    for name, internal in blocks:
        if name in collapsed:
            protected[internal] = True
    base = ~classes.is_selection & ~protected
    if round_to == "auto":
        round_to = 1
    _restore(classes, removed, classes.layers(base), round_to, min_channels, classes.candidate, max_layer_ratio)
    if widen is not None:
        widen(removed, classes.layers(base), classes.candidate)
    # A selection channel goes when its input channel goes (to a fixed point: selections can chain).
    before = removed.copy()
    _down_selections(classes, removed)
    forced = removed & ~before
    # Selection layers keep min_channels too; never by putting back a channel that reads (through
    # any chain of selections) a channel of a collapsed block.
    reads_collapsed = _down_selections(classes, protected.copy())
    _restore(classes, removed, classes.layers(classes.is_selection & ~protected), round_to, min_channels,
             classes.candidate & ~forced & ~reads_collapsed, max_layer_ratio)
    # A selection channel put back may read an input channel the threshold removed (both were
    # below it): that input channel comes back too (to a fixed point: selections can chain), and
    # its layer is rounded to round_to again (putting back more creates no such orphan).
    orphan = ~removed[classes.sel_class] & removed[classes.parent_class]
    if orphan.any():
        while orphan.any():
            removed[classes.parent_class[orphan]] = False
            orphan = ~removed[classes.sel_class] & removed[classes.parent_class]
        _restore(classes, removed, classes.layers(base), round_to, min_channels, classes.candidate, max_layer_ratio)
    return removed, threshold, collapsed


def _collapsible_blocks(graph, classes, compensate):
    """[(block name, internal class ids)] of residual blocks whose branch may be removed: its
    classes live only inside the block, none is frozen, and the branch's output without them is a
    per-channel constant (with compensation, that needs a last conv without zero padding)."""
    owner, names = graph.owner, graph.owner_names
    # sets, not np.unique: without return_inverse numpy 2 imports numpy.ma on its first call (0.1 s)
    stream = set(classes.of_atom[np.concatenate([b.stream_atoms for b in graph.residual_blocks])].tolist()) \
        if graph.residual_blocks else set()
    blocks = []
    for block in graph.residual_blocks:
        if compensate and not block.last_exact:
            continue
        inside_ids = [i for i, n in enumerate(names) if n.startswith(block.name + ".")]
        inside = np.isin(owner, inside_ids)
        internal = np.array(sorted(set(classes.of_atom[inside].tolist()) - stream), dtype=np.int64)
        if len(internal) == 0:
            continue
        touches = np.isin(classes.of_atom, internal)
        if (touches & ~inside).any() or classes.frozen[internal].any() or not classes.candidate[internal].all():
            continue
        blocks.append((block.name, internal))
    return blocks


# ---------------------------------------------------------------------------------------- the plan


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


def _plans(graph, kept_atom):
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


def _changes(plan):
    return len(plan.out_keep) != plan.n_out or len(plan.in_keep) != plan.n_in or (
        plan.selection is not None and not np.array_equal(plan.selection, plan.current_selection))


def _new_counts(plan, add_bias=False):
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


def _own_params(plan):
    if plan.kind == "channel_param":
        p = getattr(plan.module, plan.attrs[0])
        return p.numel() if isinstance(p, nn.Parameter) else 0
    return sum(p.numel() for p in plan.module.parameters(recurse=False))


# ---------------------------------------------------------------------------------------- applying


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


def _apply(plan, optimizer):
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


# ---------------------------------------------------------------------------------------- compensation


def _channel_dim(module):
    return -1 if isinstance(module, nn.Linear) else 1


def _removed_inputs(plan):
    """Dropped input channels of a consumer, in its input tensor's numbering."""
    gone = np.ones(plan.n_in, dtype=bool)
    gone[plan.in_keep] = False
    local = np.flatnonzero(gone)
    if plan.kind == "grouped_conv":  # the same local channels in every group
        ci = plan.n_in
        return (np.arange(plan.module.groups)[:, None] * ci + local[None, :]).reshape(-1)
    return local


@torch.no_grad()
def _constant_run(model, inputs, removed_idx, consumers, blocks=(), betas=True):
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

        def set_constant(mod, args, out, index=index, value=value, dim=_channel_dim(m)):
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
            x = args[0].index_select(_channel_dim(mod), gone.to(args[0].device)).double()
            x = x.movedim(_channel_dim(mod), 0).reshape(len(gone), -1)
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


def _compensation_kernel(plan, gone, constant):
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


def _needs_map(module):
    """A zero-padded conv: the constant's contribution shrinks at the borders, so a bias is not
    exact. (Unpadded convs see the constant everywhere; reflect/replicate/circular padding of a
    constant plane is the same constant.)"""
    padding = module.padding
    padded = padding == "same" or (not isinstance(padding, str) and any(p > 0 for p in padding))
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.padding_mode == "zeros" and padded


def _compensate(plan, kernel):
    m = plan.module
    if plan.kind != "linear" and _needs_map(m):
        set_compensation(m, kernel)
        return
    delta = kernel if plan.kind == "linear" else kernel.flatten(1).sum(1)
    if m.bias is None:
        m.bias = nn.Parameter(torch.zeros(plan.n_out, dtype=m.weight.dtype, device=m.weight.device))
    m.bias.add_(delta.to(m.bias.dtype))


def parent_module(model, name):
    """(parent module, attribute name) of the submodule called ``name``."""
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _module_names(model, items):
    if isinstance(items, (str, nn.Module)):  # one entry, not a string's characters
        items = [items]
    if not items:
        return set()
    by_id = {id(m): n for n, m in model.named_modules()}
    names = set()
    for item in items:
        if isinstance(item, str):
            try:
                model.get_submodule(item)
            except AttributeError:
                raise ValueError(f"slimcore.prune: ignore names '{item}', which is not a submodule") from None
            names.add(item)
        elif isinstance(item, nn.Module) and id(item) in by_id:
            names.add(by_id[id(item)])
        else:
            raise ValueError(f"slimcore.prune: ignore entries must be submodules or their names, got {item!r}")
    return names


def _keep_outputs(value):
    """keep_outputs as analyze() takes it: None (all) or a tuple of output paths."""
    if value is True:
        return None
    if value is False:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        paths = tuple(value)
    except TypeError:
        raise TypeError(f"slimcore.prune: keep_outputs must be True, False or output paths (str), got {value!r}") from None
    if not all(isinstance(p, str) for p in paths):
        raise TypeError(f"slimcore.prune: keep_outputs paths must be strings like '0' or '1.feats', got {value!r}")
    return paths


def _analysis(model, inputs, criterion, ignore, leaf_modules, history, seed, compensate, collapse_blocks,
              keep_outputs=True):
    """What prune() knows before it picks a ratio: the traced graph, the scored channel classes and
    the residual blocks that may collapse."""
    graph = analyze(model, inputs, ignore=_module_names(model, ignore), leaf_modules=leaf_modules,
                    keep_outputs=_keep_outputs(keep_outputs))
    scores = atom_scores(graph, criterion, history=history, seed=seed)
    classes = _Classes(graph, scores)
    blocks = _collapsible_blocks(graph, classes, compensate) if collapse_blocks else []
    return graph, classes, blocks


def _module_of(plan):
    """Name of the module a plan changes (a channel_param plan is named module.attribute)."""
    return plan.name[: -len(plan.attrs[0])].rstrip(".") if plan.kind == "channel_param" else plan.name


def _apply_to_copy(copy_model, graph, kept_atom, collapsed, fixes):
    """Applies the plan to a data-less copy of the model: shapes and attributes only."""
    plans = _plans(graph, kept_atom)
    in_collapsed = _in_collapsed(plans, collapsed)
    for plan in plans:
        if _changes(plan) and plan.name not in in_collapsed:
            plan.module = copy_model.get_submodule(_module_of(plan))
            _apply(plan, None)
    stream_of = {b.name: b.stream_atoms for b in graph.residual_blocks}
    for name in collapsed:
        parent, attr = parent_module(copy_model, name)
        device = next(copy_model.get_submodule(name).parameters()).device
        setattr(parent, attr, ResidualConstant(torch.zeros(int(kept_atom[stream_of[name]].sum()), device=device)))
    for name, attr, _, new in fixes:
        setattr(copy_model.get_submodule(name), attr, new)


def _check_sizes(model, inputs, graph, kept_atom, collapsed, fixes):
    """verify() on a pruned copy: on the meta device, or on uninitialised CPU memory where the
    model's code needs real tensors (it reads values, or mixes its own tensors with the input's)."""
    for device in ("meta", "cpu"):
        copy_model = meta_copy(model, device)
        _apply_to_copy(copy_model, graph, kept_atom, collapsed, fixes)
        problems = verify(graph, copy_model, inputs, kept_atom, device)
        if not problems or not problems[0].message.startswith("the pruned model does not run"):
            break  # a run on meta tensors that fails may be the model's own (CPU) tensors meeting them
    return problems, copy_model


def _chunk_attribute_fixes(model, inputs, graph, kept_atom, collapsed, fixes):
    """A module that splits with chunk() in the forward that ran may split by an attribute in
    another (ultralytics' C2f: chunk(2, 1) in forward, split((self.c, self.c), 1) in forward_split,
    which its ONNX export uses): integer attributes of that module holding the old piece size
    follow the new one. Kept only if the pruned copy still runs as planned."""
    found = []
    for node, f in _fixes_at(model, graph, graph.chunks, kept_atom):
        if f[0] == node.stack[-1] and f not in fixes + found:
            found.append(f)
    if found:
        problems, _ = _check_sizes(model, inputs, graph, kept_atom, collapsed, fixes + found)
        if problems:
            return []
    return found


def _problem_fixes(copy_model, graph, problem, kept_atom):
    """Attribute fixes for a mismatch. A size the code computes from several attributes
    (ultralytics' Attention views its qkv as ``key_dim * 2 + head_dim``) matches none of them,
    and an outer module's attribute may hold the same number by chance: the module's own sizes at
    its other checked nodes (the split by ``[key_dim, key_dim, head_dim]`` after that view) name
    the attributes one by one, so those come first."""
    node = problem.node
    if not node.stack:  # the model's own forward: no module attributes to look at
        return []
    here = [i for i in graph.checks if i != node.index and graph.capture.nodes[i].stack == node.stack]
    own = [f for _, f in _fixes_at(copy_model, graph, here, kept_atom) if f[0] == node.stack[-1]]
    return list(dict.fromkeys(own)) or attribute_fixes(copy_model, node, problem.changes)


def _similar_fixes(copy_model, graph, kept_atom, found, fixes):
    """The same attribute fixes at the other check nodes of modules of the same classes (a CSP
    stage repeated five times has five splits sized by the same attribute): found in one run
    instead of one run each."""
    kinds = {(type(copy_model.get_submodule(name)), attr) for name, attr, _, _ in found}
    named = {(f[0], f[1]) for f in found}  # one value per attribute: the fix found first
    extra = []
    for _, f in _fixes_at(copy_model, graph, graph.checks, kept_atom):
        if (type(copy_model.get_submodule(f[0])), f[1]) in kinds and (f[0], f[1]) not in named \
                and f not in fixes:
            extra.append(f)
            named.add((f[0], f[1]))
    return extra


def _fixes_at(model, graph, node_indices, kept_atom):
    """(node, attribute fix) for every module attribute that holds a size the plan changes at the
    listed nodes (graph.attribute_fixes on graph.size_changes)."""
    for i in node_indices:
        node = graph.capture.nodes[i]
        changes = size_changes(graph, node, kept_atom) if node.stack else None
        if changes:
            for f in attribute_fixes(model, node, changes):
                yield node, f


def _fit_sizes(model, inputs, graph, classes, blocks, decided, redecide):
    """Checks that the pruned model's code produces the planned sizes where it writes sizes
    (split sizes, slices, views: graph.checks). Where a module attribute holds an old size,
    updating it is tried; otherwise the channels that node reads are frozen and the decision is
    made again. Returns (classes, blocks, (removed, threshold, collapsed), attribute fixes)."""
    fixes, problems, tied = [], None, set()
    for _ in range(32):
        kept_atom = ~decided[0][classes.of_atom]
        if problems is None:
            problems, copy_model = _check_sizes(model, inputs, graph, kept_atom, decided[2], fixes)
        if not problems:
            return classes, blocks, decided, fixes
        new = []  # attribute fixes for every mismatch at once, kept where they help
        for problem in problems:
            if problem.node is not None and problem.changes:
                new += [f for f in _problem_fixes(copy_model, graph, problem, kept_atom)
                        if f not in fixes and f not in new]
        helped = False
        for option in _unambiguous(new):
            option = option + _similar_fixes(copy_model, graph, kept_atom, option, fixes)
            again, again_model = _check_sizes(model, inputs, graph, kept_atom, decided[2], fixes + option)
            if len(again) < len(problems) or (again and _later(again[0].node, problems[0].node)):
                fixes += option
                problems, copy_model = again, again_model
                helped = True
                break
        if helped:
            continue
        problem = problems[0]
        if problem.node is not None and problem.node.index not in tied:
            tied.add(problem.node.index)
            if _tie_equal_pieces(graph, problem.node) or _tie_to_module_input(graph, problem.node):
                classes, blocks = redecide(None)
                decided = redecide(classes, blocks)
                fixes, problems = [], None
                continue
        nodes = [problem.node] if problem.node is not None else [graph.capture.nodes[i] for i in
                                                                 (problem.unverified or graph.checks)]
        frozen_before = int(graph.frozen.sum())
        for node in nodes:
            where = f"'{node.stack[-1]}'" if node.stack else "the model's forward"
            for v in node.refs():
                inf = graph.info.get(v)
                if inf is not None:
                    graph.freeze(inf.atoms, f"sizes written in the model's code (aten.{node.op})", where)
        if int(graph.frozen.sum()) == frozen_before and problem.node is not None:
            # The size came from elsewhere (e.g. view(B, C, H, W) with C of the module's input):
            # freeze the inputs of the module calls around the node, innermost first.
            cap = graph.capture
            for name in reversed(problem.node.stack):
                for call in cap.calls:
                    if call.name == name and call.start <= problem.node.index < call.end:
                        for v in call.inputs:
                            inf = graph.info.get(v) if v is not None else None
                            if inf is not None:
                                graph.freeze(inf.atoms, "sizes written in the model's code (from a module's input)",
                                             f"'{name}'")
                if int(graph.frozen.sum()) != frozen_before:
                    break
        if int(graph.frozen.sum()) == frozen_before and problem.node is not None:
            # Still no lead: every channel the innermost module call around the node touches.
            cap = graph.capture
            call = min((c for c in cap.calls if c.start <= problem.node.index < c.end),
                       key=lambda c: c.end - c.start, default=None)
            if call is not None:
                for node in cap.nodes[call.start:call.end]:
                    for v in (*node.refs(), *node.outputs):
                        inf = graph.info.get(v)
                        if inf is not None:
                            graph.freeze(inf.atoms, "sizes the check could not follow", f"'{call.name}'")
        if int(graph.frozen.sum()) == frozen_before:
            raise RuntimeError(f"slimcore.prune: the pruned model would not run as planned: {problem.message}")
        classes, blocks = redecide(None)
        decided = redecide(classes, blocks)
        fixes, problems = [], None  # found again for the new decision
    raise RuntimeError("slimcore.prune: the pruned model's sizes could not be made to follow the plan")


def _unambiguous(fixes, limit=8):
    """The attribute fixes to try, as alternatives: all of them, or where several attributes of a
    module hold the same old size (4 heads of 4 key channels each), one of them at a time (at most
    ``limit`` combinations)."""
    if not fixes:
        return []
    groups = {}
    for f in fixes:
        groups.setdefault((f[0], f[2] if isinstance(f[2], int) else None, str(f[3])), []).append(f)
    ambiguous = [g for key, g in groups.items() if len(g) > 1 and key[1] is not None]
    if not ambiguous:
        return [fixes]
    options = [fixes]
    for choice in itertools.islice(itertools.product(*ambiguous), limit):
        dropped = {id(f) for g, keep in zip(ambiguous, choice) for f in g if f is not keep}
        options.append([f for f in fixes if id(f) not in dropped])
    return options


def _later(node, than):
    """The first problem moved further down the model (a fix that helps)."""
    if node is None or than is None:
        return node is not than
    return node.index > than.index


def _tie_equal_pieces(graph, node):
    """A split into equal pieces whose size comes from an attribute (ultralytics' C2PSA:
    ``split((self.c, self.c), 1)``) stays valid with one attribute only if every piece keeps as
    many channels: tie channel j of each piece, as for chunk. False when the pieces differ."""
    if node.op not in ("split", "split_with_sizes"):
        return False
    infos = [graph.info.get(v) for v in node.outputs]
    if len(infos) < 2 or any(inf is None for inf in infos) or len({len(inf.atoms) for inf in infos}) != 1:
        return False
    for inf in infos[1:]:
        graph.union(infos[0].atoms, inf.atoms)
    return True


def _tie_to_module_input(graph, node):
    """A reshape whose channel count the code takes from a module's input (ultralytics' Attention:
    ``view(B, C, H, W)`` with ``B, C, H, W = x.shape``) needs as many channels as that input keeps:
    tie the two position by position (channel i of one goes with channel i of the other). Ties only
    narrow the choice, so the model stays exact; the size check runs again. False when no
    enclosing module call has an input of the reshape's channel count."""
    if node.op not in _VIEW_OPS:
        return False
    out = graph.info.get(node.outputs[0]) if node.outputs else None
    if out is None:
        return False
    cap = graph.capture
    for name in reversed(node.stack):
        for call in cap.calls:
            if call.name != name or not call.start <= node.index < call.end:
                continue
            for v in call.inputs:
                inf = graph.info.get(v) if v is not None else None
                if inf is not None and len(inf.atoms) == len(out.atoms) and inf.dim == out.dim:
                    graph.union(inf.atoms, out.atoms)
                    return True
    return False


_VIEW_OPS = {"view", "_unsafe_view", "reshape"}


def _leaf_modules(leaf_modules):
    if isinstance(leaf_modules, str):
        raise TypeError(f"slimcore.prune: leaf_modules must be submodules or module classes, not a string "
                        f"({leaf_modules!r}); pass the module object or its class")
    if isinstance(leaf_modules, nn.Module) or isinstance(leaf_modules, type):
        return (leaf_modules,)
    return tuple(leaf_modules)


# Optimizers that have taken a step since slimcore was imported (weakly held): the ones that can hold
# state for a model's parameters. A global post-step hook costs a set insertion per step, where
# scanning every live object at prune time cost ~0.7 s in a large process.
_STEPPED_OPTIMIZERS = weakref.WeakSet()
register_optimizer_step_post_hook(lambda opt, args, kwargs: _STEPPED_OPTIMIZERS.add(opt))


def _warn_unpassed_optimizers(model, plans, optimizer):
    """Warns about optimizers that hold state (momentum, Adam moments) for parameters this prune
    resizes but were not passed as ``optimizer=``: the parameters keep their identity, so such an
    optimizer would later fail (or mix channels) inside its step."""
    resized = {id(p) for plan in plans if _changes(plan) for p in plan.module.parameters(recurse=False)}
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


def _in_collapsed(plans, collapsed):
    return {plan.name for plan in plans if any(plan.name.startswith(b + ".") for b in collapsed)}


def _flops_after(graph, plans, collapsed, in_collapsed):
    """MACs of the model once ``plans`` are applied and the ``collapsed`` blocks are gone."""
    flops = sum(graph.macs.values())
    for name in collapsed:
        flops -= sum(m for n, m in graph.macs.items() if n.startswith(name + "."))
    for plan in plans:
        if _changes(plan) and plan.name not in in_collapsed:
            macs = graph.macs.get(plan.name, 0)
            flops += round(macs * _new_counts(plan)[1]) - macs  # the MAC factor does not depend on biases
    return flops


def _without_cyclic_gc(fn):
    """Runs fn with Python's cyclic garbage collector paused. A prune allocates tens of thousands
    of short-lived objects (the capture's nodes), freed by reference counting; with the collector
    on, those allocations set off collections of the whole process heap (0.13 s on the first prune
    after importing torch and torchvision, 4x the prune itself)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return wrapper


@_without_cyclic_gc
def prune(model, example_inputs, ratio=0.5, criterion="bn_scale", scope="global", round_to=1, min_channels=1,
          ignore=(), optimizer=None, *, compensate=True, max_layer_ratio=1.0, collapse_blocks=True, dry_run=False,
          history=None, seed=0, leaf_modules=(), device=None, latency_table=None, check_latency=True,
          deploy=None, check_compensation=False, keep_outputs=True):
    """Removes channels from ``model`` in place and returns a :class:`PruneReport`.

    Args:
        model: any model that runs on ``example_inputs`` (it is captured once at the ATen level;
            see slimcore/graph.py for the channel rules).
        example_inputs: a tensor or a tuple of positional inputs, used once for shapes.
        ratio: share of prunable channels to remove, in [0, 1). Each produced (conv/linear
            output) or selected (selection BN output) channel counts once; coupled channels go
            together, scored by the max of their members' scores (slimcore.criteria).
        criterion: "bn_scale" (network slimming), "l1_filter", "cfp", "hbfp" (needs ``history``),
            "random"; see slimcore.criteria.
        scope: "global" (one threshold over all prunable channels: for bn_scale on conv-BN
            chains, the paper's percentile of |gamma|) or "layer" (each layer loses ``ratio``
            of its channels).
        round_to: keep channel counts multiples of this (by keeping more, never fewer); or
            "auto": per layer, keep more channels only where a measured width is faster
            (slimcore.widths: timed on ``device``, cached; the choices are in ``report.widths``).
        min_channels: no layer keeps fewer channels than this.
        max_layer_ratio: no layer loses more than this share of its channels (1.0: no limit).
        collapse_blocks: when the threshold would empty a layer inside a residual block's branch
            (x + branch(x), the block's own output, as in pre-activation ResNets), remove the whole
            branch and replace the block by ``slimcore.nn.ResidualConstant`` (x + the branch's
            constant output) instead of keeping a ``min_channels`` sliver of it. Exact when the
            branch's channels are dead; with compensation, only for branches whose last conv has
            no zero padding (a bottleneck's 1x1), where that constant is per channel.
        ignore: modules (or names) whose channels stay as they are.
        keep_outputs: which of the model's tensor outputs keep their channels: True (all, e.g.
            the classifier's logits), False (none), or paths into the returned structure, each
            keeping everything under it: ``["0"]`` keeps the first element of a returned tuple, so
            auxiliary outputs after it (an ultralytics head's "feats" in eval mode: the neck's
            features) shrink with the pruned layers that produce them.
        optimizer: its state (momentum, Adam moments) is compacted along with the parameters,
            which keep their identity, so training can continue. Compaction is in place: any
            other reference to those state tensors (e.g. an un-copied ``state_dict()``) shrinks too.
        compensate: a removed channel whose gamma is ~0 still emits a constant (its beta, through
            the activation) into the next layers; fold that constant into each consuming conv or
            linear's bias (adding a bias where there is none; an optimizer does not know a new
            bias). Exact for linear, 1x1 and unpadded convs; padded convs get the interior value,
            and the remaining deviation on example_inputs is in the report. With
            ``compensate=False`` the pruned model equals the dense model with the ``removed``
            channels zeroed instead.
        dry_run: only compute the report.
        history: a ``slimcore.FilterHistory`` for criterion "hbfp".
        seed: for criterion "random".
        leaf_modules: submodules or classes recorded as one opaque op each; their channels stay.
        device: where round_to="auto" times layers (default: the model's device), at the model's
            dtype and example_inputs' batch size.
        latency_table: a ``slimcore.widths.LatencyTable`` for round_to="auto" (its own device,
            dtype, batch, memory format and cache); overrides ``device``.
        check_latency: round_to="auto" only: time whole copies of the model pruned at the
            per-layer widths and at uniform ``round_to`` 1, 8 and 16 (interleaved) and use the
            fastest; anything but round_to=1 must beat it by ``slimcore.widths.MODEL_MARGIN``.
            ``report.latency_check`` has the times. Never slower than round_to=1, as measured.
        deploy: with the whole-model check, a function taking each pruned copy (in eval mode)
            and returning the model as it will run, e.g. one that calls ``slimcore.fold_bn(m, x)``
            and returns ``m``; the check then times deployed models (widths that win as pruned
            can lose once BN is folded). Default: timed as pruned.
        check_compensation: measure the constants with a forward pass of the dense model instead of
            deriving them from the BN parameters through the captured graph, and measure the pruned
            model's deviation from it (``report.compensation_max_error``; ``None`` when not measured).
            The derivation falls back to the measured run by itself where it cannot tell a constant
            (zero-padded averages, ops it cannot evaluate).
    """
    start = time.perf_counter()
    _check_args(ratio, criterion, scope, round_to, min_channels)
    if not (_is_real(max_layer_ratio) and 0.0 < max_layer_ratio <= 1.0):
        raise ValueError(f"slimcore.prune: max_layer_ratio must be in (0, 1], got {max_layer_ratio!r}")
    ratio, max_layer_ratio = float(ratio), float(max_layer_ratio)
    round_to = round_to if round_to == "auto" else int(round_to)
    min_channels = int(min_channels)
    leaf_modules = _leaf_modules(leaf_modules)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"slimcore.prune: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    inputs = _as_tuple(example_inputs)
    graph, classes, blocks = _analysis(model, inputs, criterion, ignore, leaf_modules, history, seed, compensate,
                                       collapse_blocks, keep_outputs)
    width_choices, widen = [], None
    if round_to == "auto":
        table = latency_table or _default_latency_table(model, inputs, device)

        def widen(removed, layers, allowed):
            width_choices.extend(choose_widths(classes, removed, layers, allowed, table))
    removed, threshold, collapsed = decide(classes, ratio, scope, round_to, min_channels, max_layer_ratio, blocks,
                                           widen)
    latency_check = None
    if round_to == "auto" and check_latency and not dry_run:
        same = dict(ratio=ratio, criterion=criterion, scope=scope, min_channels=min_channels, ignore=ignore,
                    compensate=compensate, max_layer_ratio=max_layer_ratio, collapse_blocks=collapse_blocks,
                    history=history, seed=seed, leaf_modules=leaf_modules, keep_outputs=keep_outputs)
        widened = any(c.chosen != c.asked for c in width_choices)
        latency_check = _whole_model_check(model, inputs, table, same, widened, deploy)
        if latency_check["chosen"] != "auto":
            removed, threshold, collapsed = decide(classes, ratio, scope, int(latency_check["chosen"]), min_channels,
                                                   max_layer_ratio, blocks, None)
    fixes = []
    if graph.checks:
        scores = atom_scores(graph, criterion, history=history, seed=seed)

        def redecide(classes, blocks=None):
            if classes is None:  # more channels frozen: classes and blocks again
                classes = _Classes(graph, scores)
                return classes, _collapsible_blocks(graph, classes, compensate) if collapse_blocks else []
            return decide(classes, ratio, scope, 1 if round_to == "auto" else round_to, min_channels,
                          max_layer_ratio, blocks, None)

        classes, blocks, (removed, threshold, collapsed), fixes = _fit_sizes(
            model, inputs, graph, classes, blocks, (removed, threshold, collapsed), redecide)
    kept_atom = ~removed[classes.of_atom]
    fixes += _chunk_attribute_fixes(model, inputs, graph, kept_atom, collapsed, fixes)
    plans = _plans(graph, kept_atom)
    in_collapsed = _in_collapsed(plans, collapsed)
    stream_of = {b.name: b.stream_atoms for b in graph.residual_blocks}

    channels, removed_idx = {}, {}
    for plan in plans:
        if plan.kind in ("prelu", "residual_constant", "channel_param"):
            continue
        # Modules of a collapsed block disappear: 0 channels left.
        channels[plan.name] = (plan.n_out, 0 if plan.name in in_collapsed else len(plan.out_keep))
        if len(plan.out_keep) < plan.n_out:
            gone = np.ones(plan.n_out, dtype=bool)
            gone[plan.out_keep] = False
            removed_idx[plan.name] = np.flatnonzero(gone).tolist()

    # Compensation: the constants the dropped inputs of each surviving consumer carry; and the
    # constant output of every collapsed block's branch.
    deltas, target, block_constants = {}, None, {}
    if (compensate and removed_idx) or collapsed:
        consumers = [(plan, _removed_inputs(plan)) for plan in plans
                     if plan.kind in ("conv", "grouped_conv", "linear") and len(plan.in_keep) < plan.n_in
                     and len(plan.out_keep) > 0 and plan.name not in in_collapsed] if compensate else []
        symbolic = None if check_compensation else _symbolic_constants(
            graph, kept_atom, consumers, collapsed, betas=compensate)
        if symbolic is not None:  # known from the parameters: no forward pass needed
            captured, block_constants = symbolic
        else:  # measured: one forward with the removed channels held at their constants
            target, captured, block_constants = _constant_run(model, inputs, removed_idx, consumers, collapsed,
                                                              betas=compensate)
        for plan, gone in consumers:
            constant, _ = captured.get(plan.name, (None, 0.0))
            if constant is not None and bool(constant.abs().gt(0).any()):
                deltas[plan.name] = _compensation_kernel(plan, gone, constant)

    params_before = count_params(model)
    flops_before = sum(graph.macs.values())
    flops_after = _flops_after(graph, plans, collapsed, in_collapsed)
    params_after = params_before
    for name in collapsed:  # the whole block goes; a constant buffer replaces it
        params_after -= sum(p.numel() for p in model.get_submodule(name).parameters())
    for plan in plans:
        if not _changes(plan) or plan.name in in_collapsed:
            continue
        add_bias = (plan.name in deltas and getattr(plan.module, "bias", None) is None
                    and (plan.kind == "linear" or not _needs_map(plan.module)))
        params_after += _new_counts(plan, add_bias)[0] - _own_params(plan)

    max_error = mean_error = None if target is None and deltas else 0.0
    if not dry_run:
        _warn_unpassed_optimizers(model, plans, optimizer)
        with torch.no_grad():
            for plan in plans:
                if plan.name in deltas:
                    _compensate(plan, deltas[plan.name])
            for plan in plans:
                if _changes(plan) and plan.name not in in_collapsed:
                    _apply(plan, optimizer)
            for name, attr, _, new in fixes:
                setattr(model.get_submodule(name), attr, new)
            fixes += _head_width_fixes(model, plans)
            for name in collapsed:
                keep = torch.as_tensor(np.flatnonzero(kept_atom[stream_of[name]]), dtype=torch.long)
                constant = block_constants[name][keep].to(next(model.get_submodule(name).parameters()).dtype)
                parent, attr = parent_module(model, name)
                setattr(parent, attr, ResidualConstant(constant))
            if target is not None and compensate:
                with eval_mode(model):
                    pairs = zip(flat_tensors(model(*inputs)), flat_tensors(target))
                    # outputs freed by keep_outputs may have lost channels: compare the others
                    diffs = [(a - b).abs().flatten() for a, b in pairs if a.shape == b.shape]
                diff = torch.cat(diffs) if diffs else torch.zeros(1)
                max_error, mean_error = float(diff.max()), float(diff.mean())
    share_removed = _removed_share(classes, removed)
    normalised = {mc.producer for mc in graph.modules.values() if mc.kind == "bn" and mc.producer}
    prunable = {mc.name: (int((~classes.frozen[classes.of_atom[mc.out_atoms]]).sum()), len(mc.out_atoms),
                          mc.name in normalised)
                for mc in graph.modules.values() if mc.kind in ("conv", "grouped_conv", "depthwise_conv", "linear")}
    notes = list(graph.notes) + [f"set {name or 'model'}.{attr} = {new} (was {old}): the code sizes a split/slice/view"
                                 " or a new head with it" for name, attr, old, new in fixes]
    unscored = int((~classes.frozen & ~np.isfinite(classes.score)).sum())
    if unscored:
        notes.append(f"{unscored} channel groups have no {criterion} score (e.g. no BatchNorm reads them) and stay")
    # Layers cut down to min_channels: the criterion would have emptied them (or nearly), and a
    # 1-channel bottleneck rarely trains again; say so, and what prevents it.
    starved = [plan.name for plan in plans if plan.kind in ("conv", "grouped_conv", "linear")
               and plan.name not in in_collapsed and min_channels == len(plan.out_keep) < plan.n_out]
    if starved and max_layer_ratio == 1.0:
        notes.append(f"{len(starved)} layers keep only min_channels={min_channels} ({', '.join(starved[:4])}"
                     f"{', ...' if len(starved) > 4 else ''}): the threshold would have emptied them; "
                     "max_layer_ratio (e.g. 0.9) keeps a share of every layer")
    return PruneReport(
        ratio=ratio, criterion=criterion, scope=scope, params_before=params_before, params_after=params_after,
        flops_before=flops_before, flops_after=flops_after, channels=channels, removed=removed_idx,
        threshold=threshold, notes=notes, seconds=time.perf_counter() - start, dry_run=dry_run,
        compensated={name: int(len(_removed_inputs(next(pl for pl in plans if pl.name == name))))
                     for name in deltas},
        compensation_max_error=max_error, compensation_mean_error=mean_error, collapsed=collapsed, starved=starved,
        widths=[c.as_dict() for c in width_choices], latency_check=latency_check,
        channels_removed_share=share_removed, prunable=prunable,
    )


# Model attributes that libraries read to build a new head (timm's reset_classifier).
_HEAD_WIDTH_ATTRS = ("num_features", "head_hidden_size")


def _head_width_fixes(model, plans):
    """Sets the model's own feature-width attributes (timm: num_features) to the pruned width of
    the classifier's input, when they held its old width. Returns the changes made."""
    changed = []
    for plan in plans:
        if plan.kind != "linear" or len(plan.in_keep) == plan.n_in:
            continue
        for attr in _HEAD_WIDTH_ATTRS:
            value = getattr(model, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == plan.n_in:
                setattr(model, attr, len(plan.in_keep))
                changed.append(("", attr, value, len(plan.in_keep)))
    return changed


def _symbolic_constants(graph, kept_atom, consumers, collapsed, betas):
    """What _constant_run measures, derived from the capture (graph.constants): ({consumer: (the
    constant of each dropped input, 0.0)}, {collapsed block: its branch's constant per channel});
    None when some needed constant is not known that way."""
    from .graph import constants

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


def _removed_share(classes, removed):
    """Share of the scored (candidate) channels that ``removed`` takes, each class weighted by the
    channels it holds: the pool a global ``ratio`` is a share of."""
    pool = classes.size[classes.candidate].sum()
    return float(classes.size[classes.candidate & removed].sum() / pool) if pool else 0.0


def _dry_measure(model, example_inputs, quantity, **prune_kwargs):
    """A function of the ratio: what ``prune(model, example_inputs, ratio, dry_run=True, **prune_kwargs)``
    would give, for quantity "flops_kept" (the share of FLOPs left) or "channels_removed" (its
    ``channels_removed_share``). One trace and one scoring serve every ratio (only the threshold
    moves); round_to="auto" times widths per ratio, so there each call is a dry run of prune()."""
    unpruned = prune(model, example_inputs, ratio=0.0, dry_run=True, **prune_kwargs)  # checks every option
    if prune_kwargs.get("round_to") == "auto":
        def measure(ratio):
            rep = prune(model, example_inputs, ratio=ratio, dry_run=True, **prune_kwargs)
            if quantity == "channels_removed":
                return rep.channels_removed_share
            return rep.flops_after / max(rep.flops_before, 1)
        return measure
    o = inspect.signature(prune).bind(model, example_inputs, **prune_kwargs)
    o.apply_defaults()
    o = o.arguments
    graph, classes, blocks = _analysis(model, _as_tuple(example_inputs), o["criterion"], o["ignore"],
                                       _leaf_modules(o["leaf_modules"]), o["history"], o["seed"], o["compensate"],
                                       o["collapse_blocks"], o["keep_outputs"])

    def measure(ratio):
        removed, _, collapsed = decide(classes, ratio, o["scope"], int(o["round_to"]), int(o["min_channels"]),
                                       float(o["max_layer_ratio"]), blocks)
        if quantity == "channels_removed":
            return _removed_share(classes, removed)
        plans = _plans(graph, ~removed[classes.of_atom])
        return _flops_after(graph, plans, collapsed, _in_collapsed(plans, collapsed)) / max(unpruned.flops_before, 1)
    return measure


def _check_search(fn, target, target_name, resolution, prune_kwargs):
    if not (_is_real(target) and 0.0 < target <= 1.0):
        raise ValueError(f"slimcore.{fn}: {target_name} must be in (0, 1], got {target!r}")
    if not (_is_real(resolution) and not _is_integer(resolution) and 0.0 < resolution < 0.1):
        raise ValueError(f"slimcore.{fn}: resolution must be a float in (0, 0.1), got {resolution!r}")
    for key in ("ratio", "dry_run", "optimizer"):
        if key in prune_kwargs:
            raise ValueError(f"slimcore.{fn}: {key!r} is not a prune option here (it finds the ratio)")


def _smallest_ratio(reached, resolution, grid=20):
    """The smallest ratio in [0, 1 - resolution] where ``reached(ratio)`` holds, to ``resolution``,
    by bisection; None when no ratio does. ``reached`` is False, then True, nearly everywhere, but
    rounding and selection fixes can make it dip back near 1: when the largest ratio fails, a
    coarse grid looks for an earlier one before giving up."""
    if reached(0.0):
        return 0.0
    lo, hi = 0.0, 1.0 - resolution
    if not reached(hi):
        points = np.linspace(0.0, hi, grid + 1)  # points[0] and points[-1] already failed
        first = next((i for i in range(1, grid) if reached(float(points[i]))), None)
        if first is None:
            return None
        lo, hi = float(points[first - 1]), float(points[first])
    while hi - lo > resolution:  # invariant: not reached(lo), reached(hi)
        mid = 0.5 * (lo + hi)
        if reached(mid):
            hi = mid
        else:
            lo = mid
    return hi


def ratio_for_flops(model, example_inputs, flops_fraction, resolution=1e-4, **prune_kwargs):
    """The smallest prune ratio at which ``prune(model, example_inputs, ratio, **prune_kwargs)``
    leaves at most ``flops_fraction`` of the model's FLOPs (multiply-accumulates, as in
    ``PruneReport``), found by bisection over dry runs; the model is not changed. For comparing
    criteria at one FLOPs budget (as filter-pruning papers compare them): each criterion removes different channels, so
    equal ratios give unequal FLOPs.

        r = slimcore.ratio_for_flops(model, x, 0.5, criterion="l1_filter")
        slimcore.prune(model, x, ratio=r, criterion="l1_filter")

    Raises ValueError when even the largest ratio (every layer at ``min_channels``, or whatever
    ``max_layer_ratio`` and ``ignore`` allow) keeps more than ``flops_fraction``.

    The dry runs leave prune()'s whole-model latency check off: with round_to="auto", prune with
    ``check_latency=False`` at the ratio found (the check may choose a uniform round_to that puts
    channels back).
    """
    _check_search("ratio_for_flops", flops_fraction, "flops_fraction", resolution, prune_kwargs)
    flops_fraction, resolution = float(flops_fraction), float(resolution)
    kept = _dry_measure(model, example_inputs, "flops_kept", **prune_kwargs)
    ratio = _smallest_ratio(lambda r: kept(r) <= flops_fraction, resolution)
    if ratio is None:
        raise ValueError(f"slimcore.ratio_for_flops: no ratio keeps {flops_fraction:g} of the FLOPs; at ratio "
                         f"{1 - resolution:g} {kept(1 - resolution):.4f} remain (min_channels, max_layer_ratio, "
                         "ignored and output layers set a floor)")
    return ratio


def ratio_for_channels(model, example_inputs, share, resolution=1e-4, **prune_kwargs):
    """The smallest prune ratio at which ``prune(model, example_inputs, ratio, **prune_kwargs)``
    removes at least ``share`` of the scored channels (``PruneReport.channels_removed_share``),
    found by bisection over dry runs; the model is not changed. Under a plain global threshold that
    is ``share`` itself (to one channel group); with ``max_layer_ratio``, ``min_channels`` or
    ``round_to`` putting channels back it is larger:

        r = slimcore.ratio_for_channels(model, x, 0.7, max_layer_ratio=0.9)   # e.g. 0.74
        slimcore.prune(model, x, ratio=r, max_layer_ratio=0.9)                 # >= 70% of the channels go

    Raises ValueError when even the largest ratio removes less than ``share`` (a cap of
    ``max_layer_ratio`` < ``share`` on every layer, for instance). As in ratio_for_flops, with
    round_to="auto" prune with ``check_latency=False`` at the ratio found.
    """
    _check_search("ratio_for_channels", share, "share", resolution, prune_kwargs)
    share, resolution = float(share), float(resolution)
    removed = _dry_measure(model, example_inputs, "channels_removed", **prune_kwargs)
    ratio = _smallest_ratio(lambda r: removed(r) >= share, resolution)
    if ratio is None:
        raise ValueError(f"slimcore.ratio_for_channels: no ratio removes {share:g} of the channels; at ratio "
                         f"{1 - resolution:g} {removed(1 - resolution):.4f} go (min_channels, max_layer_ratio, "
                         "ignored and output layers keep the rest)")
    return ratio


def ratio_for_latency(model, example_inputs, latency_fraction, resolution=0.01, latency_table=None, deploy=None,
                      **prune_kwargs):
    """The smallest prune ratio at which the pruned model's *measured* latency is at most
    ``latency_fraction`` of the dense model's, found by bisection over pruned copies (the model is
    not changed). Each candidate is timed against the dense model in one interleaved run
    (``LatencyTable.time_models``: the table's device, dtype, batch and memory format; default:
    the model's device and dtype, the example inputs' batch), both in the form ``deploy`` makes
    of them (a function taking a model in eval mode and returning the model to time, e.g. one
    that folds BatchNorms), so the ratio answers "how much must go to run this fast here":

        r = slimcore.ratio_for_latency(model, x, 0.5, latency_table=slimcore.LatencyTable("cpu", batch=64))
        slimcore.prune(model, x, ratio=r)

    Latency falls in steps and timings are noisy, so ``resolution`` is coarser than the FLOPs
    search's. Raises ValueError when even the largest ratio is slower than ``latency_fraction``
    (a model bound by what pruning does not shrink: its input, stem or head)."""
    _check_search("ratio_for_latency", latency_fraction, "latency_fraction", resolution, prune_kwargs)
    if "check_latency" in prune_kwargs:
        raise ValueError("slimcore.ratio_for_latency: 'check_latency' is not an option here (the copies are timed "
                         "as pruned)")
    fraction, resolution = float(latency_fraction), float(resolution)
    inputs = _as_tuple(example_inputs)
    table = latency_table if latency_table is not None else _default_latency_table(model, inputs,
                                                                                   prune_kwargs.get("device"))
    if prune_kwargs.get("round_to") == "auto" and isinstance(table, LatencyTable):
        prune_kwargs = prune_kwargs | {"latency_table": table}  # the widths timed where the model is
    prune(model, inputs, ratio=0.0, dry_run=True, **prune_kwargs)  # checks every option before any timing
    dense = _deployed(copy.deepcopy(model).eval(), deploy, "ratio_for_latency")
    measured = {}

    def relative(ratio):
        if ratio not in measured:
            variant = _pruned_copy(model, inputs, prune_kwargs, ratio=ratio, check_latency=False)
            variant = _deployed(variant.eval(), deploy, "ratio_for_latency")
            dense_s, pruned_s = table.time_models([dense, variant], inputs)
            measured[ratio] = pruned_s / dense_s
        return measured[ratio]

    ratio = _smallest_ratio(lambda r: relative(r) <= fraction, resolution)
    if ratio is None:
        raise ValueError(f"slimcore.ratio_for_latency: no ratio runs in {fraction:g} of the dense latency; at ratio "
                         f"{1 - resolution:g} it takes {relative(1 - resolution):.3f} (min_channels, max_layer_ratio, "
                         "ignored and output layers, and the layers pruning does not shrink, set a floor)")
    return ratio


def _pruned_copy(model, inputs, options, **overrides):
    """A deep copy of ``model`` pruned with prune(**options, **overrides); modules named by object
    in ``ignore`` and ``leaf_modules`` become their copies."""
    memo = {}
    variant = copy.deepcopy(model, memo)
    mapped = {k: [memo.get(id(m), m) if isinstance(m, nn.Module) else m for m in _listed(options[k])]
              for k in ("ignore", "leaf_modules") if k in options}
    prune(variant, inputs, **(options | mapped | overrides))
    return variant


def _listed(value):
    """ignore/leaf_modules as a list: a single name or module is one entry."""
    return [value] if isinstance(value, (str, nn.Module, type)) else list(value)


def _deployed(model, deploy, fn):
    if deploy is None:
        return model
    with torch.no_grad():
        out = deploy(model)
    if not isinstance(out, nn.Module):
        raise TypeError(f"slimcore.{fn}: deploy must return the model to time, got {type(out).__name__}")
    return out


def _whole_model_check(model, inputs, table, same, widened, deploy=None):
    """Times copies of ``model`` pruned at the per-layer widths (the choices ``table`` already
    holds, so no layer is timed again; only when some layer was widened) and at uniform round_to
    values (slimcore.widths.MODEL_ROUND_TO); the fastest, where it beats round_to=1 by MODEL_MARGIN."""
    from .widths import MODEL_MARGIN, MODEL_ROUND_TO

    names = (["auto"] if widened else []) + [str(r) for r in MODEL_ROUND_TO]
    variants = []
    for name in names:
        round_to = name if name == "auto" else int(name)
        variant = _pruned_copy(model, inputs, same, round_to=round_to, latency_table=table, check_latency=False)
        variants.append(_deployed(variant.eval(), deploy, "prune"))
    ms = {name: s * 1e3 for name, s in zip(names, table.time_models(variants, inputs))}
    best = min(ms, key=ms.get)
    chosen = best if ms[best] < (1 - MODEL_MARGIN) * ms["1"] else "1"
    return {"ms": ms, "chosen": chosen}


def _default_latency_table(model, inputs, device):
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = device if device is not None else (param.device if param is not None else "cpu")
    batch = inputs[0].shape[0] if inputs and torch.is_tensor(inputs[0]) and inputs[0].dim() > 0 else 1
    return LatencyTable(device, dtype=dtype, batch=batch)


# ---------------------------------------------------------------------------------------- save / load

_SHAPED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.PReLU)
_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features", "num_parameters")


def channel_config(model):
    """{module name: its channel attributes} for every conv, linear, BN and PReLU."""
    config = {}
    for name, m in model.named_modules():
        if isinstance(m, ResidualConstant):
            config[name] = {"residual_constant": len(m.constant)}
        elif isinstance(m, _SHAPED):
            entry = {a: int(getattr(m, a)) for a in _ATTRS if hasattr(m, a)}
            entry["selected"] = "selected_index" in m._buffers
            entry["compensated"] = "compensation" in m._buffers
            entry["bias"] = isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and m.bias is not None
            config[name] = entry
    return config


def save_pruned(model, path, meta=None):
    """Writes the model's state_dict and channel configuration to ``path`` (atomically), to be
    rebuilt with :func:`load_pruned` from the dense architecture. ``meta`` (JSON-like) is stored
    with it; ``{"model": name, "model_kwargs": {...}}`` lets load_pruned rebuild a slimcore.models
    architecture without a build_fn."""
    from ._io import atomic_save

    atomic_save({"format": "slimcore.pruned/1", "config": channel_config(model), "state_dict": model.state_dict(),
                 "meta": meta or {}}, path)


def _check_pruned_config(path, model, config, state):
    """Checks every saved channel entry against the module build_fn() made, before anything is
    resized: resizing parameters to the saved shapes would defeat load_state_dict's own shape
    check (a 5x5 conv would silently take 3x3 weights)."""
    from ._io import CheckpointError

    if not isinstance(config, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path}: the channel config and state_dict must be dicts (a damaged checkpoint)")
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    for name, entry in config.items():
        def fail(msg, name=name):
            raise CheckpointError(f"{path}: module '{name}': {msg}; the checkpoint does not fit the model "
                                  "build_fn() returned (another architecture or width?)")

        if not isinstance(name, str) or not isinstance(entry, dict):
            fail(f"malformed config entry {entry!r}")
        prefix = f"{name}." if name else ""

        def shape_of(key):
            t = state.get(prefix + key)
            if not isinstance(t, torch.Tensor):
                fail(f"the state_dict has no tensor '{prefix + key}'")
            return tuple(t.shape)

        counts = {a: entry[a] for a in (*_ATTRS, "residual_constant") if a in entry}
        for a, v in counts.items():
            if not (_is_integer(v) and v >= 1):
                fail(f"{a} must be a positive integer, got {v!r}")
        try:
            m = model.get_submodule(name)
        except AttributeError:
            fail("does not exist in the model")
        if "residual_constant" in entry:
            if shape_of("constant") != (entry["residual_constant"],):
                fail(f"constant has shape {shape_of('constant')}, not ({entry['residual_constant']},)")
            continue
        if not isinstance(m, _SHAPED):
            fail(f"is a {type(m).__name__}, not a conv, linear, BatchNorm or PReLU")
        expected = {a for a in _ATTRS if hasattr(m, a)}
        if set(counts) != expected:
            fail(f"saved as a layer with {sorted(counts)} but the model's {type(m).__name__} has {sorted(expected)}")
        for a in ("in_channels", "out_channels", "in_features", "out_features"):
            if a in counts and counts[a] > getattr(m, a):
                fail(f"{a}={counts[a]} is more than the unpruned model's {getattr(m, a)}")
        if isinstance(m, convs):
            cin, cout, groups = counts["in_channels"], counts["out_channels"], counts["groups"]
            depthwise = m.groups == m.in_channels and m.groups > 1
            if depthwise and (groups != cin or cout * m.in_channels != cin * m.out_channels):
                fail(f"a depthwise conv must keep groups = in_channels and out/in = {m.out_channels}/{m.in_channels}, "
                     f"got in_channels={cin}, out_channels={cout}, groups={groups}")
            if not depthwise and groups != m.groups:
                fail(f"groups={groups} but the model's conv has groups={m.groups}")
            if cin % groups or cout % groups:
                fail(f"in_channels={cin} and out_channels={cout} must be multiples of groups={groups}")
            want = (cout, cin // groups, *m.kernel_size)
            if shape_of("weight") != want:
                fail(f"weight has shape {shape_of('weight')}; in_channels={cin}, out_channels={cout}, groups={groups} "
                     f"and the model's kernel_size={tuple(m.kernel_size)} need {want}")
            if entry.get("bias") and shape_of("bias") != (cout,):
                fail(f"bias has shape {shape_of('bias')}, not ({cout},)")
            if entry.get("compensated") and shape_of("compensation") != (cout, 1, *m.kernel_size):
                fail(f"compensation has shape {shape_of('compensation')}, not {(cout, 1, *m.kernel_size)}")
        elif isinstance(m, nn.Linear):
            want = (counts["out_features"], counts["in_features"])
            if shape_of("weight") != want:
                fail(f"weight has shape {shape_of('weight')}, not {want} (out_features, in_features)")
            if entry.get("bias") and shape_of("bias") != (want[0],):
                fail(f"bias has shape {shape_of('bias')}, not ({want[0]},)")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = counts["num_features"]
            if n > m.num_features:
                fail(f"num_features={n} is more than the unpruned model's {m.num_features}")
            for key in ("weight", "bias", "running_mean", "running_var"):
                if prefix + key in state and shape_of(key) != (n,):
                    fail(f"{key} has shape {shape_of(key)}, not ({n},)")
            if entry.get("selected"):
                index = state.get(prefix + "selected_index")
                if not (isinstance(index, torch.Tensor) and index.dtype == torch.long and tuple(index.shape) == (n,)
                        and (n == 0 or int(index.min()) >= 0)):
                    fail(f"selected_index must be {n} non-negative int64 channel indices")
        elif isinstance(m, nn.PReLU):
            if counts["num_parameters"] != 1 and counts["num_parameters"] > m.num_parameters:
                fail(f"num_parameters={counts['num_parameters']} is more than the model's {m.num_parameters}")
            if shape_of("weight") != (counts["num_parameters"],):
                fail(f"weight has shape {shape_of('weight')}, not ({counts['num_parameters']},)")


def load_pruned(path, build_fn=None, map_location="cpu"):
    """Rebuilds a pruned model: ``build_fn()`` makes the dense architecture (default: the
    slimcore.models architecture named in the file's metadata), which is reshaped to the saved
    channel configuration and loaded (``weights_only=True``, strict).

    The saved configuration is checked against the built model first (module types, kernel
    sizes, groups, widths no larger than the dense model's, positive counts, parameter shapes);
    a file that does not fit, or that torch cannot read, raises :class:`slimcore.CheckpointError`."""
    from ._io import CheckpointError, safe_load

    ckpt = safe_load(path, map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "slimcore.pruned/1":
        raise CheckpointError(f"{path} is not a slimcore pruned checkpoint (written by slimcore.save_pruned)")
    if build_fn is None:
        meta = ckpt.get("meta") or {}
        if "model" not in meta:
            raise ValueError(f"{path} names no slimcore.models architecture in its metadata: pass build_fn")
        from . import models

        def build_fn():
            return models.build(meta["model"], **meta.get("model_kwargs", {}))

    model = build_fn()
    state = ckpt.get("state_dict")
    _check_pruned_config(path, model, ckpt.get("config"), state)
    for name, entry in ckpt["config"].items():  # collapsed residual blocks first: they remove submodules
        if "residual_constant" in entry:
            parent, attr = parent_module(model, name)
            setattr(parent, attr, ResidualConstant(torch.zeros(entry["residual_constant"])))
    for name, entry in ckpt["config"].items():
        if "residual_constant" in entry:
            continue
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: module '{name}' does not exist in the model build_fn() returned") from None
        prefix = f"{name}." if name else ""
        if entry.get("selected"):
            set_input_selection(m, state[f"{prefix}selected_index"])
        if entry.get("compensated"):
            set_compensation(m, torch.zeros_like(state[f"{prefix}compensation"]))
        if entry.get("bias") and m.bias is None:  # compensation added a bias
            m.bias = nn.Parameter(torch.zeros_like(state[f"{prefix}bias"]))
        for a in _ATTRS:
            if a in entry:
                setattr(m, a, entry[a])
        with torch.no_grad():
            for pname, p in list(m.named_parameters(recurse=False)):
                p.data = torch.empty_like(p, memory_format=torch.contiguous_format).resize_(state[prefix + pname].shape)
            for bname, b in list(m.named_buffers(recurse=False)):
                if b is not None and prefix + bname in state:
                    m._buffers[bname] = torch.empty(state[prefix + bname].shape, dtype=b.dtype, device=b.device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the model build_fn() returned: {exc}") from None
    return model
