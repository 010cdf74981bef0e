"""LeNet-5 in the Caffe form (20 and 50 5x5 filters, 500 hidden units) used by the seed papers, with
optional BatchNorm after each conv and the hidden linear layer so network slimming has scaling factors
to penalise."""

import torch
from torch import nn

from ._utils import check, check_width, init_weights, scaled


def _feature_size(input_size):
    # Two (conv5x5 valid, maxpool 2) stages: 28 -> 24 -> 12 -> 8 -> 4, 32 -> 28 -> 14 -> 10 -> 5.
    ok = isinstance(input_size, int) and not isinstance(input_size, bool) and input_size >= 16
    check(ok, f"LeNet5 input_size must be an int >= 16 (two 5x5 convs and 2x2 pools), got input_size={input_size!r}")
    return ((input_size - 4) // 2 - 4) // 2


class LeNet5(nn.Module):
    """Conv5x5(20)-[BN]-ReLU-MaxPool2, Conv5x5(50)-[BN]-ReLU-MaxPool2, Linear(500)-[BN1d]-ReLU, Linear.

    ``input_size`` (28 for MNIST, 32 for CIFAR) fixes the flattened feature size 50*s*s (s = 4 or 5).
    With ``batch_norm`` the convs are bias-free (the BN shift replaces the bias); the linear layers keep
    their biases, as in the MLP. Init: Kaiming-normal convs, BN gamma 1, biases 0, default linear init.
    """

    def __init__(self, num_classes=10, in_channels=1, width=1.0, input_size=28, batch_norm=True):
        super().__init__()
        check_width(width)
        s = _feature_size(input_size)
        c1, c2, hidden = scaled(20, width), scaled(50, width), scaled(500, width)

        def norm2d(c):
            return nn.BatchNorm2d(c) if batch_norm else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, bias=not batch_norm),
            norm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, bias=not batch_norm),
            norm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(c2 * s * s, hidden),
            nn.BatchNorm1d(hidden) if batch_norm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        init_weights(self, bn_weight=1.0)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.classifier(x)


def lenet5(**kwargs):
    return LeNet5(**kwargs)
