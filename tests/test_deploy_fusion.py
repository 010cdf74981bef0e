"""Residual adds and activations fused into their producing conv (slimcore/inference/deploy_fusion.py,
slimcore.deploy's fuse_adds and fuse_conv_acts): Conv2dAdd against conv2d + add + activation and
Conv2dAct against conv2d + activation, the deployed networks against the pruned models in both
memory formats, the oneDNN op actually in the graph (and absent from the portable form), and the
adds and activations that must stay as they are."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_batchnorms
from torch import nn

import slimcore
import slimcore.models as seed_models
from slimcore.inference.deploy_fusion import Conv2dAct, Conv2dAdd, fuse_conv_activations
from slimcore.nn import CompensatedConv2d, set_compensation

ONEDNN = torch.backends.mkldnn.is_available()
FUSED_OP_NAMES = ("mkldnn::_convolution_pointwise", "mkldnn::_convolution_pointwise_")
ACTIVATIONS = {"none": lambda y: y, "relu": torch.relu}


def call_targets(module, x):
    """The ATen-level ops of module's forward (torch.export)."""
    program = torch.export.export(module, (x,))
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


def profiled_ops(module, x):
    """The names of the ops module's forward runs (torch.profiler, eager)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        module(x)
    return [e.name for e in prof.events()]


def onednn_calls(module, x):
    """How many Conv2dAct calls of module's forward take the fused oneDNN op."""
    count = []
    hooks = [m.register_forward_pre_hook(lambda m, args: count.append(m.uses_onednn(args[0])))
             for m in module.modules() if isinstance(m, Conv2dAct)]
    with torch.inference_mode():
        module(x)
    for h in hooks:
        h.remove()
    return sum(count)


CONV_CASES = [  # (in, out, kernel, stride, padding, dilation, groups, bias, input size)
    (8, 16, 1, 1, 0, 1, 1, False, 9),
    (6, 12, 3, 1, 1, 1, 1, True, 10),
    (6, 12, 3, 2, 1, 1, 3, True, 11),
    (4, 8, 3, 1, 2, 2, 1, False, 8),
    (5, 7, (1, 3), (2, 1), (0, 1), 1, 1, True, 7),
]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:3])) + f"-s{c[3]}-g{c[6]}")
def test_conv2d_add_equals_conv_add_activation(case, activation, memory_format):
    cin, cout, k, stride, pad, dil, groups, bias, size = case
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias).eval()
    fused = Conv2dAdd.from_conv(conv, activation).to(memory_format=memory_format)
    assert fused.weight is conv.weight and fused.bias is conv.bias  # the same parameters
    x = torch.randn(3, cin, size, size).contiguous(memory_format=memory_format)
    with torch.no_grad():
        want_conv = conv(x)
        other = torch.randn_like(want_conv)
        want = ACTIVATIONS[activation](want_conv + other)
        got = fused(x, other)
        assert fused.uses_onednn(x, other) == ONEDNN
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.shape == want.shape


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_conv2d_add_writing_into_other(memory_format, activation):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1).eval()
    fused = Conv2dAdd.from_conv(conv, activation, writes_into_other=True).to(memory_format=memory_format)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=memory_format)
    for other_format in (torch.contiguous_format, torch.channels_last):
        other = torch.randn(2, 16, 6, 6).contiguous(memory_format=other_format)
        with torch.no_grad():
            want = ACTIVATIONS[activation](conv(x) + other)
            got = fused(x, other)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if ONEDNN:
            assert got.data_ptr() == other.data_ptr()  # the result is where other was


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_conv2d_add_of_a_compensated_conv(memory_format):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1).eval()
    set_compensation(conv, torch.randn(8, 1, 3, 3))  # a border term, as prune leaves for a padded conv
    assert isinstance(conv, CompensatedConv2d)
    fused = Conv2dAdd.from_conv(conv, "relu")
    assert fused.compensation is conv.compensation
    fused = fused.to(memory_format=memory_format)
    x = torch.randn(2, 6, 9, 9).contiguous(memory_format=memory_format)
    with torch.no_grad():
        want_conv = conv(x)
        other = torch.randn_like(want_conv)
        torch.testing.assert_close(fused(x, other), torch.relu(want_conv + other), rtol=1e-5, atol=1e-5)


def test_conv2d_add_bfloat16_runs_the_plain_ops():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1).eval()
    x = torch.randn(2, 16, 8, 8)
    other = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        want = torch.relu(conv(x) + other)
    fused = Conv2dAdd.from_conv(conv, "relu").to(torch.bfloat16)  # (conv's parameters too: shared)
    with torch.no_grad():
        got = fused(x.bfloat16(), other.bfloat16())
        assert not fused.uses_onednn(x.bfloat16(), other.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2)


def test_conv2d_add_falls_back_where_onednn_does_not_apply():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    fused = Conv2dAdd.from_conv(conv, "relu")
    x = torch.randn(2, 4, 5, 5)
    # a broadcasting operand: the plain ops broadcast it, as the add did
    row = torch.randn(1, 6, 1, 5)
    with torch.no_grad():
        assert not fused.uses_onednn(x, row)
        torch.testing.assert_close(fused(x, row), torch.relu(conv(x) + row))
    # autograd recording (oneDNN's fused op has no backward): plain ops, gradients flow
    other = torch.randn(2, 6, 5, 5, requires_grad=True)
    out = fused(x, other)
    out.sum().backward()
    torch.testing.assert_close(other.grad, (conv(x) + other > 0).float())
    assert conv.weight.grad is not None
    # only the weights require grad (the inputs do not): still the plain ops, the weight gets its gradient
    conv.zero_grad(set_to_none=True)
    plain_other = other.detach()
    assert not fused.uses_onednn(x, plain_other)
    fused(x, plain_other).sum().backward()
    want_w = torch.autograd.grad(torch.relu(F.conv2d(x, conv.weight, conv.bias, padding=1) + plain_other).sum(),
                                 conv.weight)[0]
    torch.testing.assert_close(conv.weight.grad, want_w)
    # float64: not a oneDNN dtype
    fused64 = Conv2dAdd.from_conv(nn.Conv2d(4, 6, 1).double())
    x64, o64 = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 6, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert not fused64.uses_onednn(x64, o64)
        torch.testing.assert_close(fused64(x64, o64), F.conv2d(x64, fused64.weight, fused64.bias) + o64)


def test_conv2d_add_bad_arguments():
    with pytest.raises(ValueError, match="Conv2dAdd: unknown activation 'relu6'; expected one of none, relu"):
        Conv2dAdd(2, 2, 1, activation="relu6")
    with pytest.raises(TypeError, match="expected an nn.Conv2d or CompensatedConv2d with zero padding, got Conv1d"):
        Conv2dAdd.from_conv(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match=r"got Conv2d \(padding_mode='reflect'\)"):
        Conv2dAdd.from_conv(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))


RESIDUAL_CASES = [
    ("preresnet164", lambda: seed_models.build("preresnet164", width=0.25), (2, 3, 32, 32), "none"),
    ("preresnet56", lambda: seed_models.build("preresnet56", width=0.5), (2, 3, 32, 32), "none"),
    ("resnet50", lambda: torchvision.models.resnet50(num_classes=10), (2, 3, 64, 64), "relu"),
]


def residual_adds(model):
    """Adds of two tensors in the traced graph of the model (torch.fx)."""
    graph = torch.fx.symbolic_trace(model).graph
    return [n for n in graph.nodes if n.op == "call_function" and "add" in getattr(n.target, "__name__", "")]


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name,build,shape,activation", RESIDUAL_CASES, ids=[c[0] for c in RESIDUAL_CASES])
def test_deployed_residual_network_fuses_its_adds_and_computes_the_pruned_model(name, build, shape, activation,
                                                                               memory_format):
    model = randomize_batchnorms(build()).eval()
    x = torch.randn(shape)
    adds = len(residual_adds(model))
    slimcore.prune(model, x, ratio=0.5)
    with torch.no_grad():
        want = model(x)
    deployed = slimcore.deploy(model, x, memory_format=memory_format)
    report = deployed.deploy_report
    fused = [m for m in deployed.modules() if isinstance(m, Conv2dAdd)]
    assert len(fused) == len(report["conv_adds"]) > 0
    # every add whose block kept a conv branch (a branch pruned whole became a ResidualConstant)
    constants = sum(type(m).__name__ == "ResidualConstant" for m in model.modules())
    assert len(fused) == adds - constants
    assert set(report["conv_adds"].values()) == {activation}  # resnet's ReLU after the sum is fused
    with torch.no_grad():
        got = deployed(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if memory_format == "channels_last":
        assert got.dim() == 2  # logits; the convs ran on channels_last weights
        assert fused[0].weight.is_contiguous(memory_format=torch.channels_last)
    # the residual stream's sums are new tensors nothing reads after the next add: written in place
    assert sum(m.writes_into_other for m in fused) >= len(fused) // 2
    acts = [m for m in deployed.modules() if isinstance(m, Conv2dAct)]
    assert len(acts) == len(report["conv_activations"]) > 0
    if ONEDNN:  # the adds, and the Conv2dActs that see channels_last input (not the stem's NCHW x)
        onednn_acts = onednn_calls(deployed, x)
        assert (onednn_acts > 0) == (memory_format == "channels_last")
        assert sum(op in FUSED_OP_NAMES for op in profiled_ops(deployed, x)) == len(fused) + onednn_acts
    # torch.export traces the plain ops (the fused op has no fake kernel) and computes the same
    program = torch.export.export(deployed, (x,))
    assert not any("mkldnn" in str(n.target) for n in program.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), want, rtol=1e-4, atol=1e-4)


def test_fuse_adds_off_keeps_the_adds():
    model = randomize_batchnorms(seed_models.build("preresnet56", width=0.5)).eval()
    x = torch.randn(2, 3, 32, 32)
    deployed = slimcore.deploy(model, x, memory_format="contiguous", fuse_adds=False)
    assert deployed.deploy_report["conv_adds"] == {}
    assert not any(isinstance(m, Conv2dAdd) for m in deployed.modules())
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-4)


def test_portable_form_keeps_plain_aten_ops():
    model = randomize_batchnorms(seed_models.build("preresnet56", width=0.5)).eval()
    x = torch.randn(2, 3, 32, 32)
    slimcore.prune(model, x, ratio=0.5)
    portable = slimcore.deploy(model, x, memory_format="channels_last", portable=True)
    fused = [m for m in portable.modules() if isinstance(m, Conv2dAdd)]
    assert fused and all(m.portable for m in fused)
    targets = call_targets(portable, x)
    assert not any("mkldnn" in t or "slimcore" in t for t in targets)
    assert any(t.startswith("aten.add") for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(portable(x), model(x), rtol=1e-4, atol=1e-4)


class Unfusable(nn.Module):
    """Adds deploy must leave alone, one of each kind, next to one it may fuse."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.read_twice = nn.Conv2d(8, 8, 1)  # its output is added and also read by the next line
        self.shared = nn.Conv2d(8, 8, 1)  # called twice
        self.into_other = nn.Conv2d(8, 8, 1)  # added in place into the other operand
        self.broadcast = nn.Conv2d(8, 8, 1, stride=2)  # its output broadcasts against a (N, 8, 1, 1) tensor
        self.one_d = nn.Conv1d(8, 8, 1)  # not a 2-D conv
        self.fusable = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        y = self.read_twice(x)
        x = x + y
        x = x * torch.sigmoid(y)
        x = self.shared(x) + x
        x = self.shared(x) + x
        z = x * 2
        z.add_(self.into_other(x))  # in place: the product's later readers see the sum
        x = x + z
        pooled = x.mean((2, 3), keepdim=True)
        b = self.broadcast(x) + pooled
        flat = self.one_d(x.flatten(2)) + x.flatten(2)
        x = flat.view_as(x) + self.fusable(x)
        return x.sum() + b.sum()


class Streams(nn.Module):
    """Adds whose other operand may or may not be overwritten by the fused conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(8, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 8, 1)
        self.e = nn.Conv2d(8, 8, 1)
        self.p = nn.Conv2d(8, 8, 1)  # reads each operand before its add
        self.a2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        s = self.stem(x)
        s = self.a(self.p(s)) + s  # the stem's output, read before by p alone: may be overwritten
        t = self.b(self.p(s)) + s  # s is read after this add (below): must stay
        t = t + s.mean((2, 3), keepdim=True)
        v = s.flatten(2)  # a view of s, read after the next add: must stay
        u = self.c(self.p(t)) + s
        w = self.d(self.p(u)) + x  # the model's input: never overwritten
        y = self.e(self.p(w)) + w  # d's output, read before by p alone: may be overwritten
        z = self.a2(s) + s  # a conv reading the tensor it is added to: must not write into it
        return y.sum() + v.sum() + u.sum() + z.sum()


def test_fused_conv_writes_only_into_tensors_nothing_reads_afterwards():
    torch.manual_seed(0)
    model = Streams().eval()
    x = torch.randn(2, 8, 6, 6)
    deployed = slimcore.deploy(model, x, memory_format="contiguous")
    names = ("a", "b", "c", "d", "e", "a2")
    assert set(deployed.deploy_report["conv_adds"]) == set(names)
    written = {name for name in names if getattr(deployed, name).writes_into_other}
    assert written == {"a", "e"}
    before = x.clone()
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-4)
    assert torch.equal(x, before)


def test_adds_that_are_not_fusable_stay():
    torch.manual_seed(0)
    model = Unfusable().eval()
    x = torch.randn(2, 3, 8, 8)
    deployed = slimcore.deploy(model, x, memory_format="contiguous")
    assert deployed.deploy_report["conv_adds"] == {"fusable": "none"}
    assert isinstance(deployed.fusable, Conv2dAdd)
    for name in ("read_twice", "shared", "into_other", "broadcast"):
        assert type(getattr(deployed, name)) in (nn.Conv2d, Conv2dAct), name  # no add taken
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------ Conv2dAct

ACT_REFERENCE = {"none": lambda y: y, "relu": torch.relu, "relu6": F.relu6, "hardswish": F.hardswish, "silu": F.silu}


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("activation", list(ACT_REFERENCE))
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:3])) + f"-s{c[3]}-g{c[6]}")
def test_conv2d_act_equals_conv_then_activation(case, activation, memory_format):
    cin, cout, k, stride, pad, dil, groups, bias, size = case
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias).eval()
    fused = Conv2dAct.from_conv(conv, activation).to(memory_format=memory_format)
    assert fused.weight is conv.weight and fused.bias is conv.bias
    x = torch.randn(3, cin, size, size).contiguous(memory_format=memory_format) * 4  # past relu6's cap
    with torch.no_grad():
        want = ACT_REFERENCE[activation](conv(x))
        got = fused(x)
        # oneDNN for channels_last float32 only: on NCHW ATen's own conv is faster
        assert fused.uses_onednn(x) == (ONEDNN and memory_format == torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=memory_format)
    ops = profiled_ops(fused, x)  # (under inference_mode)
    assert ("mkldnn::_convolution_pointwise" in ops) == (ONEDNN and memory_format == torch.channels_last)


def test_conv2d_act_falls_back_where_onednn_does_not_apply():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    fused = Conv2dAct.from_conv(conv, "relu6")
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last) * 4
    # autograd recording (the fused op has no backward): plain, out-of-place ops, gradients flow,
    # also when only the weights require grad (a first conv)
    for x_grad in (False, True):
        conv.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(x_grad)
        assert not fused.uses_onednn(xg)
        out = fused(xg)
        out.sum().backward()
        with torch.no_grad():
            torch.testing.assert_close(out, F.relu6(conv(x)))
        want_w = torch.autograd.grad(F.relu6(F.conv2d(x, conv.weight, conv.bias, padding=1)).sum(), conv.weight)[0]
        torch.testing.assert_close(conv.weight.grad, want_w)
        assert (xg.grad is not None) == x_grad
    with torch.no_grad():
        assert fused.uses_onednn(x) == ONEDNN
    # bfloat16 and float64 are not its oneDNN dtypes; portable=True never uses oneDNN
    for dtype in (torch.bfloat16, torch.float64):
        other = Conv2dAct.from_conv(nn.Conv2d(4, 6, 1), "relu").to(dtype)
        xd = x.to(dtype)
        with torch.no_grad():
            assert not other.uses_onednn(xd)
            torch.testing.assert_close(other(xd), torch.relu(F.conv2d(xd, other.weight, other.bias)))
    portable = Conv2dAct.from_conv(conv, "relu6", portable=True)
    with torch.no_grad():
        assert not portable.uses_onednn(x)
        torch.testing.assert_close(portable(x), F.relu6(conv(x)))


def test_conv2d_act_bad_arguments():
    with pytest.raises(ValueError, match="Conv2dAct: unknown activation 'gelu'"):
        Conv2dAct(3, 4, 1, activation="gelu")
    with pytest.raises(TypeError, match="expected an nn.Conv2d with zero numeric padding"):
        Conv2dAct.from_conv(nn.Conv2d(3, 4, 3, padding="same"))
    with pytest.raises(TypeError, match="expected an nn.Conv2d with zero numeric padding"):
        Conv2dAct.from_conv(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))


class _ConvActivations(nn.Module):
    """A conv read by ReLU6 alone (fused), one read by F.relu alone (fused), one read by an
    activation and by the output (not fused: the pre-activation value is needed), one conv module
    called twice (not replaced), one with "same" padding (not replaced), one read by a GELU (a
    plain Conv2dAct, GELU stays)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.twice = nn.Conv2d(8, 8, 1)
        self.same = nn.Conv2d(8, 8, 3, padding="same")
        self.d = nn.Conv2d(8, 8, 1)
        self.act = nn.ReLU6(inplace=True)
        self.gelu = nn.GELU()

    def forward(self, x):
        y = self.act(self.a(x))
        y = F.relu(self.b(y))
        z = self.c(y)
        y = torch.relu(z) + z
        y = self.twice(self.twice(y))
        y = torch.relu(self.same(y))
        return self.gelu(self.d(y))


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_fuse_conv_activations_takes_only_sole_readers(memory_format):
    from slimcore.inference.deploy import _activation_of

    torch.manual_seed(0)
    model = _ConvActivations().eval()
    x = torch.randn(2, 3, 9, 9) * 3
    with torch.no_grad():
        want = model(x)
    gm = torch.fx.symbolic_trace(model)
    fused = fuse_conv_activations(gm, _activation_of)
    assert fused == {"a": "relu6", "b": "relu", "c": "none", "d": "none"}
    assert isinstance(gm.a, Conv2dAct) and gm.a.activation == "relu6"
    assert type(gm.twice) is nn.Conv2d and type(gm.same) is nn.Conv2d
    # the fused activations left the graph; the others stay
    assert not any(n.op == "call_module" and n.target == "act" for n in gm.graph.nodes)
    assert any(n.op == "call_module" and n.target == "gelu" for n in gm.graph.nodes)
    if memory_format == "channels_last":
        gm = gm.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)
    # without fuse_activations or plain_convs: nothing to do for the plain convs
    gm2 = torch.fx.symbolic_trace(model)
    assert fuse_conv_activations(gm2, _activation_of, fuse_activations=False, plain_convs=False) == {}


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_deployed_mobilenet_fuses_its_relu6_and_computes_the_pruned_model(memory_format):
    model = randomize_batchnorms(torchvision.models.mobilenet_v2(num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    slimcore.prune(model, x, ratio=0.5)
    with torch.no_grad():
        want = model(x)
    deployed = slimcore.deploy(model, x, memory_format=memory_format)
    acts = deployed.deploy_report["conv_activations"]
    # every depthwise and expansion conv with its ReLU6 (35 of them), the projections plain
    assert sum(a == "relu6" for a in acts.values()) == 35
    assert not any(isinstance(m, nn.ReLU6) for m in deployed.modules())
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), want, rtol=1e-4, atol=1e-4)
    off = slimcore.deploy(model, x, memory_format=memory_format, fuse_conv_acts=False)
    assert off.deploy_report["conv_activations"] == {}
    assert not any(isinstance(m, Conv2dAct) for m in off.modules())
    # torch.export and the portable form trace plain ops
    program = torch.export.export(deployed, (x,))
    assert not any("mkldnn" in str(n.target) for n in program.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), want, rtol=1e-4, atol=1e-4)
    portable = slimcore.deploy(model, x, memory_format=memory_format, portable=True)
    assert all(m.portable for m in portable.modules() if isinstance(m, Conv2dAct))
    assert not any("mkldnn" in t for t in call_targets(portable, x))
