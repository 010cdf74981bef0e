"""Searches over the prune ratio: ``ratio_for_flops``, ``ratio_for_channels``, ``ratio_for_latency``.
"""

import copy

import numpy as np

from .apply import count_flops_after, in_collapsed_blocks, module_plans
from .decide import decide, removed_share
from .options import PruneOptions, is_integer, is_real
from .profile import as_input_tuple
from .prune import channel_analysis, default_latency_table, deployed_with, prune_with_options, pruned_copy
from .widths import LatencyTable


def dry_measure(model, example_inputs, quantity, options):
    """A function of the ratio: what a dry run of prune with ``options`` at that ratio would give,
    for quantity "flops_kept" (the share of FLOPs left) or "channels_removed" (its
    ``channels_removed_share``). One capture and one scoring serve every ratio (only the threshold
    moves); round_to="auto" times widths per ratio, so there each call is a dry run of prune()."""
    inputs = as_input_tuple(example_inputs)
    if options.round_to == "auto":
        prune_with_options(model, inputs, options.replace(ratio=0.0), dry_run=True)  # checks every option

        def measure(ratio):
            rep = prune_with_options(model, inputs, options.replace(ratio=ratio), dry_run=True)
            if quantity == "channels_removed":
                return rep.channels_removed_share
            return rep.flops_after / max(rep.flops_before, 1)
        return measure
    graph, classes, blocks = channel_analysis(model, inputs, options)
    flops_before = max(sum(graph.macs.values()), 1)

    def measure(ratio):
        removed, _, collapsed = decide(classes, ratio, options.scope, options.round_to, options.min_channels,
                                       options.max_layer_ratio, blocks)
        if quantity == "channels_removed":
            return removed_share(classes, removed)
        plans = module_plans(graph, ~removed[classes.of_atom])
        return count_flops_after(graph, plans, collapsed, in_collapsed_blocks(plans, collapsed)) / flops_before
    return measure


def check_search(fn, target, target_name, resolution, prune_kwargs):
    if not (is_real(target) and 0.0 < target <= 1.0):
        raise ValueError(f"slimcore.{fn}: {target_name} must be in (0, 1], got {target!r}")
    if not (is_real(resolution) and not is_integer(resolution) and 0.0 < resolution < 0.1):
        raise ValueError(f"slimcore.{fn}: resolution must be a float in (0, 0.1), got {resolution!r}")
    for key in ("ratio", "dry_run", "optimizer"):
        if key in prune_kwargs:
            raise ValueError(f"slimcore.{fn}: {key!r} is not a prune option here (it finds the ratio)")
    return PruneOptions.from_kwargs(fn, **prune_kwargs)


def smallest_ratio(reached, resolution, grid=20):
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


def measured_fraction(model, inputs, table, deploy, fn, variant_at):
    """A function of a search parameter ``p``: the measured latency of the pruned copy
    ``variant_at(p)`` as a fraction of the dense model's, both in the form ``deploy`` makes of them
    and timed together in one interleaved run of ``table``; each ``p`` is timed once."""
    dense = deployed_with(copy.deepcopy(model).eval(), deploy, fn)
    measured = {}

    def relative(p):
        if p not in measured:
            variant = deployed_with(variant_at(p).eval(), deploy, fn)
            dense_s, pruned_s = table.time_models([dense, variant], inputs)
            measured[p] = pruned_s / dense_s
        return measured[p]
    return relative


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
    options = check_search("ratio_for_flops", flops_fraction, "flops_fraction", resolution, prune_kwargs)
    flops_fraction, resolution = float(flops_fraction), float(resolution)
    kept = dry_measure(model, example_inputs, "flops_kept", options)
    ratio = smallest_ratio(lambda r: kept(r) <= flops_fraction, resolution)
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
    options = check_search("ratio_for_channels", share, "share", resolution, prune_kwargs)
    share, resolution = float(share), float(resolution)
    removed = dry_measure(model, example_inputs, "channels_removed", options)
    ratio = smallest_ratio(lambda r: removed(r) >= share, resolution)
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
    if "check_latency" in prune_kwargs:
        raise ValueError("slimcore.ratio_for_latency: 'check_latency' is not an option here (the copies are timed "
                         "as pruned)")
    options = check_search("ratio_for_latency", latency_fraction, "latency_fraction", resolution, prune_kwargs)
    fraction, resolution = float(latency_fraction), float(resolution)
    inputs = as_input_tuple(example_inputs)
    table = latency_table if latency_table is not None else default_latency_table(model, inputs, options.device)
    if options.round_to == "auto" and isinstance(table, LatencyTable):
        options = options.replace(latency_table=table)  # the widths timed where the model is
    prune_with_options(model, inputs, options.replace(ratio=0.0), dry_run=True)  # checks every option before timing
    relative = measured_fraction(model, inputs, table, deploy, "ratio_for_latency",
                                 lambda ratio: pruned_copy(model, inputs, options, ratio=ratio, check_latency=False))
    ratio = smallest_ratio(lambda r: relative(r) <= fraction, resolution)
    if ratio is None:
        raise ValueError(f"slimcore.ratio_for_latency: no ratio runs in {fraction:g} of the dense latency; at ratio "
                         f"{1 - resolution:g} it takes {relative(1 - resolution):.3f} (min_channels, max_layer_ratio, "
                         "ignored and output layers, and the layers pruning does not shrink, set a floor)")
    return ratio
