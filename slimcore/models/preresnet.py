"""Pre-activation ResNet for CIFAR (He et al., *Identity Mappings in Deep Residual Networks*, ECCV 2016),
as in the network-slimming reference repo (Eric-mingjie/network-slimming, models/preresnet.py) without its
channel_selection layers: every BatchNorm sits in front of a conv, so its scaling factors gate that conv's
input channels."""

import torch
from torch import nn

from ._utils import check, check_width, init_weights, scaled


def _shortcut(in_planes, out_planes, stride):
    # A bare strided 1x1 conv, no BN, as in the reference.
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """BN-ReLU-conv3x3(stride), BN-ReLU-conv3x3, plus the shortcut of the block input."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes, stride)

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return out + residual


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1(planes), BN-ReLU-conv3x3(planes, stride), BN-ReLU-conv1x1(4*planes), plus the shortcut."""

    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, out_planes, stride)

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return out + residual


def _block_and_count(depth):
    ok = isinstance(depth, int) and not isinstance(depth, bool)
    if ok and depth < 164 and depth >= 8 and (depth - 2) % 6 == 0:
        return BasicBlock, (depth - 2) // 6
    if ok and depth >= 164 and (depth - 2) % 9 == 0:
        return Bottleneck, (depth - 2) // 9
    raise ValueError(
        "PreResNet depth must be 6n+2 below 164 (BasicBlock, e.g. 20, 56, 110) or 9n+2 from 164 up "
        f"(Bottleneck, e.g. 164, 1001), got depth={depth!r}"
    )


def _stage(block, in_planes, planes, blocks, stride):
    """``blocks`` blocks of base width ``planes``, the first with ``stride``, and the stage's output channels."""
    out_planes = planes * block.expansion
    layers = [block(in_planes, planes, stride)] + [block(out_planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers), out_planes


class PreResNet(nn.Module):
    """PreResNet-``depth``: conv3x3 stem (16), three stages of base planes 16, 32, 64 at strides 1, 2, 2,
    then BN-ReLU, global average pooling and a linear classifier.

    Depth 6n+2 below 164 uses n BasicBlocks per stage (56, 110); 9n+2 from 164 up uses n Bottlenecks
    (164: n = 18, 256 output channels). Init follows the reference: Kaiming-normal convs, BN gamma 0.5
    (the reference repo's choice, not PyTorch's 1), BN beta 0, PyTorch's default linear init.
    """

    def __init__(self, depth=164, num_classes=10, in_channels=3, width=1.0):
        super().__init__()
        check_width(width)
        block, n = _block_and_count(depth)
        planes = scaled(16, width)
        self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        self.layer1, planes = _stage(block, planes, scaled(16, width), n, stride=1)
        self.layer2, planes = _stage(block, planes, scaled(32, width), n, stride=2)
        self.layer3, planes = _stage(block, planes, scaled(64, width), n, stride=2)
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        init_weights(self, bn_weight=0.5)

    def forward(self, x):
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def preresnet56(**kwargs):
    return PreResNet(depth=56, **kwargs)


def preresnet110(**kwargs):
    return PreResNet(depth=110, **kwargs)


def preresnet164(**kwargs):
    return PreResNet(depth=164, **kwargs)
