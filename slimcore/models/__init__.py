"""Seed architectures for network slimming: CIFAR VGG, pre-activation ResNet, DenseNet (as in the
network-slimming reference repo, Eric-mingjie/network-slimming), LeNet-5 and the paper's MNIST MLP.

Every model takes ``num_classes``, ``in_channels`` and ``width`` (a channel multiplier: each hidden count c
becomes ``max(1, round(c * width))``) and runs on 28x28 and 32x32 inputs; LeNet-5 and the MLP also take
``input_size`` because their linear layers depend on it. ``build(name, ...)`` makes one by name.
"""

from .densenet import DenseNet, densenet40
from .lenet import LeNet5, lenet5
from .mlp import MLP, mlp
from .preresnet import PreResNet, preresnet56, preresnet110, preresnet164
from .vgg import VGG, vgg11, vgg13, vgg16, vgg19

MODELS = {
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "preresnet56": preresnet56,
    "preresnet110": preresnet110,
    "preresnet164": preresnet164,
    "densenet40": densenet40,
    "lenet5": lenet5,
    "mlp": mlp,
}
NAMES = tuple(MODELS)

# The models whose layer sizes depend on the input resolution; the others pool adaptively.
_TAKE_INPUT_SIZE = frozenset({"lenet5", "mlp"})


def build(name, num_classes=10, in_channels=3, width=1.0, input_size=32, **kwargs):
    """The model ``name`` (one of ``NAMES``); ``input_size`` goes only to the models that need it, and
    ``kwargs`` to the model's constructor (e.g. ``batch_norm=False`` for lenet5, ``cfg=`` for vgg)."""
    if not isinstance(name, str) or name.lower() not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(NAMES)}")
    name = name.lower()
    if name in _TAKE_INPUT_SIZE:
        kwargs["input_size"] = input_size
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, width=width, **kwargs)


__all__ = [
    "MODELS",
    "NAMES",
    "build",
    "VGG",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "PreResNet",
    "preresnet56",
    "preresnet110",
    "preresnet164",
    "DenseNet",
    "densenet40",
    "LeNet5",
    "lenet5",
    "MLP",
    "mlp",
]
