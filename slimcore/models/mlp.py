"""The network-slimming paper's MNIST MLP (Liu et al., ICCV 2017, Sec. 5): 784-500-300-10 with
BatchNorm1d after each hidden layer, whose scaling factors slimming prunes as neurons."""

import torch
from torch import nn

from ._utils import check, check_width, init_weights, scaled


class MLP(nn.Module):
    """Flatten (N, C, H, W), then Linear-BN1d-ReLU for each ``hidden`` size and a linear classifier.

    The input has ``in_channels * input_size**2`` features (784 for MNIST). Init: BN gamma 1, beta 0,
    PyTorch's default linear init.
    """

    def __init__(self, num_classes=10, in_channels=1, width=1.0, input_size=28, hidden=(500, 300)):
        super().__init__()
        check_width(width)
        ok = isinstance(input_size, int) and not isinstance(input_size, bool) and input_size >= 1
        check(ok, f"MLP input_size must be an int >= 1, got input_size={input_size!r}")
        check(len(hidden) >= 1, f"MLP needs at least one hidden layer, got hidden={hidden!r}")
        layers = []
        features = in_channels * input_size * input_size
        for h in hidden:
            h = scaled(h, width)
            layers += [nn.Linear(features, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            features = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(features, num_classes)
        init_weights(self, bn_weight=1.0)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.classifier(self.features(x))


def mlp(**kwargs):
    return MLP(**kwargs)
