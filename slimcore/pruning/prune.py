"""``slimcore.prune``: the phases of a prune, in order.

How a prune works: graph.py finds the classes of channels that must go together; criteria.py
scores them; decide.py picks which classes go (a global threshold or per layer, then
``min_channels`` and ``round_to`` per layer); sizes.py keeps the sizes the model's code computes
right; apply.py rebuilds every affected module in place with the ``channel_gather_`` kernel
(weights, biases, BN parameters and buffers, gradients and the optimizer's state are compacted in
their own storage, and Parameter objects keep their identity), after compensate.py has folded the
removed channels' constants into their consumers.

The contract, checked by the tests: the pruned model computes exactly what the dense model
computes when the channels listed in ``PruneReport.removed`` are zeroed at the outputs of the
listed modules.
"""

import copy
import functools
import gc
import time

import numpy as np
import torch
from torch import nn

from .._modules import eval_mode, parent_module
from .apply import (count_flops_after, in_collapsed_blocks, module_plans, new_param_counts, own_param_count,
                    plan_changes, warn_unpassed_optimizers, apply_plan)
from .capture import flat_tensors
from .compensate import (add_compensation, compensation_kernel, constant_run, needs_map, removed_inputs,
                         symbolic_constants)
from .criteria import atom_scores
from .decide import ChannelClasses, collapsible_blocks, decide, removed_share
from .graph import analyze
from .modules import ResidualConstant
from .options import PruneOptions
from .profile import as_input_tuple, count_params
from .report import PruneReport
from .sizes import chunk_attribute_fixes, fit_sizes, head_width_fixes
from .widths import MODEL_MARGIN, MODEL_ROUND_TO, LatencyTable, choose_widths


# ---------------------------------------------------------------------------------------- analysis


def _module_names(model, items):
    items = _listed(items)
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


def channel_analysis(model, inputs, o):
    """What a prune with options ``o`` knows before it picks a ratio: the traced graph, the scored
    channel classes and the residual blocks that may collapse."""
    graph = analyze(model, inputs, ignore=_module_names(model, o.ignore), leaf_modules=o.leaf_modules,
                    keep_outputs=_keep_outputs(o.keep_outputs))
    scores = atom_scores(graph, o.criterion, history=o.history, seed=o.seed)
    classes = ChannelClasses(graph, scores)
    blocks = collapsible_blocks(graph, classes, o.compensate) if o.collapse_blocks else []
    return graph, classes, blocks


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


def prune(model, example_inputs, ratio=0.5, criterion="bn_scale", scope="global", round_to=1, min_channels=1,
          ignore=(), optimizer=None, *, compensate=True, max_layer_ratio=1.0, collapse_blocks=True, dry_run=False,
          history=None, seed=0, leaf_modules=(), device=None, latency_table=None, check_latency=True,
          deploy=None, check_compensation=False, keep_outputs=True, select=None):
    """Removes channels from ``model`` in place and returns a :class:`PruneReport`.

    Args:
        model: any model that runs on ``example_inputs`` (it is captured once at the ATen level;
            see slimcore/pruning/graph.py for the channel rules).
        example_inputs: a tensor or a tuple of positional inputs, used once for shapes.
        ratio: share of prunable channels to remove, in [0, 1). Each produced (conv/linear
            output) or selected (selection BN output) channel counts once; coupled channels go
            together, scored by the max of their members' scores (slimcore.pruning.criteria).
        criterion: "bn_scale" (network slimming), "l1_filter", "cfp", "hbfp" (needs ``history``),
            "random"; see slimcore.pruning.criteria.
        scope: "global" (one threshold over all prunable channels: for bn_scale on conv-BN
            chains, the paper's percentile of |gamma|) or "layer" (each layer loses ``ratio``
            of its channels).
        round_to: keep channel counts multiples of this (by keeping more, never fewer); or
            "auto": per layer, keep more channels only where a measured width is faster
            (slimcore.pruning.widths: timed on ``device``, cached; the choices are in ``report.widths``).
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
        latency_table: a ``slimcore.pruning.widths.LatencyTable`` for round_to="auto" (its own device,
            dtype, batch, memory format and cache); overrides ``device``.
        check_latency: round_to="auto" only: time whole copies of the model pruned at the
            per-layer widths and at uniform ``round_to`` 1, 8 and 16 (interleaved) and use the
            fastest; anything but round_to=1 must beat it by ``slimcore.pruning.widths.MODEL_MARGIN``.
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
        select: the hook slimcore.prune_for_latency uses: a function choosing the removed channel
            classes instead of ``ratio``'s threshold (see ``slimcore.pruning.decide.decide``);
            ``ratio`` and ``scope`` are then unused. Not with round_to="auto".
    """
    options = PruneOptions(ratio=ratio, criterion=criterion, scope=scope, round_to=round_to,
                           min_channels=min_channels, ignore=ignore, compensate=compensate,
                           max_layer_ratio=max_layer_ratio, collapse_blocks=collapse_blocks, history=history, seed=seed,
                           leaf_modules=leaf_modules, device=device, latency_table=latency_table,
                           check_latency=check_latency, deploy=deploy, check_compensation=check_compensation,
                           keep_outputs=keep_outputs, select=select)
    return prune_with_options(model, example_inputs, options, optimizer, dry_run)


@_without_cyclic_gc
def prune_with_options(model, example_inputs, o, optimizer=None, dry_run=False):
    """:func:`prune` with its options as one :class:`PruneOptions` ``o``. The phases, in order:
    capture and score, decide, fit the sizes the model's code computes, plan, compensate, apply,
    report."""
    start = time.perf_counter()
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"slimcore.prune: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    inputs = as_input_tuple(example_inputs)
    graph, classes, blocks = channel_analysis(model, inputs, o)
    decision, width_choices, latency_check = _decide(model, inputs, classes, blocks, o, dry_run)
    classes, blocks, decision, fixes = _fit_sizes(model, inputs, graph, classes, blocks, decision, o)
    removed, threshold, collapsed = decision
    kept_atom = ~removed[classes.of_atom]
    fixes += chunk_attribute_fixes(model, inputs, graph, kept_atom, collapsed, fixes)
    plans = module_plans(graph, kept_atom)
    in_collapsed = in_collapsed_blocks(plans, collapsed)
    channels, removed_idx = _channels_left(plans, in_collapsed)
    deltas, target, block_constants = _compensation(model, inputs, graph, plans, kept_atom, removed_idx, collapsed,
                                                    in_collapsed, o)
    params_before, params_after = _param_counts(model, plans, collapsed, in_collapsed, deltas)
    max_error = mean_error = None if target is None and deltas else 0.0
    if not dry_run:
        fixes += _apply_plans(model, graph, plans, in_collapsed, kept_atom, collapsed, deltas, block_constants, fixes,
                              optimizer)
        if target is not None and o.compensate:
            max_error, mean_error = _deviation(model, inputs, target)
    starved = [plan.name for plan in plans if plan.kind in ("conv", "grouped_conv", "linear")
               and plan.name not in in_collapsed and o.min_channels == len(plan.out_keep) < plan.n_out]
    return PruneReport(
        ratio=o.ratio, criterion=o.criterion, scope=o.scope, params_before=params_before, params_after=params_after,
        flops_before=sum(graph.macs.values()), flops_after=count_flops_after(graph, plans, collapsed, in_collapsed),
        channels=channels, removed=removed_idx, threshold=threshold,
        notes=_notes(graph, classes, fixes, starved, o), seconds=time.perf_counter() - start, dry_run=dry_run,
        compensated={plan.name: len(removed_inputs(plan)) for plan in plans if plan.name in deltas},
        compensation_max_error=max_error, compensation_mean_error=mean_error, collapsed=collapsed, starved=starved,
        widths=[c.as_dict() for c in width_choices], latency_check=latency_check,
        channels_removed_share=removed_share(classes, removed), prunable=_prunable(graph, classes),
        selection="threshold" if o.select is None else "latency",
    )


def _decide(model, inputs, classes, blocks, o, dry_run):
    """(removed, threshold, collapsed), the width choices of round_to="auto" and its whole-model
    latency check."""
    width_choices = []
    if o.round_to == "auto":
        table = o.latency_table or default_latency_table(model, inputs, o.device)

        def widen(removed, layers, allowed):
            width_choices.extend(choose_widths(classes, removed, layers, allowed, table))
    else:
        widen = None
    decision = decide(classes, o.ratio, o.scope, o.round_to, o.min_channels, o.max_layer_ratio, blocks, widen,
                      o.select)
    latency_check = None
    if o.round_to == "auto" and o.check_latency and not dry_run:
        widened = any(c.chosen != c.asked for c in width_choices)
        latency_check = _whole_model_check(model, inputs, table, o, widened)
        if latency_check["chosen"] != "auto":
            decision = decide(classes, o.ratio, o.scope, int(latency_check["chosen"]), o.min_channels,
                              o.max_layer_ratio, blocks, None)
    return decision, width_choices, latency_check


def _fit_sizes(model, inputs, graph, classes, blocks, decision, o):
    """Where the model's code sizes a split or view with a number: the attribute fixes, or more
    channels tied together and the decision taken again (slimcore/pruning/sizes.py)."""
    if not graph.checks:
        return classes, blocks, decision, []
    scores = atom_scores(graph, o.criterion, history=o.history, seed=o.seed)

    def redecide(classes, blocks=None):
        if classes is None:  # more channels frozen: classes and blocks again
            classes = ChannelClasses(graph, scores)
            return classes, collapsible_blocks(graph, classes, o.compensate) if o.collapse_blocks else []
        return decide(classes, o.ratio, o.scope, 1 if o.round_to == "auto" else o.round_to, o.min_channels,
                      o.max_layer_ratio, blocks, None, o.select)

    return fit_sizes(model, inputs, graph, classes, blocks, decision, redecide)


def _channels_left(plans, in_collapsed):
    """{module: (channels before, after)} and {module: removed output channels}."""
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
    return channels, removed_idx


def _compensation(model, inputs, graph, plans, kept_atom, removed_idx, collapsed, in_collapsed, o):
    """The constants the dropped inputs of each surviving consumer carry, as kernels to fold into it
    ({module: kernel}); the dense model's outputs when they were measured (else None); the constant
    output of every collapsed block's branch."""
    deltas, target, block_constants = {}, None, {}
    if not ((o.compensate and removed_idx) or collapsed):
        return deltas, target, block_constants
    consumers = [(plan, removed_inputs(plan)) for plan in plans
                 if plan.kind in ("conv", "grouped_conv", "linear") and len(plan.in_keep) < plan.n_in
                 and len(plan.out_keep) > 0 and plan.name not in in_collapsed] if o.compensate else []
    symbolic = None if o.check_compensation else symbolic_constants(
        graph, kept_atom, consumers, collapsed, betas=o.compensate)
    if symbolic is not None:  # known from the parameters: no forward pass needed
        captured, block_constants = symbolic
    else:  # measured: one forward with the removed channels held at their constants
        target, captured, block_constants = constant_run(model, inputs, removed_idx, consumers, collapsed,
                                                         betas=o.compensate)
    for plan, gone in consumers:
        constant, _ = captured.get(plan.name, (None, 0.0))
        if constant is not None and bool(constant.abs().gt(0).any()):
            deltas[plan.name] = compensation_kernel(plan, gone, constant)
    return deltas, target, block_constants


def _param_counts(model, plans, collapsed, in_collapsed, deltas):
    """Parameters before and after, from the plans (also for a dry run)."""
    params_before = count_params(model)
    params_after = params_before
    for name in collapsed:  # the whole block goes; a constant buffer replaces it
        params_after -= sum(p.numel() for p in model.get_submodule(name).parameters())
    for plan in plans:
        if not plan_changes(plan) or plan.name in in_collapsed:
            continue
        add_bias = (plan.name in deltas and getattr(plan.module, "bias", None) is None
                    and (plan.kind == "linear" or not needs_map(plan.module)))
        params_after += new_param_counts(plan, add_bias)[0] - own_param_count(plan)
    return params_before, params_after


def _apply_plans(model, graph, plans, in_collapsed, kept_atom, collapsed, deltas, block_constants, fixes, optimizer):
    """Rebuilds the model in place: compensation first (it reads the dense weights), then every
    plan, the attribute fixes, and a ResidualConstant for each collapsed block. Returns the head
    width fixes made."""
    warn_unpassed_optimizers(model, plans, optimizer)
    stream_of = {b.name: b.stream_atoms for b in graph.residual_blocks}
    with torch.no_grad():
        for plan in plans:
            if plan.name in deltas:
                add_compensation(plan, deltas[plan.name])
        for plan in plans:
            if plan_changes(plan) and plan.name not in in_collapsed:
                apply_plan(plan, optimizer)
        for name, attr, _, new in fixes:
            setattr(model.get_submodule(name), attr, new)
        head_fixes = head_width_fixes(model, plans)
        for name in collapsed:
            keep = torch.as_tensor(np.flatnonzero(kept_atom[stream_of[name]]), dtype=torch.long)
            constant = block_constants[name][keep].to(next(model.get_submodule(name).parameters()).dtype)
            parent, attr = parent_module(model, name)
            setattr(parent, attr, ResidualConstant(constant))
    return head_fixes


def _deviation(model, inputs, target):
    """(max, mean) |pruned - dense| over the outputs that kept their shape."""
    with torch.no_grad(), eval_mode(model):
        pairs = zip(flat_tensors(model(*inputs)), flat_tensors(target))
        # outputs freed by keep_outputs may have lost channels: compare the others
        diffs = [(a - b).abs().flatten() for a, b in pairs if a.shape == b.shape]
    diff = torch.cat(diffs) if diffs else torch.zeros(1)
    return float(diff.max()), float(diff.mean())


def _prunable(graph, classes):
    """{conv/linear: (prunable output channels, all output channels, followed by a BN)}."""
    normalised = {mc.producer for mc in graph.modules.values() if mc.kind == "bn" and mc.producer}
    return {mc.name: (int((~classes.frozen[classes.of_atom[mc.out_atoms]]).sum()), len(mc.out_atoms),
                      mc.name in normalised)
            for mc in graph.modules.values() if mc.kind in ("conv", "grouped_conv", "depthwise_conv", "linear")}


def _notes(graph, classes, fixes, starved, o):
    notes = list(graph.notes) + [f"set {name or 'model'}.{attr} = {new} (was {old}): the code sizes a split/slice/view"
                                 " or a new head with it" for name, attr, old, new in fixes]
    unscored = int((~classes.frozen & ~np.isfinite(classes.score)).sum())
    if unscored:
        notes.append(f"{unscored} channel groups have no {o.criterion} score (e.g. no BatchNorm reads them) and stay")
    # Layers cut down to min_channels: the criterion would have emptied them (or nearly), and a
    # 1-channel bottleneck rarely trains again; say so, and what prevents it.
    if starved and o.max_layer_ratio == 1.0:
        notes.append(f"{len(starved)} layers keep only min_channels={o.min_channels} ({', '.join(starved[:4])}"
                     f"{', ...' if len(starved) > 4 else ''}): the threshold would have emptied them; "
                     "max_layer_ratio (e.g. 0.9) keeps a share of every layer")
    return notes


def pruned_copy(model, inputs, options, **overrides):
    """A deep copy of ``model`` pruned with ``options`` changed by ``overrides``; modules named by
    object in ``ignore`` and ``leaf_modules`` become their copies."""
    memo = {}
    variant = copy.deepcopy(model, memo)
    mapped = {k: [memo.get(id(m), m) if isinstance(m, nn.Module) else m for m in _listed(getattr(options, k))]
              for k in ("ignore", "leaf_modules")}
    prune_with_options(variant, inputs, options.replace(**mapped, **overrides))
    return variant


def _listed(value):
    """ignore/leaf_modules as a list: a single name, module or class is one entry (not a string's
    characters)."""
    return [value] if isinstance(value, (str, nn.Module, type)) else list(value)


def deployed_with(model, deploy, fn):
    if deploy is None:
        return model
    with torch.no_grad():
        out = deploy(model)
    if not isinstance(out, nn.Module):
        raise TypeError(f"slimcore.{fn}: deploy must return the model to time, got {type(out).__name__}")
    return out


def _whole_model_check(model, inputs, table, options, widened):
    """Times copies of ``model`` pruned at the per-layer widths (the choices ``table`` already
    holds, so no layer is timed again; only when some layer was widened) and at uniform round_to
    values (slimcore.pruning.widths.MODEL_ROUND_TO); the fastest, where it beats round_to=1 by MODEL_MARGIN."""

    names = (["auto"] if widened else []) + [str(r) for r in MODEL_ROUND_TO]
    variants = []
    for name in names:
        round_to = name if name == "auto" else int(name)
        variant = pruned_copy(model, inputs, options, round_to=round_to, latency_table=table, check_latency=False)
        variants.append(deployed_with(variant.eval(), options.deploy, "prune"))
    ms = {name: s * 1e3 for name, s in zip(names, table.time_models(variants, inputs))}
    best = min(ms, key=ms.get)
    chosen = best if ms[best] < (1 - MODEL_MARGIN) * ms["1"] else "1"
    return {"ms": ms, "chosen": chosen}


def default_latency_table(model, inputs, device):
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = device if device is not None else (param.device if param is not None else "cpu")
    batch = inputs[0].shape[0] if inputs and torch.is_tensor(inputs[0]) and inputs[0].dim() > 0 else 1
    return LatencyTable(device, dtype=dtype, batch=batch)


# ---------------------------------------------------------------------------------------- save / load


