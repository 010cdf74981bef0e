"""Bias compensation (slimcore.prune(compensate=True), slimcore/pruning/compensate.py, nn.CompensatedConv*):
a removed channel whose gammas are 0 emits a constant; folding it into the consumers makes the
pruned model equal the dense one, at every position (zero-padded borders included)."""

import copy
import os

import numpy as np
import pytest
import torch
import torchvision
from helpers import randomize_batchnorms
from torch import nn

import slimcore
import slimcore.models as seed_models
from slimcore.pipeline import data
from slimcore.pruning.graph import analyze
from slimcore.pipeline.train import Settings, evaluate, fit, model_meta

MODELS = [
    ("mlp", lambda: seed_models.build("mlp", in_channels=1, input_size=28), (4, 1, 28, 28)),
    ("vgg11", lambda: seed_models.build("vgg11"), (4, 3, 32, 32)),
    ("preresnet56", lambda: seed_models.build("preresnet56"), (4, 3, 32, 32)),
    ("densenet40", lambda: seed_models.build("densenet40"), (4, 3, 32, 32)),
    ("resnet18", lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)),
    ("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 64, 64)),
    ("efficientnet_b0", lambda: torchvision.models.efficientnet_b0(num_classes=10), (2, 3, 64, 64)),  # SE
    ("regnet_y_400mf", lambda: torchvision.models.regnet_y_400mf(num_classes=10), (2, 3, 64, 64)),  # grouped
]


def kill_classes(model, x, share=0.5, dead_value=0.0, seed=0):
    """Every class of coupled channels dies with probability `share`: all the gammas that scale it
    become dead_value (0: exactly dead; small: nearly). Betas are nonzero, so a dead channel emits
    a constant."""
    graph = analyze(model, (x,))
    roots = graph.classes()
    dead = np.random.default_rng(seed).random(graph.n_atoms) < share
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mc in graph.modules.values():
            if mc.kind in ("bn", "selection_bn"):
                d = torch.from_numpy(dead[roots[mc.source_atoms]])
                if mc.kind == "selection_bn":
                    d |= torch.from_numpy(dead[roots[mc.out_atoms]])
                live = torch.rand(mc.module.weight.shape, generator=g) + 0.5
                low = torch.rand(mc.module.weight.shape, generator=g) * dead_value
                mc.module.weight.copy_(torch.where(d, low, live))
                mc.module.bias.copy_(torch.randn(mc.module.bias.shape, generator=g) * 0.3 + 0.2)
    return model


def max_error(a, b, x):
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


@pytest.mark.parametrize("name,build,shape", MODELS, ids=[m[0] for m in MODELS])
def test_removing_dead_channels_is_exact(name, build, shape):
    x = torch.randn(shape)
    model = kill_classes(randomize_batchnorms(build()).eval(), x)
    dense = copy.deepcopy(model)
    uncompensated, measured = copy.deepcopy(model), copy.deepcopy(model)
    report = slimcore.prune(model, x, ratio=0.3)  # constants derived from the BN parameters
    measured_report = slimcore.prune(measured, x, ratio=0.3, check_compensation=True)  # ... and measured
    slimcore.prune(uncompensated, x, ratio=0.3, compensate=False)
    with torch.no_grad():
        scale = float(dense(x).abs().max())
    assert report.compensated, "dead channels with nonzero beta must be compensated"
    assert report.compensated == measured_report.compensated
    assert max_error(model, dense, x) <= 1e-5 * max(scale, 1.0)
    assert max_error(measured, dense, x) <= 1e-5 * max(scale, 1.0)
    assert measured_report.compensation_max_error <= 1e-5 * max(scale, 1.0)
    assert max_error(uncompensated, dense, x) > 1e-3 * scale  # without it the function changes
    assert (report.flops_after, report.params_after) == slimcore.profile(model, x)


@pytest.mark.parametrize("name,build,shape", MODELS[:6], ids=[m[0] for m in MODELS[:6]])
def test_nearly_dead_channels_get_closer(name, build, shape):
    x = torch.randn(shape)
    model = kill_classes(randomize_batchnorms(build()).eval(), x, dead_value=0.02, seed=1)
    dense, plain = copy.deepcopy(model), copy.deepcopy(model)
    slimcore.prune(model, x, ratio=0.3)
    slimcore.prune(plain, x, ratio=0.3, compensate=False)
    assert max_error(model, dense, x) < max_error(plain, dense, x)


def test_border_exactness_needs_the_map():
    # A 3x3 zero-padded conv on a 4x4 map: 12 of 16 positions are border. A bias alone is wrong there.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(3, 3, 4, 4)
    model = kill_classes(randomize_batchnorms(model).eval(), x, share=0.6, seed=3)
    dense = copy.deepcopy(model)
    report = slimcore.prune(model, x, ratio=0.25)
    assert isinstance(model[3], slimcore.nn.CompensatedConv2d)
    assert max_error(model, dense, x) < 1e-5
    assert report.compensated == {"3": len(report.removed["0"])}


def test_compensated_model_saves_exports_folds_and_prunes_again(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    model = kill_classes(randomize_batchnorms(seed_models.build("vgg11")).eval(), x)
    dense = copy.deepcopy(model)
    slimcore.prune(model, x, ratio=0.3)
    assert any(isinstance(m, slimcore.nn.CompensatedConv2d) for m in model.modules())
    path = tmp_path / "vgg.pt"
    slimcore.save_pruned(model, path, meta={"model": "vgg11"})
    loaded = slimcore.load_pruned(path).eval()
    assert max_error(loaded, model, x) == 0.0
    exported = torch.export.export(model, (x,)).module()
    assert max_error(exported, model, x) < 1e-6
    folded = copy.deepcopy(model)
    slimcore.fold_bn(folded, x)
    assert max_error(folded, dense, x) < 1e-4
    again = slimcore.prune(model, x, ratio=0.2, compensate=False)  # a CompensatedConv prunes like a conv
    assert again.channels_removed > 0
    assert (again.flops_after, again.params_after) == slimcore.profile(model, x)


def test_dry_run_counts_the_added_biases():
    x = torch.randn(2, 1, 28, 28)
    model = kill_classes(randomize_batchnorms(seed_models.build("mlp", in_channels=1, input_size=28)).eval(), x)
    dry = slimcore.prune(copy.deepcopy(model), x, ratio=0.3, dry_run=True)
    real = slimcore.prune(model, x, ratio=0.3)
    assert (dry.params_after, dry.flops_after) == (real.params_after, real.flops_after)


fashion = pytest.mark.skipif(not os.path.exists(os.path.join(data.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")),
                             reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@fashion
@pytest.mark.parametrize("name,kwargs,n_train,lam", [("mlp", {"in_channels": 1, "input_size": 28}, 6000, 3e-2),
                                                     ("vgg11", {"in_channels": 1, "width": 0.25}, 6000, 2e-2)])
def test_proximal_training_then_pruning_keeps_the_accuracy(tmp_path, name, kwargs, n_train, lam):
    train, _, test, spec = data.datasets("fashion-mnist")
    train = data.ArrayDataset(train.images[:n_train], train.labels[:n_train])
    test = data.ArrayDataset(test.images[:1000], test.labels[:1000])
    torch.manual_seed(0)
    model = seed_models.build(name, **kwargs)
    s = Settings(epochs=2, batch_size=64, lr=0.05, lam=lam, mode="proximal", quiet=True)
    fit(model, data.Loader(train, spec, 64, train=True), None, None, s, str(tmp_path),
        model_meta(name, kwargs, "fashion-mnist", [1, 28, 28]), torch.device("cpu"))
    gammas = torch.cat([m.weight.detach() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)])
    zero_share = float((gammas == 0).float().mean())
    assert zero_share > 0.1, f"proximal L1 should zero many gammas exactly, got {zero_share:.2f}"
    test_loader = data.Loader(test, spec, 500)
    acc_dense, _ = evaluate(model, test_loader, torch.device("cpu"))
    x = torch.zeros(1, 1, 28, 28)
    report = slimcore.prune(model.eval(), x, ratio=0.9 * zero_share)
    acc_pruned, _ = evaluate(model, test_loader, torch.device("cpu"))
    assert report.params_after < 0.95 * report.params_before
    assert acc_pruned == acc_dense, "removing exactly-dead channels must not change a single prediction"
