"""slimcore.pruning.criteria: the pairwise-elimination scores of cfp/hbfp against a naive re-implementation,
the criteria's scores on known weights, and magnitude_prune against torch.nn.utils.prune semantics."""

import numpy as np
import pytest
import torch
from torch import nn

import slimcore
from slimcore.pruning import criteria
from slimcore.pruning.graph import analyze


def naive_pair_elimination(similarity, importance):
    """O(n^3) textbook version: rescan every remaining pair at each step."""
    n = len(importance)
    alive = set(range(n))
    order = []
    while len(alive) > 1:
        best = max(((similarity[i][j], i, j) for i in alive for j in alive if i < j))
        _, i, j = best
        victim = i if importance[i] < importance[j] else j
        order.append((victim, best[0]))
        alive.remove(victim)
    return order


@pytest.mark.parametrize("seed", range(5))
def test_greedy_pair_elimination_matches_the_naive_algorithm(seed):
    rng = np.random.default_rng(seed)
    n = 12
    a = rng.random((n, n))
    sim = (a + a.T) / 2
    importance = rng.random(n)
    scores = criteria.greedy_pair_elimination(sim, importance, lambda s: 1.0 - s)
    for victim, s in naive_pair_elimination(sim, importance):
        assert scores[victim] == pytest.approx(1.0 - s)
    assert np.isinf(scores).sum() == 1  # the survivor


FILTERS = [[1.0, 2.0, 3.0], [2.0, 4.0, 7.0], [3.0, -1.0, 0.5], [0.3, 0.6, 0.9]]  # f3 = 0.3 * f0


def two_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(FILTERS).view(4, 3, 1, 1))
        model[1].weight.copy_(torch.tensor([0.5, -0.1, 0.9, 0.05]))
    return model.eval(), torch.randn(1, 3, 3, 3)


def test_scores_on_known_weights():
    model, x = two_layer()
    graph = analyze(model, (x,))
    conv = graph.modules["0"].out_atoms
    w = np.array(FILTERS)
    np.testing.assert_allclose(criteria.bn_scale_scores(graph)[conv], [0.5, 0.1, 0.9, 0.05], rtol=1e-6)
    np.testing.assert_allclose(criteria.l1_filter_scores(graph)[conv], np.abs(w).mean(1))
    # CFP: (f0, f3) correlate perfectly, f3 is weaker -> goes with score 0; then (f0, f1), f0 weaker;
    # then (f1, f2), f2 weaker; f1 survives.
    corr = np.corrcoef(w)
    np.testing.assert_allclose(criteria.cfp_scores(graph)[conv], [1 - corr[0, 1], np.inf, 1 - abs(corr[1, 2]), 0.0],
                               atol=1e-12)


def test_prune_follows_bn_scale_ranking():
    model, x = two_layer()
    report = slimcore.prune(model, x, ratio=0.5)
    assert report.removed["0"] == [1, 3]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_prune_masks(scope):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    weights = torch.cat([model[0].weight.detach().flatten(), model[2].weight.detach().flatten()]).abs()
    masks = slimcore.magnitude_prune(model, 0.6, scope=scope)
    assert set(masks) == {"0", "2"}
    kept = torch.cat([masks["0"].flatten(), masks["2"].flatten()])
    if scope == "global":  # 60% of all weights go, each no larger than every kept one
        assert int((kept == 0).sum()) == round(0.6 * len(kept))
        assert weights[kept == 0].max() <= weights[kept == 1].min()
    else:
        for name in ("0", "2"):
            assert int((masks[name] == 0).sum()) == round(0.6 * masks[name].numel())
    # torch.nn.utils.prune semantics: weight = weight_orig * weight_mask, and it shrinks nothing.
    assert torch.equal(model[0].weight, model[0].weight_orig * model[0].weight_mask)
    assert model[0].weight.shape == (20, 10)
    with pytest.raises(ValueError, match="sparsity must be in"):
        slimcore.magnitude_prune(model, 1.0)
