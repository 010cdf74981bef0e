"""slimcore.profile (slimcore/pruning/profile.py) against fvcore's conv+linear counts and ptflops' params."""

import logging
import warnings

import pytest
import torch
import torchvision

import slimcore
import slimcore.models as seed_models

fvcore_nn = pytest.importorskip("fvcore.nn")
ptflops = pytest.importorskip("ptflops")

MODELS = [
    ("resnet18", lambda: torchvision.models.resnet18(), (1, 3, 64, 64)),
    ("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(), (1, 3, 64, 64)),  # depthwise
    ("resnext50_32x4d", lambda: torchvision.models.resnext50_32x4d(), (1, 3, 64, 64)),  # grouped
    ("densenet121", lambda: torchvision.models.densenet121(), (1, 3, 64, 64)),
    ("vgg16", lambda: seed_models.build("vgg16"), (1, 3, 32, 32)),
    ("preresnet164", lambda: seed_models.build("preresnet164"), (1, 3, 32, 32)),
    ("densenet40", lambda: seed_models.build("densenet40"), (1, 3, 32, 32)),
    ("lenet5", lambda: seed_models.build("lenet5", in_channels=1, input_size=28), (1, 1, 28, 28)),
    ("mlp", lambda: seed_models.build("mlp", in_channels=1, input_size=28), (1, 1, 28, 28)),
]


@pytest.mark.parametrize("name,build,shape", MODELS, ids=[m[0] for m in MODELS])
def test_profile_matches_fvcore_and_ptflops(name, build, shape):
    model = build().eval()
    x = torch.randn(shape)
    flops, params = slimcore.profile(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            analysis = fvcore_nn.FlopCountAnalysis(model, x)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            by_op = analysis.by_operator()
            _, ptflops_params = ptflops.get_model_complexity_info(
                model, tuple(shape[1:]), as_strings=False, print_per_layer_stat=False, verbose=False)
        finally:
            logging.disable(logging.NOTSET)
    assert flops == by_op.get("conv", 0) + by_op.get("linear", 0) + by_op.get("addmm", 0)
    assert params == ptflops_params


def test_profile_is_per_sample_and_matches_the_seed_figure():
    model = seed_models.build("vgg16").eval()
    one = slimcore.profile(model, torch.randn(1, 3, 32, 32))
    assert slimcore.profile(model, torch.randn(4, 3, 32, 32)) == one
    # Li et al., ICLR 2017, Table 1: VGG-16 on CIFAR-10 has 3.13e8 FLOPs (multiply-accumulates of conv and FC layers).
    assert one[0] == pytest.approx(3.137e8, rel=0.01)
