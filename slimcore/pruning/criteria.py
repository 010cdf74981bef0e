"""Channel importance criteria, and unstructured magnitude pruning.

A criterion gives a score to atoms of a :class:`slimcore.pruning.graph.ChannelGraph` (higher = more
important); the pruner scores a class of coupled channels by the **maximum** of its atoms' scores:
a coupled channel goes only if every layer that produces or scales it finds it unimportant.
Atoms without a score (NaN) do not count; a class with no score is kept.

=============  ==================================================================================
bn_scale       |gamma| of every BatchNorm channel (network slimming, Liu et al. 2017). A BN scores
               the channels it reads; a selection BN (see graph.py) also scores its own output
               channels, so they can go while its input stays (the reference repo's
               channel_selection). Channels that no BN scales where they are produced and that
               a conv/linear reads directly (the pre-activation residual stream feeding shortcut
               convs) are kept: no gamma measures them.
l1_filter      Li et al. 2016: the L1 norm of each conv/linear filter, divided by its fan-in
               (the mean |w|), so a global threshold compares layers of different fan-in; within
               a layer the ranking is Li et al.'s.
cfp            Singh et al., WACV 2020: in each layer, repeatedly take the most correlated
               pair of remaining filters (Pearson correlation of their weights) and drop the one
               with the smaller L1 norm; its score is 1 - |corr| of that pair (so global
               thresholds compare correlations); the last filter left is never dropped.
hbfp           Basha et al. 2021 ("Deep model compression based on the training history"): like
               cfp, with pairs ranked by the distance of their L1-norm histories over training
               epochs, D_ij = sum_t |l1_i(t) - l1_j(t)| (a FilterHistory records them); the
               score is D_ij / (epochs * mean filter L1 norm of the layer).
random         uniform random scores (a baseline), seeded.
=============  ==================================================================================
"""

import numpy as np
import torch
from torch import nn

from .graph import ChannelGraph

CRITERIA = ("bn_scale", "l1_filter", "cfp", "hbfp", "random")
_PRODUCERS = ("conv", "grouped_conv", "depthwise_conv", "linear")


def _filters(module):
    """(out_channels, fan_in) view of a conv/linear weight, as float64 numpy."""
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1).double().cpu().numpy()


def _score_into(scores, atoms, values):
    """scores[atoms] = max(scores[atoms], values), ignoring NaN."""
    np.fmax.at(scores, atoms, values)


def bn_scale_scores(graph: ChannelGraph):
    scores = np.full(graph.n_atoms, np.nan)
    for mc in graph.modules.values():
        if mc.kind in ("bn", "selection_bn") and mc.module.weight is not None:
            gamma = mc.module.weight.detach().abs().double().cpu().numpy()
            _score_into(scores, mc.source_atoms, gamma)
            if mc.kind == "selection_bn":
                _score_into(scores, mc.out_atoms, gamma)
    # |gamma| measures a channel only where a BN scales it. A class produced by some conv/linear
    # without a BN right after it (pre-activation ResNet's residual stream) that a conv/linear
    # also reads directly (the stream's shortcut convs) carries values no gamma measures: keep it.
    roots = graph.classes()
    owner = graph.owner
    scaled = {mc.producer for mc in graph.modules.values() if mc.kind == "bn" and mc.producer}
    unscaled_ids = [i for i, name in enumerate(graph.owner_names)
                    if name in graph.modules and graph.modules[name].kind in ("conv", "grouped_conv", "linear")
                    and name not in scaled]
    raw_reads = [mc.in_atoms for mc in graph.modules.values() if mc.kind in _PRODUCERS]
    if unscaled_ids and raw_reads:
        # classes by their root atom, as masks (np.unique's hashing costs ~0.5 ms an array here)
        unscaled = np.zeros(graph.n_atoms, dtype=bool)
        unscaled[roots[np.isin(owner, unscaled_ids)]] = True
        raw = np.zeros(graph.n_atoms, dtype=bool)
        raw[roots[np.concatenate(raw_reads)]] = True
        scores[(unscaled & raw)[roots]] = np.inf
    return scores


def l1_filter_scores(graph: ChannelGraph):
    scores = np.full(graph.n_atoms, np.nan)
    for mc in graph.modules.values():
        if mc.kind in _PRODUCERS:
            w = _filters(mc.module)
            _score_into(scores, mc.out_atoms, np.abs(w).mean(axis=1))
    return scores


def random_scores(graph: ChannelGraph, seed=0):
    rng = np.random.default_rng(seed)
    scores = np.full(graph.n_atoms, np.nan)
    for mc in graph.modules.values():
        if mc.kind in _PRODUCERS:
            _score_into(scores, mc.out_atoms, rng.random(len(mc.out_atoms)))
    return scores


def greedy_pair_elimination(similarity, importance, pair_score):
    """Scores from repeatedly removing the less important filter of the most similar remaining pair.

    similarity: (n, n) symmetric, larger = more redundant. importance: (n,). pair_score(s) maps the
    similarity of the pair a filter was removed from to its score. The last filter scores +inf
    (it is never the redundant one). O(n^2) typical: only rows whose best partner was removed are
    rescanned.
    """
    n = len(importance)
    sim = np.array(similarity, dtype=np.float64)
    np.fill_diagonal(sim, -np.inf)
    scores = np.full(n, np.inf)
    alive = np.ones(n, dtype=bool)
    partner = sim.argmax(axis=1)
    best = sim[np.arange(n), partner]
    for _ in range(n - 1):
        i = int(np.argmax(np.where(alive, best, -np.inf)))
        j = int(partner[i])
        victim = i if importance[i] < importance[j] else j
        scores[victim] = pair_score(sim[i, j])
        alive[victim] = False
        best[victim] = -np.inf
        sim[victim, :] = -np.inf
        sim[:, victim] = -np.inf
        stale = np.nonzero(alive & (partner == victim))[0]
        if len(stale):
            partner[stale] = sim[stale].argmax(axis=1)
            best[stale] = sim[stale, partner[stale]]
    return scores


def cfp_scores(graph: ChannelGraph):
    scores = np.full(graph.n_atoms, np.nan)
    for mc in graph.modules.values():
        if mc.kind in ("conv", "grouped_conv", "linear") and len(mc.out_atoms) > 1:
            w = _filters(mc.module)
            centered = w - w.mean(axis=1, keepdims=True)
            norms = np.linalg.norm(centered, axis=1)
            norms[norms == 0] = 1.0
            corr = np.abs((centered @ centered.T) / np.outer(norms, norms))
            _score_into(scores, mc.out_atoms, greedy_pair_elimination(corr, np.abs(w).sum(axis=1), lambda c: 1.0 - c))
    return scores


class FilterHistory:
    """Records the L1 norm of every conv/linear filter once per epoch, for the ``hbfp`` criterion.

        history = slimcore.FilterHistory(model)
        for epoch in range(epochs):
            train_one_epoch(...)
            history.record()
        slimcore.prune(model, x, ratio=0.5, criterion="hbfp", history=history)
    """

    def __init__(self, model):
        self.model = model
        self.norms = {}  # module name -> list of (out_channels,) arrays

    def record(self):
        for name, m in self.model.named_modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                w = m.weight.detach()
                self.norms.setdefault(name, []).append(w.reshape(w.shape[0], -1).abs().sum(1).double().cpu().numpy())

    def state_dict(self):
        return {name: torch.from_numpy(np.stack(v)) for name, v in self.norms.items()}

    def load_state_dict(self, state):
        self.norms = {name: list(t.numpy()) for name, t in state.items()}


def hbfp_scores(graph: ChannelGraph, history: FilterHistory):
    if history is None or not history.norms:
        raise ValueError("criterion 'hbfp' needs history=FilterHistory(model) recorded over training epochs")
    scores = np.full(graph.n_atoms, np.nan)
    for mc in graph.modules.values():
        if mc.kind not in ("conv", "grouped_conv", "linear") or len(mc.out_atoms) < 2:
            continue
        records = history.norms.get(mc.name)
        if not records:
            continue
        h = np.stack(records)  # (epochs, out)
        if h.shape[1] != len(mc.out_atoms):
            raise ValueError(
                f"FilterHistory has {h.shape[1]} filters for '{mc.name}' but it has {len(mc.out_atoms)}: "
                "record a new history after pruning"
            )
        dist = np.abs(h[:, :, None] - h[:, None, :]).sum(axis=0)
        scale = h.shape[0] * max(h[-1].mean(), 1e-12)
        s = greedy_pair_elimination(-dist, h[-1], lambda sim: -sim / scale)
        _score_into(scores, mc.out_atoms, s)
    return scores


def atom_scores(graph, criterion, history=None, seed=0):
    if criterion == "bn_scale":
        return bn_scale_scores(graph)
    if criterion == "l1_filter":
        return l1_filter_scores(graph)
    if criterion == "cfp":
        return cfp_scores(graph)
    if criterion == "hbfp":
        return hbfp_scores(graph, history)
    if criterion == "random":
        return random_scores(graph, seed)
    raise ValueError(f"unknown criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")


def magnitude_prune(model, sparsity, modules=(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear), scope="global"):
    """Unstructured magnitude pruning (Han et al., NeurIPS 2015) of conv/linear weights.

    Zeroes the ``sparsity`` fraction of weights with the smallest |w| (one threshold over all
    layers, or per layer with ``scope="layer"``) through ``torch.nn.utils.prune``: each module gets
    a ``weight_mask`` buffer and ``weight_orig`` parameter, so training keeps the zeros;
    ``torch.nn.utils.prune.remove(module, "weight")`` makes them permanent. Returns
    ``{module name: mask}``.

    Honest note: this shrinks nothing by itself. The tensors keep their shapes, so memory and
    dense-kernel latency stay the same; only a sparse storage format or sparse kernels can turn the
    zeros into savings. Structured pruning (``slimcore.prune``) removes whole channels instead.
    """
    from torch.nn.utils import prune as torch_prune

    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"magnitude_prune: sparsity must be in [0, 1), got {sparsity!r}")
    if scope not in ("global", "layer"):
        raise ValueError(f"magnitude_prune: scope must be 'global' or 'layer', got {scope!r}")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, modules)]
    if not targets:
        raise ValueError(f"magnitude_prune: {type(model).__name__} has no {[t.__name__ for t in modules]} module")
    if scope == "global":
        torch_prune.global_unstructured([(m, "weight") for _, m in targets], torch_prune.L1Unstructured,
                                        amount=float(sparsity))
    else:
        for _, m in targets:
            torch_prune.l1_unstructured(m, "weight", amount=float(sparsity))
    return {name: m.weight_mask for name, m in targets}
