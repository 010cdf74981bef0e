"""DenseNet for CIFAR (Huang et al., *Densely Connected Convolutional Networks*, CVPR 2017), as in the
network-slimming reference repo (Eric-mingjie/network-slimming, models/densenet.py) without its
channel_selection layers: basic (non-bottleneck) layers, compression 1 by default."""

import torch
from torch import nn

from ._utils import check, check_width, init_weights, scaled


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3(in, growth); the output is the input with the ``growth`` new channels appended."""

    def __init__(self, in_planes, growth_rate):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, growth_rate, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1(in, out)-AvgPool2d(2) between dense blocks."""

    def __init__(self, in_planes, out_planes):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(self.conv1(self.relu(self.bn1(x))))


def _dense_block(in_planes, growth_rate, layers):
    """``layers`` DenseLayers and the block's output channel count."""
    block = nn.Sequential(*(DenseLayer(in_planes + i * growth_rate, growth_rate) for i in range(layers)))
    return block, in_planes + layers * growth_rate


def _transition(in_planes, compression):
    out_planes = int(in_planes // compression)
    return Transition(in_planes, out_planes), out_planes


class DenseNet(nn.Module):
    """DenseNet-``depth`` (3n+4) with growth rate ``growth_rate``: conv3x3 stem, three dense blocks of n layers
    with transitions (out = in // compression) between them, then BN-ReLU, global average pooling and a
    linear classifier. ``width`` scales the growth rate and the stem.

    The stem has ``stem_channels`` outputs, by default 2 * growth_rate as in the PyTorch reference (1.06M
    parameters for DenseNet-40). The original Torch DenseNet, whose DenseNet-40 the network-slimming paper
    reports as 1.02M parameters, used 16 for the non-bottleneck model: pass ``stem_channels=16`` for that.

    Init follows the reference: Kaiming-normal convs, BN gamma 0.5 (the reference repo's choice, not
    PyTorch's 1), BN beta 0, PyTorch's default linear init.
    """

    def __init__(self, depth=40, growth_rate=12, num_classes=10, in_channels=3, width=1.0, compression=1,
                 stem_channels=None):
        super().__init__()
        check_width(width)
        ok = isinstance(depth, int) and not isinstance(depth, bool) and depth >= 7 and (depth - 4) % 3 == 0
        check(ok, f"DenseNet depth must be 3n+4 with n >= 1 (e.g. 40, 100), got depth={depth!r}")
        ok = isinstance(growth_rate, int) and not isinstance(growth_rate, bool) and growth_rate >= 1
        check(ok, f"DenseNet growth_rate must be an int >= 1, got growth_rate={growth_rate!r}")
        # compression divides the transition's channels (the reference's compressionRate), so 1 keeps them all.
        check(compression >= 1, f"DenseNet compression must be >= 1, got compression={compression!r}")
        n = (depth - 4) // 3
        growth = scaled(growth_rate, width)
        planes = scaled(2 * growth_rate if stem_channels is None else stem_channels, width)
        self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        self.dense1, planes = _dense_block(planes, growth, n)
        self.trans1, planes = _transition(planes, compression)
        self.dense2, planes = _dense_block(planes, growth, n)
        self.trans2, planes = _transition(planes, compression)
        self.dense3, planes = _dense_block(planes, growth, n)
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        init_weights(self, bn_weight=0.5)

    def forward(self, x):
        x = self.conv1(x)
        x = self.trans1(self.dense1(x))
        x = self.trans2(self.dense2(x))
        x = self.dense3(x)
        x = self.relu(self.bn(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def densenet40(**kwargs):
    return DenseNet(depth=40, growth_rate=12, **kwargs)
