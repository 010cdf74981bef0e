"""Which channel classes go: ``ChannelClasses`` (the coupled channel groups with their scores) and
``decide`` (a global threshold or per layer, then ``min_channels``, ``max_layer_ratio`` and
``round_to`` per layer, and the residual blocks whose whole branch goes).
"""

import math

import numpy as np



class ChannelClasses:
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


def round_step(round_to, multiplicity):
    """Kept class counts of a layer are multiples of this (a class holds ``multiplicity`` channels)."""
    return round_to // math.gcd(round_to, int(multiplicity))


def round_up(k, multiplicity, round_to, n):
    step = round_step(round_to, multiplicity)
    return min(n, -(-k // step) * step)


def layer_floor(n, multiplicity, min_channels, max_layer_ratio):
    """The fewest of a layer's ``n`` classes that may stay: min_channels (in channels) and
    max_layer_ratio (the most that may go) both hold."""
    return max(min(n, -(-min_channels // multiplicity)), n - int(math.floor(max_layer_ratio * n)))


def _restore(classes, removed, groups, round_to, min_channels, allowed, max_layer_ratio=1.0):
    """Per layer: put back the best removed classes until min_channels, max_layer_ratio and
    round_to hold."""
    for layer, members in groups.items():
        m = int(classes.multiplicity[members[0]])
        n = len(members)
        kept = int((~removed[members]).sum())
        need = round_up(max(kept, layer_floor(n, m, min_channels, max_layer_ratio)), m, round_to, n)
        if need <= kept:
            continue
        back = members[removed[members] & allowed[members]]
        back = back[np.argsort(-classes.score[back], kind="stable")][: need - kept]
        removed[back] = False


def down_selections(classes, mask):
    """Grows a class mask (in place, and returns it) along selection edges: a selection class
    whose input class is in the mask joins it, to a fixed point (selections can chain)."""
    while True:
        newly = mask[classes.parent_class] & ~mask[classes.sel_class]
        if not newly.any():
            return mask
        mask[classes.sel_class[newly]] = True


def decide(classes, ratio, scope, round_to, min_channels, max_layer_ratio=1.0, blocks=(), widen=None, select=None):
    """Boolean array: class removed. Returns (removed, threshold, collapsed block names).

    ``widen(removed, layers, allowed)`` (round_to="auto": slimcore.pruning.widths) may put back removed
    classes per layer after the criterion's, min_channels' and max_layer_ratio's choices.

    ``blocks``: [(name, internal class ids)] of residual blocks that may collapse: if the
    threshold empties any layer inside a block's branch, the whole branch goes (the block becomes
    x + constant) instead of min_channels keeping a sliver of it.

    ``select(classes, blocks, round_to, min_channels, max_layer_ratio)`` (slimcore.prune_for_latency)
    replaces the ratio's threshold: it returns the removed mask, and everything after the threshold
    here (collapsed blocks, min_channels, max_layer_ratio, selections) applies to it alike.
    """
    removed = np.zeros(classes.n, dtype=bool)
    threshold = None
    if select is not None:
        removed = select(classes, blocks, 1 if round_to == "auto" else round_to, min_channels, max_layer_ratio)
    elif scope == "global":
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
    down_selections(classes, removed)
    forced = removed & ~before
    # Selection layers keep min_channels too; never by putting back a channel that reads (through
    # any chain of selections) a channel of a collapsed block.
    reads_collapsed = down_selections(classes, protected.copy())
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


def collapsible_blocks(graph, classes, compensate):
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


def removed_share(classes, removed):
    """Share of the scored (candidate) channels that ``removed`` takes, each class weighted by the
    channels it holds: the pool a global ``ratio`` is a share of."""
    pool = classes.size[classes.candidate].sum()
    return float(classes.size[classes.candidate & removed].sum() / pool) if pool else 0.0
