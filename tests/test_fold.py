"""slimcore.fold_bn (slimcore/inference/fold.py): folding coupled BNs into their conv/linear keeps the
eval-mode function, also on pruned models, and leaves selection BNs and reused modules alone."""

import copy

import pytest
import torch
import torchvision
from helpers import randomize_batchnorms
from torch import nn

import slimcore
import slimcore.models as seed_models

CASES = [
    ("resnet18", lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)),
    ("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 64, 64)),
    ("vgg19", lambda: seed_models.build("vgg19"), (2, 3, 32, 32)),
    ("preresnet164", lambda: seed_models.build("preresnet164"), (2, 3, 32, 32)),
    ("mlp", lambda: seed_models.build("mlp", in_channels=1, input_size=28), (2, 1, 28, 28)),
]


@pytest.mark.parametrize("prune_first", [False, True])
@pytest.mark.parametrize("name,build,shape", CASES, ids=[c[0] for c in CASES])
def test_folding_keeps_the_function(name, build, shape, prune_first):
    model = randomize_batchnorms(build()).eval()
    x = torch.randn(shape)
    if prune_first:
        slimcore.prune(model, x, ratio=0.5)
    dense = copy.deepcopy(model)
    bns_before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    folded = slimcore.fold_bn(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-4)
    bns_after = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert bns_before - bns_after == len(folded)
    if name in ("resnet18", "mobilenet_v2", "vgg19", "mlp"):
        assert bns_after == 0, "every BN follows a conv/linear here"
    if name == "preresnet164":
        assert bns_after > 0, "pre-activation BNs read the residual stream: not foldable"


def test_a_reused_conv_is_not_folded():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn1 = nn.BatchNorm2d(4)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn1(self.conv(x)) + self.bn2(self.conv(x))

    model = randomize_batchnorms(Twice()).eval()
    x = torch.randn(2, 4, 5, 5)
    want = model(x)
    assert slimcore.fold_bn(model, x) == []
    torch.testing.assert_close(model(x), want)


def test_fold_needs_eval_mode():
    with pytest.raises(ValueError, match="eval mode"):
        slimcore.fold_bn(seed_models.build("vgg11").train(), torch.randn(1, 3, 32, 32))
