"""slimcore.models: shapes at 28x28 and 32x32, the width multiplier, fx tracing, init, argument checks, and
parameter counts against the published numbers."""

import math

import pytest
import torch
from torch import nn

import slimcore.models as models

NAMES = list(models.MODELS)


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("size, in_channels", [(28, 1), (32, 3)])
@pytest.mark.parametrize("name", NAMES)
def test_forward_shape(name, size, in_channels):
    # num_classes=7 catches a hard-coded 10.
    torch.manual_seed(0)
    model = models.build(name, num_classes=7, in_channels=in_channels, input_size=size)
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_width_halves_hidden_layers(name):
    full, half = models.build(name), models.build(name, width=0.5)
    full_layers, half_layers = _layers(full), _layers(half)
    assert len(full_layers) == len(half_layers)
    first = half_layers[0]
    assert first.weight.shape[1] == (3 if isinstance(first, nn.Conv2d) else 3 * 32 * 32)  # the input is not scaled
    # Every hidden count in these models is even, so width 0.5 halves each exactly.
    for f, h in zip(full_layers[:-1], half_layers[:-1]):
        if isinstance(f, nn.Conv2d):
            assert h.out_channels * 2 == f.out_channels, (f, h)
        else:
            assert h.out_features * 2 == f.out_features, (f, h)
    assert half_layers[-1].out_features == 10
    assert half(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_width_spot_checks():
    assert models.vgg19(width=0.5).features[0].out_channels == 32
    assert models.preresnet164(width=0.5).layer3[0].conv3.out_channels == 128
    net = models.densenet40(width=0.5)
    assert net.conv1.out_channels == 12 and net.dense1[0].conv1.out_channels == 6
    assert models.lenet5(width=0.5).features[4].out_channels == 25
    assert models.mlp(width=0.5).features[0].out_features == 250
    assert models.vgg11(width=0.01).features[0].out_channels == 1  # never rounds to 0 channels


@pytest.mark.parametrize("name", NAMES)
def test_fx_symbolic_trace(name):
    torch.manual_seed(0)
    model = models.build(name, width=0.25).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(traced(x), model(x))


def _channel_selection_params(model):
    # The reference repo puts a channel_selection layer (one nn.Parameter per channel) after each block's
    # first BN and after the final BN, and counts those in its README's totals.
    return sum(m.num_features for n, m in model.named_modules() if n == "bn" or n.endswith(".bn1"))


# (model, published parameter count in millions, whether that count includes the reference repo's
# channel_selection parameters, source). Published to two decimals, so they must agree to within 0.005M.
PUBLISHED = [
    pytest.param(models.vgg19, 20.04, False, "network-slimming paper Table 1 and reference repo README", id="vgg19"),
    pytest.param(models.preresnet164, 1.70, False, "network-slimming paper Table 1", id="preresnet164-paper"),
    pytest.param(models.preresnet164, 1.71, True, "reference repo README", id="preresnet164-repo"),
    pytest.param(models.densenet40, 1.07, True, "reference repo README", id="densenet40-repo"),
    # The paper's Torch DenseNet-40 used a 16-channel stem (DenseNet paper: "16, or twice the growth rate
    # for DenseNet-BC"); the PyTorch reference uses 2 * growth = 24.
    pytest.param(lambda: models.densenet40(stem_channels=16), 1.02, False, "network-slimming paper Table 1",
                 id="densenet40-paper"),
]


@pytest.mark.parametrize("make, published, with_selection, source", PUBLISHED)
def test_published_parameter_counts(make, published, with_selection, source):
    model = make()
    count = _params(model) + (_channel_selection_params(model) if with_selection else 0)
    assert abs(count - published * 1e6) <= 0.005e6, f"{count} parameters vs {published}M ({source})"


def test_published_counts_exact():
    # Pinned so that an accidental architecture change shows up; they agree with PUBLISHED above.
    assert _params(models.vgg19()) == 20_035_018
    assert _params(models.preresnet164()) == 1_703_258
    assert _params(models.densenet40()) == 1_059_298


def test_mlp_parameter_count():
    expected = 784 * 500 + 500 + 2 * 500 + 500 * 300 + 300 + 2 * 300 + 300 * 10 + 10
    assert _params(models.mlp()) == expected
    assert _params(models.build("mlp", in_channels=1, input_size=28)) == expected


def test_lenet5_parameter_count():
    expected = 20 * 25 + 20 + 50 * 20 * 25 + 50 + 800 * 500 + 500 + 500 * 10 + 10
    assert _params(models.lenet5(batch_norm=False)) == expected
    # With BN: conv biases go (BN's shift replaces them), BN adds 2 per channel.
    with_bn = expected - 20 - 50 + 2 * (20 + 50 + 500)
    assert _params(models.lenet5()) == with_bn


def test_lenet5_input_size():
    assert models.lenet5(input_size=28).classifier[0].in_features == 50 * 4 * 4
    assert models.lenet5(input_size=32).classifier[0].in_features == 50 * 5 * 5
    net = models.build("lenet5", in_channels=3, input_size=32)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_init():
    torch.manual_seed(0)
    for name, gamma in [("vgg11", 0.5), ("preresnet56", 0.5), ("densenet40", 0.5), ("lenet5", 1.0), ("mlp", 1.0)]:
        model = models.build(name)
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                assert torch.all(m.weight == gamma) and torch.all(m.bias == 0), name
            if isinstance(m, nn.Conv2d):
                assert m.bias is None or torch.all(m.bias == 0), name
    conv = models.vgg19().features[-3]  # 512 -> 512, 3x3: 2.4M samples
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 512)), rel=0.01)


def test_preresnet_blocks_and_shortcuts():
    net = models.preresnet56(width=0.25)
    assert all(len(stage) == 9 and isinstance(stage[0], models.preresnet.BasicBlock)
               for stage in (net.layer1, net.layer2, net.layer3))
    assert net.layer1[0].downsample is None
    net = models.preresnet164(width=0.25)
    assert all(len(stage) == 18 and isinstance(stage[0], models.preresnet.Bottleneck)
               for stage in (net.layer1, net.layer2, net.layer3))
    assert isinstance(net.layer1[0].downsample, nn.Conv2d) and net.layer1[0].downsample.stride == (1, 1)
    assert net.fc.in_features == 64

    # The projection shortcut takes the block's input x, not its pre-activated BN-ReLU output.
    block = net.layer2[0]
    seen = {}
    block.register_forward_pre_hook(lambda m, args: seen.__setitem__("block", args[0].clone()))
    block.downsample.register_forward_pre_hook(lambda m, args: seen.__setitem__("shortcut", args[0].clone()))
    net(torch.randn(2, 3, 32, 32))
    assert block.downsample.stride == (2, 2)
    torch.testing.assert_close(seen["shortcut"], seen["block"], rtol=0, atol=0)


def test_vgg_cfg_override():
    net = models.VGG(cfg=[8, "M", 16], num_classes=5, width=1.0)
    assert [m.out_channels for m in net.features if isinstance(m, nn.Conv2d)] == [8, 16]
    assert net.classifier.in_features == 16
    assert net(torch.randn(2, 3, 28, 28)).shape == (2, 5)


@pytest.mark.parametrize("make, match", [
    pytest.param(lambda: models.build("resnet50"), "unknown model 'resnet50'.*vgg11.*preresnet56.*densenet40.*mlp",
                 id="name"),
    pytest.param(lambda: models.VGG(depth=15), "VGG depth must be one of .*got depth=15", id="vgg-depth"),
    pytest.param(lambda: models.PreResNet(depth=100), "PreResNet depth .*got depth=100", id="preresnet-depth-100"),
    pytest.param(lambda: models.PreResNet(depth=165), "PreResNet depth .*got depth=165", id="preresnet-depth-165"),
    pytest.param(lambda: models.DenseNet(depth=41), "DenseNet depth must be 3n\\+4.*got depth=41", id="densenet-depth"),
    pytest.param(lambda: models.lenet5(input_size=12), "LeNet5 input_size .*got input_size=12", id="lenet-input-size"),
    pytest.param(lambda: models.build("lenet5", input_size=12), "LeNet5 input_size .*got input_size=12",
                 id="build-lenet-input-size"),
    pytest.param(lambda: models.build("vgg19", width=0), "width must be .*got width=0", id="width-0"),
    pytest.param(lambda: models.mlp(width=-1.0), "width must be .*got width=-1.0", id="width-negative"),
])
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
