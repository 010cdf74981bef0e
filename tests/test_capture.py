"""The capture's shape-only mode against a capture that computes every op.

By default the capture runs convolutions and matrix products for their shapes only, and the ops
downstream of them (whose inputs are then garbage) through short shape rules instead of their
kernels. A capture with ``shape_only=False`` computes everything: both must record the same graph
(ops, shapes, dtypes), for every layout the rules claim to know and for the ones they hand back
to the op.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimcore.pruning.capture import capture


class Ops(nn.Module):
    """A conv of the given configuration followed by the element-wise ops the rules cover; the
    final reshape records a view when its input is contiguous and a copy first when not, so a rule
    that gave the wrong memory layout changes the graph."""

    def __init__(self, dims, transposed, groups, stride, padding, dilation, output_padding=0):
        super().__init__()
        conv = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
                (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d}
        kw = dict(groups=groups, stride=stride, padding=padding, dilation=dilation)
        if transposed:
            kw["output_padding"] = output_padding
        self.conv = conv[dims, transposed](4 * groups, 2 * groups, 3, **kw)
        self.bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](2 * groups)
        self.scale = nn.Parameter(torch.rand(2 * groups, *([1] * dims)))

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = F.relu(y) + F.silu(y, inplace=False)
        y = F.hardtanh(y * self.scale, inplace=True)
        y = y.sub(torch.sigmoid(y)).div(F.hardswish(y) + 2)
        y.mul_(self.scale)
        y = F.gelu(y) - F.leaky_relu(y, 0.1).clamp(-1, 1)
        y = y * 0.5 + 1  # python scalars arrive as float64 0-dim tensors: the result stays float32
        return y.reshape(y.shape[0], -1), y.mean((2,), keepdim=True)


def _graph(model, x, shape_only):
    cap = capture(model, (x,), shape_only=shape_only)
    return [(n.op, [(cap.shapes[v], cap.dtypes[v]) for v in n.outputs]) for n in cap.nodes
            if n.op not in ("param", "constant")]


CONFIGS = [
    # dims, transposed, groups, stride, padding, dilation, output_padding
    (1, False, 1, 1, 0, 1, 0), (1, False, 2, 2, 1, 1, 0), (2, False, 1, 1, 1, 1, 0), (2, False, 1, 2, 0, 1, 0),
    (2, False, 3, 1, 2, 2, 0), (2, False, 1, 3, 1, 1, 0), (3, False, 1, 1, 1, 1, 0), (3, False, 2, 2, 0, 1, 0),
    (1, True, 1, 2, 1, 1, 1), (2, True, 1, 2, 1, 1, 1), (2, True, 2, 1, 0, 2, 0), (3, True, 1, 2, 0, 1, 0),
]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_last_weight"])
def test_shape_only_capture_records_what_computing_records(config, layout):
    dims = config[0]
    torch.manual_seed(0)
    model = Ops(*config).eval()
    x = torch.randn(2, model.conv.in_channels, *[9 - d for d in range(dims)])
    if layout != "contiguous":
        if dims == 1:
            pytest.skip("no channels-last layout for 3-d tensors")
        fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
        model.conv.to(memory_format=fmt)
        if layout == "channels_last":
            x = x.to(memory_format=fmt)
    assert _graph(model, x, shape_only=True) == _graph(model, x, shape_only=False)


def test_sizes_that_do_not_fit_still_raise_the_ops_own_error():
    """The shape rules never accept what the op refuses: a conv weight that does not match its
    input, a batch norm of the wrong width and an add of unbroadcastable shapes all raise."""

    class Bad(nn.Module):
        def __init__(self, which):
            super().__init__()
            self.which = which
            self.conv = nn.Conv2d(3, 8, 3)
            self.other = nn.Conv2d(5, 4, 1)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x):
            y = self.conv(x)
            if self.which == "conv":
                return self.other(y)
            if self.which == "bn":
                return self.bn(y)
            return y + y[:, :5]

    for which in ("conv", "bn", "add"):
        with pytest.raises(Exception, match=r"(?i)size|channels|shape|expected|elements"):
            capture(Bad(which).eval(), (torch.randn(1, 3, 8, 8),))


class Products(nn.Module):
    """Linear layers (addmm, and mm without a bias), batched products (bmm, baddbmm) and a product
    of a transposed operand; each result is reshaped, which copies when its layout is not the
    contiguous one the rules give."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.fc_nobias = nn.Linear(5, 4, bias=False)
        self.bias = nn.Parameter(torch.randn(3, 1, 4))

    def forward(self, x):
        flat = self.fc_nobias(self.fc(x.flatten(1)))  # addmm, then mm
        heads = flat.view(-1, 2, 2)
        attn = torch.bmm(heads, heads.transpose(1, 2))
        mixed = torch.baddbmm(self.bias[: attn.shape[0], :2, :2], attn, attn.transpose(1, 2))
        sq = torch.mm(flat.t(), flat)  # transposed left operand
        return mixed.reshape(mixed.shape[0], -1), sq.reshape(-1), (attn + 1).reshape(-1)


def test_shape_only_matrix_products_record_what_computing_records():
    torch.manual_seed(0)
    model = Products().eval()
    x = torch.randn(3, 2, 3)
    graph = _graph(model, x, shape_only=True)
    assert {"addmm", "mm", "bmm", "baddbmm"} <= {op for op, _ in graph}
    assert graph == _graph(model, x, shape_only=False)


def test_capture_gives_every_submodule_its_own_mode_back():
    """A model in training mode with a frozen (eval-mode) BatchNorm: the capture runs everything in
    eval mode and then restores each module's own mode, not the root's."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    model.train()
    model[1].eval()
    seen = {}
    model[4].register_forward_pre_hook(lambda m, a: seen.update(training=m.training))
    capture(model, (torch.randn(1, 3, 8, 8),))
    assert seen == {"training": False}
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]
