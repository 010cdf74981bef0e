"""No layer collapse (slimcore.prune: min_channels, max_layer_ratio, collapse_blocks): a global
threshold never empties or crashes a layer, and a residual block whose branch is dead becomes
ResidualConstant (x + c), exactly."""

import copy

import numpy as np
import pytest
import torch
from helpers import randomize_batchnorms
from torch import nn

import slimcore
import slimcore.models as seed_models
from slimcore.pruning.criteria import atom_scores
from slimcore.pruning.graph import analyze
from slimcore.pruning.decide import ChannelClasses

X = torch.randn(4, 3, 32, 32)


def blocks(model):
    return list(model.layer1) + list(model.layer2) + list(model.layer3)


def kill_branches(model, every=3, seed=1):
    """Zero every BN gamma inside the branch of every `every`-th block; live gammas elsewhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2 + 0.1)
        killed = []
        for i, block in enumerate(blocks(model)):
            if i % every == 1 and block.downsample is None:
                for bn in (block.bn1, block.bn2, block.bn3):
                    bn.weight.zero_()
                killed.append(block)
    return killed


def dead_share(model, x):
    """A ratio that removes exactly the prunable channel classes whose score is 0 (half a channel
    more than their share, less than any live class adds)."""
    graph = analyze(model, (x,))
    classes = ChannelClasses(graph, atom_scores(graph, "bn_scale"))
    cand = classes.candidate
    return float((classes.size[cand & (classes.score == 0)].sum() + 0.5) / classes.size[cand].sum())


def widths(model):
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] + \
        [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("compensate", [True, False])
def test_dead_branches_become_exact_identities(compensate):
    model = randomize_batchnorms(seed_models.build("preresnet164")).eval()
    killed = kill_branches(model)
    names = {n for n, m in model.named_modules() if any(m is k for k in killed)}
    dense = copy.deepcopy(model)
    ratio = dead_share(model, X)
    report = slimcore.prune(model, X, ratio=ratio, compensate=compensate)
    assert set(report.collapsed) == names
    for name in names:
        assert isinstance(model.get_submodule(name), slimcore.nn.ResidualConstant)
    with torch.no_grad():
        want, got = dense(X), model(X)
    if compensate:  # the branches emitted constants: x + c reproduces the dense model
        # 54 random blocks grow the logits to ~1e4: compare at fp32 precision of that scale.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    assert (report.flops_after, report.params_after) == slimcore.profile(model, X)
    assert min(widths(model)) >= 1


@pytest.mark.parametrize("ratio", [0.6, 0.7, 0.8])
def test_aggressive_global_pruning_never_collapses_a_layer(ratio):
    model = randomize_batchnorms(seed_models.build("preresnet164")).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # strongly sparse: most gammas near zero, a few live
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                dead = torch.rand(m.weight.shape, generator=g) < 0.8
                m.weight.copy_(torch.where(dead, torch.rand(m.weight.shape, generator=g) * 1e-3, m.weight))
    report = slimcore.prune(model, X, ratio=ratio)
    assert min(widths(model)) >= 1, "no zero-width layer"
    if ratio >= 0.8:  # here some branches fall to zero: they must collapse, not keep slivers
        assert report.collapsed
    assert (report.flops_after, report.params_after) == slimcore.profile(model, X)
    with torch.no_grad():
        assert torch.isfinite(model(X)).all()


def test_collapsed_model_saves_exports_and_prunes_again(tmp_path):
    model = randomize_batchnorms(seed_models.build("preresnet164")).eval()
    kill_branches(model)
    slimcore.prune(model, X, ratio=dead_share(model, X))
    path = tmp_path / "collapsed.pt"
    slimcore.save_pruned(model, path, meta={"model": "preresnet164"})
    loaded = slimcore.load_pruned(path).eval()
    with torch.no_grad():
        want = model(X)
        assert torch.equal(loaded(X), want)
        torch.testing.assert_close(torch.export.export(model, (X,)).module()(X), want)
    again = slimcore.prune(model, X, ratio=0.3)  # ResidualConstant follows its stream
    assert (again.flops_after, again.params_after) == slimcore.profile(model, X)


def test_collapse_can_be_turned_off_and_max_layer_ratio_holds():
    model = randomize_batchnorms(seed_models.build("preresnet164")).eval()
    kill_branches(model)
    report = slimcore.prune(copy.deepcopy(model), X, ratio=dead_share(model, X), collapse_blocks=False)
    assert report.collapsed == []
    vgg = randomize_batchnorms(seed_models.build("vgg19")).eval()
    report = slimcore.prune(vgg, X, ratio=0.8, max_layer_ratio=0.5)
    for name, (before, after) in report.channels.items():
        assert after >= before - int(0.5 * before), (name, before, after)
    with pytest.raises(ValueError, match="max_layer_ratio must be in"):
        slimcore.prune(vgg, X, max_layer_ratio=0.0)
