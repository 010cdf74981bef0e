"""slimcore.deploy (slimcore/inference/deploy.py): the inference form computes what the eval-mode model
computes (seed and torchvision models, dense and pruned), replaces every BN that cannot fold by one
ChannelAffine with the activation fused only where the graph shows the BN is read by that
activation alone, leaves the input model untouched, and exports (torch.export; ONNX Runtime for
the portable form)."""

import copy

import pytest
import torch
import torchvision
from helpers import devices, randomize_batchnorms
from torch import nn

import slimcore
import slimcore.models as seed_models
from slimcore.nn import ChannelAffine

CASES = [
    ("vgg11", lambda: seed_models.build("vgg11", width=0.5), (4, 3, 32, 32)),
    ("preresnet56", lambda: seed_models.build("preresnet56"), (4, 3, 32, 32)),
    ("preresnet164", lambda: seed_models.build("preresnet164", width=0.5), (2, 3, 32, 32)),
    ("densenet40", lambda: seed_models.build("densenet40"), (2, 3, 32, 32)),
    ("lenet5", lambda: seed_models.build("lenet5", in_channels=1, input_size=28), (4, 1, 28, 28)),
    ("mlp", lambda: seed_models.build("mlp", in_channels=1, input_size=28), (4, 1, 28, 28)),
    ("resnet18", lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)),
    ("mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (2, 3, 64, 64)),
    ("densenet121", lambda: torchvision.models.densenet121(num_classes=10), (1, 3, 64, 64)),
]
# Models whose BNs read tensors other layers read too (pre-activation, concatenations).
UNFOLDABLE = {"preresnet56", "preresnet164", "densenet40", "densenet121"}


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
@pytest.mark.parametrize("name,build,shape", CASES, ids=[c[0] for c in CASES])
def test_deploy_computes_the_models_function(name, build, shape, pruned):
    model = randomize_batchnorms(build()).eval()
    x = torch.randn(shape)
    if pruned:
        slimcore.prune(model, x, ratio=0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with torch.no_grad():
        want = model(x)
    deployed = slimcore.deploy(model, x, timing_rounds=1)
    with torch.no_grad():
        got = deployed(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the input model is untouched
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # no BatchNorm is left: each folded or became a ChannelAffine
    report = deployed.deploy_report
    assert not batchnorms(deployed)
    assert len(report["folded"]) + len(report["fused"]) == len(batchnorms(model))
    affine = [m for m in deployed.modules() if isinstance(m, ChannelAffine)]
    assert len(affine) == len(report["fused"])
    assert report["traced"]
    if name in UNFOLDABLE:
        assert affine, "pre-activation / concatenation BNs cannot fold"
        # each of them is read by a ReLU alone: fused (torchvision's densenet calls F.relu / nn.ReLU)
        assert set(report["activations"].values()) == {"relu"}
        assert len(report["activations"]) == len(affine)
        assert all(m.activation == "relu" for m in affine)
        if pruned and name != "densenet121":
            assert any(m.index is not None for m in affine), "selection BNs gather their channels"
    assert report["memory_format"] in ("contiguous", "channels_last")
    if any(p.dim() == 4 for p in model.parameters()):  # convs: both formats timed
        assert set(report["format_ms"]) == {"contiguous", "channels_last"}
    else:
        assert report["format_ms"] is None and report["memory_format"] == "contiguous"


def test_activation_fused_only_when_it_alone_reads_the_bn():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn_a = nn.BatchNorm2d(4)  # read by relu and by the add: stays separate
            self.bn_b = nn.BatchNorm2d(4)  # read by relu6 alone: fused
            self.bn_c = nn.BatchNorm2d(4)  # read by a sigmoid: not a fused activation
            self.bn_d = nn.BatchNorm2d(4)  # called twice: one shared module, no fusion
            self.act = nn.ReLU6()

        def forward(self, x):
            a = self.bn_a(x)
            y = torch.relu(a) + a
            y = self.act(self.bn_b(y))
            y = torch.sigmoid(self.bn_c(y))
            return torch.relu(self.bn_d(y)) + torch.relu(self.bn_d(y * 2))

    model = randomize_batchnorms(Block()).eval()
    x = torch.randn(2, 4, 5, 5)
    deployed = slimcore.deploy(model, x, timing_rounds=1)
    report = deployed.deploy_report
    assert report["activations"] == {"bn_b": "relu6"}
    assert sorted(report["fused"]) == ["bn_a", "bn_b", "bn_c", "bn_d"]
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x))


def test_untraceable_model_is_deployed_module_by_module():
    class ValueBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = torch.relu(self.bn(x))
            if y.sum() > 0:  # control flow on a value: torch.fx cannot trace it
                y = y * 2
            return self.conv(y)

    model = randomize_batchnorms(ValueBranch()).eval()
    x = torch.randn(2, 3, 6, 6)
    deployed = slimcore.deploy(model, x, memory_format="contiguous")
    assert deployed.deploy_report["traced"] is False
    assert deployed.deploy_report["fused"] == ["bn"] and deployed.deploy_report["activations"] == {}
    assert isinstance(deployed.bn, ChannelAffine)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x))


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_explicit_memory_format(memory_format):
    model = randomize_batchnorms(seed_models.build("preresnet56", width=0.5)).eval()
    x = torch.randn(2, 3, 32, 32)
    slimcore.prune(model, x, ratio=0.4)
    deployed = slimcore.deploy(model, x, memory_format=memory_format)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    assert deployed.conv1.weight.is_contiguous(memory_format=fmt)
    assert deployed.deploy_report["memory_format"] == memory_format and deployed.deploy_report["format_ms"] is None
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-4)


def test_portable_form_uses_no_slimcore_op_and_computes_the_same():
    model = randomize_batchnorms(seed_models.build("densenet40", width=0.5)).eval()
    x = torch.randn(2, 3, 32, 32)
    slimcore.prune(model, x, ratio=0.5)
    fast = slimcore.deploy(model, x, memory_format="contiguous")
    portable = slimcore.deploy(model, x, memory_format="contiguous", portable=True)
    with torch.no_grad():
        torch.testing.assert_close(portable(x), fast(x), rtol=1e-5, atol=1e-5)
    ops = {str(n.target) for n in torch.export.export(portable, (x,)).graph.nodes if n.op == "call_function"}
    assert not any("slimcore" in op for op in ops)


def test_torch_export_round_trip():
    model = randomize_batchnorms(seed_models.build("preresnet56", width=0.5)).eval()
    x = torch.randn(2, 3, 32, 32)
    slimcore.prune(model, x, ratio=0.5)
    deployed = slimcore.deploy(model, x, memory_format="contiguous")
    program = torch.export.export(deployed, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("slimcore.channel_affine" in t for t in targets) == len(deployed.deploy_report["fused"])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-4)
    # saved and loaded. torch.export.load falls back from weights_only loading here and logs that
    # with a malformed format string (torch 2.14), which pytest's log capture turns into an error.
    import io
    import logging

    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    logging.disable(logging.CRITICAL)
    try:
        loaded = torch.export.load(buffer)
    finally:
        logging.disable(logging.NOTSET)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), deployed(x))


def test_onnx_runtime_round_trip(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = randomize_batchnorms(seed_models.build("preresnet56", width=0.5)).eval()
    x = torch.randn(2, 3, 32, 32)
    slimcore.prune(model, x, ratio=0.5)
    deployed = slimcore.deploy(model, x, memory_format="contiguous", portable=True)
    path = tmp_path / "model.onnx"
    torch.onnx.export(deployed, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


def test_compiled_deploy_computes_the_same():
    from slimcore.models.preresnet import PreResNet

    model = randomize_batchnorms(PreResNet(depth=20, width=0.25)).eval()  # small: compiling is slow
    x = torch.randn(2, 3, 32, 32)
    slimcore.prune(model, x, ratio=0.5)
    deployed = slimcore.deploy(model, x, memory_format="contiguous", compile=True)
    assert deployed.deploy_report["compiled"]
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-4)


def test_bfloat16_deploy_is_close_to_the_float32_model():
    model = randomize_batchnorms(seed_models.build("preresnet56", width=0.5)).eval()
    x = torch.randn(2, 3, 32, 32)
    slimcore.prune(model, x, ratio=0.5)
    deployed = slimcore.deploy(model, x, dtype=torch.bfloat16, memory_format="contiguous")
    assert deployed.conv1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got, want = deployed(x.bfloat16()).float(), model(x)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


@pytest.mark.parametrize("device", devices())
def test_deploy_on_a_device(device):
    model = randomize_batchnorms(seed_models.build("densenet40", width=0.5)).eval()
    x = torch.randn(2, 3, 32, 32)
    slimcore.prune(model, x, ratio=0.5)
    deployed = slimcore.deploy(model, x, device=device, timing_rounds=1)
    assert all(p.device.type == device for p in deployed.parameters())
    with torch.no_grad():
        torch.testing.assert_close(deployed(x.to(device)).cpu(), model(x), rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    model = seed_models.build("lenet5", in_channels=1, input_size=28).eval()
    x = torch.randn(1, 1, 28, 28)
    with pytest.raises(ValueError, match="memory_format must be 'auto', 'contiguous' or 'channels_last', got 'nhwc'"):
        slimcore.deploy(model, x, memory_format="nhwc")
    with pytest.raises(ValueError, match="timing_rounds must be an integer >= 1, got 0"):
        slimcore.deploy(model, x, timing_rounds=0)
    train = copy.deepcopy(model).train()
    deployed = slimcore.deploy(train, x, memory_format="contiguous")  # deploy is the eval-mode form
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x))
    assert train.training  # the input model keeps its mode
