"""Helpers shared by the model definitions: the width multiplier, argument checks, weight init."""

import math

from torch import nn


def check(ok, message):
    if not ok:
        raise ValueError(message)


def check_width(width):
    ok = isinstance(width, (int, float)) and not isinstance(width, bool) and math.isfinite(width) and width > 0
    check(ok, f"width must be a finite number > 0, got width={width!r}")


def scaled(channels, width):
    """``channels`` times the width multiplier, rounded, at least 1."""
    return max(1, int(round(channels * width)))


def init_weights(model, bn_weight, linear_std=None):
    """Kaiming-normal convs (fan_out, as the reference's ``normal_(0, sqrt(2 / (k*k*out)))``), BatchNorm
    weight ``bn_weight`` and bias 0, conv biases 0. Linear layers get ``normal_(0, linear_std)`` and bias 0
    when ``linear_std`` is given, else keep PyTorch's default init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.constant_(m.weight, bn_weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
