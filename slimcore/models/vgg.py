"""CIFAR-style VGG with BatchNorm, as in the network-slimming reference repo
(Eric-mingjie/network-slimming, models/vgg.py): 3x3 conv-BN-ReLU stacks, four 2x2 max-pools, global
average pooling and a single linear classifier."""

import torch
from torch import nn

from ._utils import check, check_width, init_weights, scaled

CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class VGG(nn.Module):
    """VGG-``depth`` (11, 13, 16, 19) with BatchNorm after every conv.

    ``cfg`` (channel counts and ``"M"`` for max-pool) replaces the depth's list, e.g. to rebuild a pruned
    network; ``width`` scales it too (width 1 leaves it unchanged). Init follows the reference: Kaiming-normal
    convs, BN gamma 0.5 (the reference repo's choice, not PyTorch's 1), linear N(0, 0.01), biases 0.
    The reference ends with AvgPool2d(2) on the 2x2 map; AdaptiveAvgPool2d(1) is the same there and also
    handles 28x28 inputs (1x1 map).
    """

    def __init__(self, depth=19, num_classes=10, in_channels=3, width=1.0, cfg=None):
        super().__init__()
        check_width(width)
        if cfg is None:
            check(depth in CFGS, f"VGG depth must be one of {sorted(CFGS)}, got depth={depth!r}")
            cfg = CFGS[depth]
        check(any(v != "M" for v in cfg), f"VGG cfg needs at least one conv channel count, got cfg={cfg!r}")
        layers = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out = scaled(v, width)
                conv = nn.Conv2d(channels, out, 3, padding=1, bias=False)
                layers += [conv, nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self, bn_weight=0.5, linear_std=0.01)

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


def vgg11(**kwargs):
    return VGG(depth=11, **kwargs)


def vgg13(**kwargs):
    return VGG(depth=13, **kwargs)


def vgg16(**kwargs):
    return VGG(depth=16, **kwargs)


def vgg19(**kwargs):
    return VGG(depth=19, **kwargs)
