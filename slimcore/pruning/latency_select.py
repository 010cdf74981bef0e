"""Latency-aware channel selection: ``slimcore.prune_for_latency``.

The global threshold removes the channels with the lowest scores, whatever they cost. At a latency
budget that is the wrong exchange rate: a channel of a 28x28 layer costs far more time than one of
a 3x3 layer, so removing a slightly better-scored expensive channel can save the time of several
cheap ones. This module chooses *which* channels go so that, for a latency budget, the channels
kept hold as much of the criterion's importance as it can find (the idea of HALP, Shen et al.,
NeurIPS 2022: a knapsack of importance against per-layer latency; this is an implementation of our
own, a greedy one):

1. Costs. Every conv/linear (``widths.timed_layers``) is timed standalone on a grid of input x
   output widths (``LatencyTable``: the target device, batch, dtype; cached), and its time at
   other widths is interpolated bilinearly (exact for a cost that is bilinear in the widths, as
   FLOPs are; it smooths the small steps a CPU shows). A model's estimated time is the sum.
2. Path. Starting from the dense model, a greedy repeatedly takes the move that saves the most
   estimated time per unit of importance lost. A move removes a layer's next lowest-scored channel
   groups, one or down to a multiple of 4, 8, ..., 64 channels (a step can be faster where one
   channel is not), or a whole residual branch that may collapse. Its saving is computed with the
   neighbouring layers at their current widths (a conv's time depends on its input and output
   widths, so removing a layer's channels changes what its consumers' channels cost): after each
   move, the layers that share a conv with it are re-evaluated. Moves never go below what
   ``decide`` would put back (min_channels, max_layer_ratio, round_to, frozen and unscored
   channels); channels tied together (residual streams, groups) are one group and go together.
   Importance lost (``importance``): "sum", the removed channels' scores; or "log_share", the drop
   in the sum over layers of log(the share of its dense score a layer keeps): a layer's share is
   worth the same whatever its size or score scale, and a layer's last channels cost the most, so
   an expensive layer is not emptied for the cheap channels of others.
3. Budget. Estimated and measured times differ (BN, activations, pooling and memory traffic are not
   in the per-layer sum), so the cut along the path is found by bisection on the *measured* time of
   the deployed pruned model against the deployed dense one, interleaved in one run, as
   ``ratio_for_latency`` finds its ratio.

The selection plugs into ``prune`` as its ``select`` hook: ``decide`` (decide.py) applies collapsed blocks,
selection BNs, min_channels and max_layer_ratio to it as it does to the threshold.
"""

import copy
import hashlib
import math

import numpy as np

from .decide import down_selections, layer_floor, round_step
from .profile import as_input_tuple
from .prune import default_latency_table, deployed_with, prune, pruned_copy
from .search import check_search, measured_fraction, ratio_for_latency, smallest_ratio
from .widths import STEPS, LatencyTable, timed_layers

SELECTIONS = ("latency", "threshold")
# What the latency-aware greedy keeps (see _Path): "sum": the sum of the kept channels' scores, the
# threshold's objective; "log_share": the sum over layers of the log of the share of its own score
# a layer keeps, so a layer's last channels cost the most and no layer is starved.
IMPORTANCES = ("sum", "log_share")
GRID = 8  # intervals per timed side: (GRID + 1)^2 standalone timings per conv whose both widths change


def _grid(full, groups, varies):
    """Widths a timed side is measured at: its full width only when it cannot change, else GRID + 1
    points from 1 to full, as multiples of ``groups`` (a grouped conv's widths must divide)."""
    if not varies or full <= groups:
        return np.array([full], dtype=np.int64)
    points = np.unique(np.round(np.linspace(1, full, GRID + 1) / groups).astype(np.int64) * groups)
    return points[points >= groups]


def _interp(points, x):
    """(lower index, upper index, weight of the upper) of x on sorted grid points (clamped)."""
    if len(points) == 1:
        return 0, 0, 0.0
    j = int(np.clip(np.searchsorted(points, x), 1, len(points) - 1))
    lo, hi = points[j - 1], points[j]
    return j - 1, j, float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


class _LayerCost:
    """One timed layer's time at any (input, output) width: bilinear between grid timings."""

    def __init__(self, layer, in_varies, out_varies):
        self.layer = layer
        full_in, full_out = len(layer.in_classes), len(layer.out_classes)
        self.depthwise = layer.kind == "depthwise_conv"
        groups = 1 if self.depthwise or layer.kind == "linear" else int(layer.module.groups)
        self.ins = _grid(full_in, groups, in_varies or (self.depthwise and out_varies))
        self.outs = self.ins if self.depthwise else _grid(full_out, groups, out_varies)
        self.requests = ([(layer, w, w, layer.in_shape) for w in self.ins] if self.depthwise else
                         [(layer, int(a), int(b), layer.in_shape) for a in self.ins for b in self.outs])

    def fill(self, table):
        values = np.array([table.time(*r) for r in self.requests], dtype=np.float64)
        self.values = values.reshape(len(self.ins), 1 if self.depthwise else len(self.outs))

    def __call__(self, cin, cout):
        if cin == 0 or cout == 0:
            return 0.0  # inside a collapsed block: the layer is gone
        i0, i1, wi = _interp(self.ins, cin)
        if self.depthwise:
            return (1 - wi) * self.values[i0, 0] + wi * self.values[i1, 0]
        o0, o1, wo = _interp(self.outs, cout)
        v = self.values
        return ((1 - wi) * ((1 - wo) * v[i0, o0] + wo * v[i0, o1]) + wi * ((1 - wo) * v[i1, o0] + wo * v[i1, o1]))


class _Path:
    """The greedy's removal order for one set of channel classes: ``steps`` (class ids removed by
    each move) and ``estimate`` (estimated seconds after each move; estimate[0] is the dense model's)."""

    def __init__(self, classes, blocks, table, round_to, min_channels, max_layer_ratio, importance="sum"):
        layers = timed_layers(classes.graph, classes)
        candidate = classes.candidate
        self.costs = []
        for t in layers:
            self.costs.append(_LayerCost(t, bool(candidate[t.in_classes].any()),
                                         bool(candidate[t.out_classes].any())))
        table.prefetch([r for c in self.costs for r in c.requests])  # one interleaved run for every grid point
        for c in self.costs:
            c.fill(table)
        if isinstance(table, LatencyTable):
            table.save()
        # channels of each class on each timed layer's input and output side
        self.touch = {}  # class id -> [(timed layer index, side 0 in / 1 out, channels)]
        for i, t in enumerate(layers):
            for side, cls in ((0, t.in_classes), (1, t.out_classes)):
                ids, counts = np.unique(cls, return_counts=True)
                for c, k in zip(ids.tolist(), counts.tolist()):
                    self.touch.setdefault(c, []).append((i, side, k))
        self.width = np.array([[len(t.in_classes), len(t.out_classes)] for t in layers], dtype=np.int64).reshape(-1, 2)
        self.classes = classes
        self.has_selections = len(classes.sel_class) > 0
        self.importance = importance
        self._layer_shares()
        self._walk(blocks, round_to, min_channels, max_layer_ratio)

    def _layer_shares(self):
        """For ``importance="log_share"``: each class's layer (decide's grouping, -1: none), each
        layer's dense score and its smoothing term (one average channel of the dense layer)."""
        c = self.classes
        self.abs_score = np.nan_to_num(np.abs(c.score), nan=0.0, posinf=np.inf)  # inf: a channel kept
        self.layer_of = np.full(c.n, -1, dtype=np.int64)
        members = [m for mask in (~c.is_selection, c.is_selection) for m in c.layers(mask).values()]
        finite = np.where(np.isfinite(self.abs_score), self.abs_score, 0.0)
        for i, m in enumerate(members):
            self.layer_of[m] = i
        self.layer_dense = np.array([finite[m].sum() for m in members], dtype=np.float64)
        self.layer_smooth = np.array([finite[m].sum() / len(m) for m in members], dtype=np.float64)
        self.layer_kept = self.layer_dense.copy()  # the walk's current state

    def _lost(self, ids, kept):
        """Importance lost by removing classes ``ids`` when the layers keep ``kept`` of their score."""
        if self.importance == "sum" or not np.isfinite(self.abs_score[ids]).all():
            return float(self.abs_score[ids].sum())
        ids = ids[self.layer_of[ids] >= 0]
        lids, at = np.unique(self.layer_of[ids], return_inverse=True)
        removed = np.bincount(at, weights=self.abs_score[ids], minlength=len(lids))
        before = kept[lids] + self.layer_smooth[lids]
        after = np.maximum(before - removed, 0.0)
        live = self.layer_dense[lids] > 0  # a layer of zero scores has nothing to lose
        # log(before / after): a layer's share halved costs as much whatever its size or scale
        return float(np.sum(np.log(before[live]) - np.log(after[live])))

    def _kept(self, removed):
        """Score each layer keeps when ``removed`` classes are gone."""
        ids = np.flatnonzero(removed & (self.layer_of >= 0) & np.isfinite(self.abs_score))
        gone = np.bincount(self.layer_of[ids], weights=self.abs_score[ids], minlength=len(self.layer_dense))
        return self.layer_dense - gone

    def _groups(self, round_to, min_channels, max_layer_ratio):
        """Per layer (decide's grouping): removable classes lowest score first, and the most of them
        that may go before decide would put some back."""
        c = self.classes
        out = {}
        for mask in (~c.is_selection, c.is_selection):
            for lid, members in c.layers(mask).items():
                m, n = int(c.multiplicity[members[0]]), len(members)
                need = layer_floor(n, m, min_channels, max_layer_ratio)
                movable = members[c.candidate[members]]
                movable = movable[np.argsort(c.score[movable], kind="stable")]
                limit = min(len(movable), n - need)  # most classes of the layer removed at once
                if limit > 0:
                    step = round_step(round_to, m)
                    out[(bool(c.is_selection[members[0]]), lid)] = dict(order=movable, members=members, n=n, m=m,
                                                                        limit=limit, step=step)
        return out

    def _targets(self, g):
        """Candidate numbers of the group's classes removed after one move (now: ``done``)."""
        n, m, limit, step = g["n"], g["m"], g["limit"], g["step"]
        done = int(self.removed[g["members"]].sum())
        kept = n - done

        def valid(k):  # kept counts round_to allows
            return k == n or k % step == 0

        first = next((r for r in range(done + 1, limit + 1) if valid(n - r)), None)
        if first is None:
            return done, []
        targets = {first}
        for s in STEPS:
            cls_step = round_step(s, m)
            k = ((kept - 1) // cls_step) * cls_step  # the next multiple of s channels below the current width
            if done < n - k <= limit and valid(k):
                targets.add(n - k)
        return done, sorted(targets)

    def _effect(self, removed_now, removed=None, width=None):
        """(seconds saved, importance lost, class ids, {timed layer: (input, output) channels
        fewer}) of removing ``removed_now`` (plus the selection channels that read them) from the
        state ``removed``/``width`` (default: the walk's current one)."""
        c = self.classes
        kept = self.layer_kept if removed is None or self.importance == "sum" else self._kept(removed)
        removed = self.removed if removed is None else removed
        width = self.width if width is None else width
        ids = removed_now
        if self.has_selections:
            mask = removed.copy()
            mask[ids] = True
            down_selections(c, mask)
            ids = np.flatnonzero(mask & ~removed)
        delta = {}
        for cid in ids.tolist():
            for i, side, k in self.touch.get(cid, ()):
                d = delta.setdefault(i, [0, 0])
                d[side] += k
        saved = 0.0
        for i, (din, dout) in delta.items():
            w_in, w_out = width[i]
            cost = self.costs[i]
            saved += cost(w_in, w_out) - cost(w_in - din, w_out - dout)
        return saved, self._lost(ids, kept), ids, delta

    def _best_move(self, key):
        g = self.groups[key]
        done, targets = self._targets(g)
        left = g["order"][~self.removed[g["order"]]]  # lowest score first
        best = None
        for r in targets:
            best = _better(best, (*self._effect(left[: r - done]), key))
        return best

    def _walk(self, blocks, round_to, min_channels, max_layer_ratio):
        c = self.classes
        self.removed = np.zeros(c.n, dtype=bool)
        self.groups = self._groups(round_to, min_channels, max_layer_ratio)
        of_layer = {}  # timed layer index -> groups (and blocks) whose classes it reads or writes
        for key, g in self.groups.items():
            for cid in g["order"].tolist():
                for i, _, _ in self.touch.get(cid, ()):
                    of_layer.setdefault(i, set()).add(key)
        blocks = {("block", name): internal for name, internal in blocks}
        for key, internal in blocks.items():
            for cid in internal.tolist():
                for i, _, _ in self.touch.get(cid, ()):
                    of_layer.setdefault(i, set()).add(key)
        of_share = {}  # layer share index -> moves whose loss depends on it (importance="log_share")
        for key, ids in [*((k, g["order"]) for k, g in self.groups.items()), *blocks.items()]:
            for s in np.unique(self.layer_of[ids]).tolist():
                of_share.setdefault(s, set()).add(key)
        self.full_width = self.width.copy()
        total = sum(cost(*w) for cost, w in zip(self.costs, self.width))
        self.steps, self.estimate, self.deltas, self.divisible = [], [total], [], []
        moves = {}  # cached best move per group, recomputed when a layer it touches changes

        def evaluate(key):
            if key in blocks:
                left = blocks[key][~self.removed[blocks[key]]]
                moves[key] = None if len(left) == 0 else (*self._effect(left), key)
            else:
                moves[key] = self._best_move(key)

        for key in (*self.groups, *blocks):
            evaluate(key)
        while True:
            best = None
            for move in moves.values():
                if move is not None:
                    best = _better(best, move)
            if best is None:
                break
            saved, _, ids, delta, key = best
            self.removed[ids] = True
            if self.importance != "sum":
                self.layer_kept = self._kept(self.removed)
            for i, (din, dout) in delta.items():
                self.width[i] -= (din, dout)
            total -= saved
            self.steps.append(ids)
            self.estimate.append(total)
            self.deltas.append(delta)
            self.divisible.append(key not in blocks)  # a layer's move; a block goes whole or not at all
            dirty = {key}
            for i in delta:
                dirty |= of_layer.get(i, set())
            if self.importance != "sum":
                for s in np.unique(self.layer_of[ids]).tolist():
                    dirty |= of_share.get(s, set())
            for k in dirty:
                evaluate(k)
        self.estimate = np.array(self.estimate)

    def cut(self, fraction):
        """Removed mask at the first point of the path whose estimate is within ``fraction`` of the
        dense estimate (the end of the path when none is). A move of several channel groups that
        crosses the target is taken only as far as needed (its lowest scores first): a jump to a
        multiple of 64 channels would otherwise overshoot the budget."""
        removed = np.zeros(self.classes.n, dtype=bool)
        end = self.end(fraction)
        for ids in self.steps[: max(end - 1, 0)]:
            removed[ids] = True
        if end == 0:
            return removed
        last = self.steps[end - 1]
        target = fraction * self.estimate[0]
        if self.estimate[end] <= target and self.divisible[end - 1] and len(last) > 1 and not self.has_selections:
            width = self.full_width.copy()
            for delta in self.deltas[: end - 1]:
                for i, (din, dout) in delta.items():
                    width[i] -= (din, dout)
            for j in range(1, len(last)):
                if self.estimate[end - 1] - self._effect(last[:j], removed, width)[0] <= target:
                    last = last[:j]
                    break
        removed[last] = True
        return removed

    def end(self, fraction):
        """Moves taken to reach ``fraction`` of the dense estimate (all of them when none does)."""
        reached = np.flatnonzero(self.estimate <= fraction * self.estimate[0])
        return int(reached[0]) if len(reached) else len(self.steps)

    def estimated(self, fraction):
        """The estimate (a fraction of the dense one) of ``cut(fraction)``."""
        kept = ~self.cut(fraction)
        return sum(cost(*cost.layer.widths(kept)) for cost in self.costs) / self.estimate[0]


def _better(a, b):
    """The better of two moves (saved, lost, ...): more time saved per importance lost; a move that
    saves no time only when nothing saves any (then the least importance per channel group)."""
    if a is None:
        return b
    if b is None:
        return a

    def rank(m):
        saved, lost, ids = m[0], m[1], m[2]
        if saved > 1e-15:
            return (1, saved / lost if lost > 0 else math.inf, saved)
        return (0, -lost / len(ids), 0.0)
    return b if rank(b) > rank(a) else a


class LatencySelection:
    """The ``select`` hook of ``prune``: removes channels along the latency-aware greedy path up to
    an estimated ``fraction`` of the dense model's per-layer time. Paths are cached per set of
    classes (the copies a search prunes share one)."""

    def __init__(self, table, fraction=1.0, importance="sum"):
        self.table, self.fraction, self.importance = table, float(fraction), importance
        self._paths = {}
        self.last = None  # the path of the last call

    def at(self, fraction):
        other = LatencySelection(self.table, fraction, self.importance)
        other._paths = self._paths
        return other

    def __call__(self, classes, blocks, round_to, min_channels, max_layer_ratio):
        h = hashlib.sha1()
        for a in (classes.of_atom, classes.score, classes.candidate, classes.layer):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(repr((sorted(name for name, _ in blocks), round_to, min_channels, max_layer_ratio,
                       self.importance)).encode())
        key = h.hexdigest()
        if key not in self._paths:
            self._paths[key] = _Path(classes, blocks, self.table, round_to, min_channels, max_layer_ratio,
                                     self.importance)
        self.last = self._paths[key]
        return self.last.cut(self.fraction)


def prune_for_latency(model, example_inputs, latency_fraction, *, selection="latency", importance=None,
                      latency_table=None, deploy=None, resolution=0.01, **prune_kwargs):
    """Prunes ``model`` in place so that its *measured* latency is at most ``latency_fraction`` of
    the dense model's, and returns the :class:`PruneReport` (``report.selection`` says which
    decision was used, ``report.latency`` the measured fraction and times).

    ``selection="latency"`` chooses which channels go by their importance per unit of measured
    per-layer latency (see this module's docstring); ``"threshold"`` keeps ``prune``'s global
    threshold at the ratio ``ratio_for_latency`` finds. Either way the models are timed with
    ``latency_table`` (default: the model's device and dtype, the example inputs' batch), each
    candidate interleaved with the dense model, both in the form ``deploy`` makes of them (e.g.
    ``lambda m: slimcore.deploy(m, x)``), and the final model is timed once more for the report::

        table = slimcore.LatencyTable("cpu", batch=64)
        report = slimcore.prune_for_latency(model, x, 0.5, latency_table=table,
                                            deploy=lambda m: slimcore.deploy(m, x))
        report.latency["measured_fraction"]   # e.g. 0.49

    ``importance`` (selection="latency" only): what the greedy keeps per unit of time.
    ``"log_share"`` (the default): the sum over layers of log(share of its dense score the layer
    keeps), each share smoothed by one average channel of the layer: halving any layer's score costs
    the same, so the last channels of an expensive layer are not traded for the cheap channels of
    others; ``"sum"``: the sum of the kept channels' scores (the threshold's objective), which
    starves expensive layers (docs/deploy.md: log_share was as accurate or more after fine-tuning
    in all four comparisons there).

    ``resolution``: of the search over the selection's estimated latency (or the threshold's
    ratio). Other keyword arguments go to ``prune`` (criterion, min_channels, max_layer_ratio,
    round_to (an integer), ignore, compensate, optimizer, ...). Raises ValueError when even the
    smallest model the options allow is slower than ``latency_fraction``."""
    fn = "prune_for_latency"
    if selection not in SELECTIONS:
        raise ValueError(f"slimcore.{fn}: selection must be one of {SELECTIONS}, got {selection!r}")
    if importance is None:
        importance = "log_share" if selection == "latency" else "sum"
    if importance not in IMPORTANCES:
        raise ValueError(f"slimcore.{fn}: importance must be one of {IMPORTANCES}, got {importance!r}")
    if selection == "threshold" and importance != "sum":
        raise ValueError(f"slimcore.{fn}: importance={importance!r} is for selection='latency'; the threshold "
                         "keeps the highest scores")
    optimizer = prune_kwargs.pop("optimizer", None)
    for key in ("check_latency", "select"):
        if key in prune_kwargs:
            raise ValueError(f"slimcore.{fn}: {key!r} is not an option here")
    options = check_search(fn, latency_fraction, "latency_fraction", resolution, prune_kwargs)
    if selection == "latency":
        if prune_kwargs.get("round_to") == "auto":
            raise ValueError(f"slimcore.{fn}: round_to='auto' does not combine with selection='latency' (the "
                             "selection already chooses widths by their measured time); give an integer")
        if prune_kwargs.get("scope", "global") != "global":
            raise ValueError(f"slimcore.{fn}: selection='latency' chooses across layers; scope must be 'global'")
    fraction, resolution = float(latency_fraction), float(resolution)
    inputs = as_input_tuple(example_inputs)
    table = latency_table if latency_table is not None else default_latency_table(model, inputs, options.device)
    if selection == "threshold":
        ratio = ratio_for_latency(model, inputs, fraction, resolution=resolution, latency_table=table, deploy=deploy,
                                  **prune_kwargs)
        final = dict(ratio=ratio, check_latency=False)  # as searched: round_to="auto" widths, no uniform rounding
        if prune_kwargs.get("round_to") == "auto" and isinstance(table, LatencyTable):
            final["latency_table"] = table
    else:
        prune(model, inputs, ratio=0.0, dry_run=True, **prune_kwargs)  # checks every option before any timing
        chooser = LatencySelection(table, importance=importance)
        # r: the share of the dense estimate the selection removes
        relative = measured_fraction(model, inputs, table, deploy, fn,
                                     lambda r: pruned_copy(model, inputs, options, ratio=0.0, select=chooser.at(1.0 - r)))

        r = smallest_ratio(lambda r: relative(r) <= fraction, resolution)
        if r is None:
            raise ValueError(f"slimcore.{fn}: no selection runs in {fraction:g} of the dense latency; the smallest "
                             f"model takes {relative(1 - resolution):.3f} (min_channels, max_layer_ratio, ignored "
                             "and output layers, and the layers pruning does not shrink, set a floor)")
        final = dict(ratio=0.0, select=chooser.at(1.0 - r))
    estimated = None
    dense = deployed_with(copy.deepcopy(model).eval(), deploy, fn)
    report = prune(model, inputs, optimizer=optimizer, **(prune_kwargs | final))
    if selection == "latency":
        path = final["select"].last
        estimated = float(path.estimated(1.0 - r))
    pruned = deployed_with(copy.deepcopy(model).eval(), deploy, fn)
    dense_s, pruned_s = table.time_models([dense, pruned], inputs)
    report.latency = {"target": fraction, "measured_fraction": pruned_s / dense_s, "dense_ms": dense_s * 1e3,
                      "pruned_ms": pruned_s * 1e3, "estimated_fraction": estimated,
                      "importance": importance if selection == "latency" else None}
    return report
