"""slimcore::batch_norm and slimcore::batch_norm_backward (csrc/cpu/batch_norm*.cpp,
csrc/cuda/batch_norm.cu) against nn.BatchNorm followed by the reference penalty step, and against
reference.batch_norm(_backward); gradcheck, opcheck, every error message."""

import pytest
import torch
from helpers import PENALTY_CASES, case_id, devices
from torch import nn
from torch.library import opcheck

from slimcore import ops, reference

# (shape, memory format): odd spatial sizes, C not a multiple of any vector width, 1x1 spatial,
# runs of 16..16384 values read row by row (runs traversal: several row blocks, vector steps and
# tails), one sample (planes traversal when there are more threads than samples) or runs longer
# than 16384 (planes), tiny runs (columns traversal), BatchNorm1d's (N, C) and (N, C, L).
CASES = [
    ((24, 130, 8, 8), "nchw"), ((5, 9, 11, 11), "nchw"), ((1, 6, 8, 8), "nchw"), ((1, 5, 20, 20), "nchw"),
    ((2, 3, 130, 130), "nchw"),  # runs longer than kMaxRun: planes with any thread count
    ((4, 3, 5, 7), "nchw"), ((4, 3, 5, 7), "cl"),
    ((2, 13, 33, 17), "nchw"), ((2, 13, 33, 17), "cl"),
    ((8, 70, 3, 3), "nchw"), ((8, 70, 3, 3), "cl"),
    ((16, 7, 1, 1), "nchw"), ((16, 7, 1, 1), "cl"),
    ((3, 5, 150, 2), "nchw"), ((6, 33, 16, 16), "cl"),
    ((2, 4, 80, 80), "nchw"),  # spans longer than a statistics block
    ((64, 13), "nchw"), ((9, 13, 50), "nchw"), ((9, 13, 5), "nchw"),
]


def case_name(case):
    shape, fmt = case
    return "x".join(map(str, shape)) + "-" + fmt


def make_input(shape, fmt, dtype, device, seed=0, shift=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + shift).to(dtype).to(device)
    if fmt == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def bn_module(shape):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)]


def random_bn(shape, dtype, device, seed=1, **kwargs):
    torch.manual_seed(seed)
    bn = bn_module(shape)(shape[1], **kwargs).to(device=device, dtype=dtype)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.uniform_(-1.5, 1.5)
            bn.weight[0] = 0.0  # gamma = 0: the penalty's subgradient is 0 there
            bn.bias.uniform_(-1, 1)
        if bn.running_mean is not None:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return bn


def close(got, want, tol, what):
    """max |got - want| <= tol * max(1, max |want|), in float64."""
    got, want = got.double(), want.double()
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def run_slim(bn, x, dy, training, penalty=("l1", 0.0, 0.0, 0.0, 0.0), scale=0.0):
    """Forward + backward of the op with bn's tensors (cloned running stats); returns
    (out, grad_input, grad_weight, grad_bias, running_mean, running_var)."""
    name, p, a, knee, eps = penalty
    xi = x.detach().clone().requires_grad_()
    w = bn.weight.detach().clone().requires_grad_() if bn.weight is not None else None
    b = bn.bias.detach().clone().requires_grad_() if bn.bias is not None else None
    rm = bn.running_mean.clone() if bn.running_mean is not None else None
    rv = bn.running_var.clone() if bn.running_var is not None else None
    out, _, _ = ops.batch_norm(xi, w, b, rm, rv, training, 0.1, bn.eps, name, scale, p, a, knee, eps)
    out.backward(dy)
    return out, xi.grad, w.grad if w is not None else None, b.grad if b is not None else None, rm, rv


def run_nn(bn, x, dy, training):
    bn = bn.train(training)
    xi = x.detach().clone().requires_grad_()
    for t in (bn.weight, bn.bias):
        if t is not None:
            t.grad = None
    out = bn(xi)
    out.backward(dy)
    return out, xi.grad, bn.weight.grad if bn.weight is not None else None, bn.bias.grad if bn.bias is not None else None


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=case_name)
def test_matches_nn_batchnorm(case, training, dtype, device):
    shape, fmt = case
    x = make_input(shape, fmt, dtype, device)
    dy = make_input(shape, fmt, dtype, device, seed=2, shift=0.3)
    bn = random_bn(shape, dtype, device)
    out, gi, gw, gb, rm, rv = run_slim(bn, x, dy, training)
    want = run_nn(bn, x, dy, training)
    tol = TOL[dtype]
    for got, ref, what in zip((out, gi, gw, gb), want, ("output", "grad_input", "grad_weight", "grad_bias")):
        close(got, ref, tol, what)
    close(rm, bn.running_mean, tol, "running_mean")
    close(rv, bn.running_var, tol, "running_var")
    # both memory formats in and out, no hidden copy to contiguous
    fmt_of = torch.channels_last if fmt == "cl" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt_of) and gi.is_contiguous(memory_format=fmt_of)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mixed", [False, True], ids=["half-params", "fp32-params"])
@pytest.mark.parametrize("case", [((4, 3, 5, 7), "nchw"), ((4, 13, 9, 9), "cl"), ((6, 70, 16, 16), "nchw"),
                                  ((24, 130, 8, 8), "nchw"), ((32, 19), "nchw")], ids=case_name)
def test_half_inputs_match_fp32_math(case, mixed, dtype, device):
    """Half inputs: statistics in fp32. Compared with nn.BatchNorm in fp32 on the same (rounded) values."""
    shape, fmt = case
    x = make_input(shape, fmt, dtype, device)
    dy = make_input(shape, fmt, dtype, device, seed=2, shift=0.3)
    bn = random_bn(shape, torch.float32 if mixed else dtype, device)
    for training in (True, False):
        bn32 = random_bn(shape, torch.float32, device)
        with torch.no_grad():  # the fp32 module holds the same (rounded) parameter values
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn32, name).copy_(getattr(bn, name).float())
        out, gi, gw, gb, rm, rv = run_slim(bn, x, dy, training)
        assert out.dtype == dtype and gi.dtype == dtype and gw.dtype == bn.weight.dtype
        want = run_nn(bn32, x.float(), dy.float(), training)
        tol = TOL[dtype]
        for got, ref, what in zip((out, gi, gw, gb), want, ("output", "grad_input", "grad_weight", "grad_bias")):
            close(got, ref, tol * (4 if what == "grad_weight" else 1), what)
        close(rm, bn32.running_mean, tol, "running_mean")
        close(rv, bn32.running_var, tol, "running_var")
        # and nn.BatchNorm itself in that dtype, loosely
        bn_same = random_bn(shape, torch.float32 if mixed else dtype, device)
        native = run_nn(bn_same, x, dy, training)
        close(out, native[0], 4 * tol, "output vs nn.BatchNorm in half")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("penalty", PENALTY_CASES, ids=case_id)
@pytest.mark.parametrize("case", [((4, 6, 5, 7), "nchw"), ((4, 6, 5, 7), "cl"), ((32, 6), "nchw")], ids=case_name)
def test_penalty_in_backward_equals_separate_step(case, penalty, device):
    """grad_weight = nn.BatchNorm's gradient followed by the reference penalty step."""
    shape, fmt = case
    name, p, a, knee, eps = penalty
    x = make_input(shape, fmt, torch.float32, device)
    dy = make_input(shape, fmt, torch.float32, device, seed=2, shift=0.3)
    bn = random_bn(shape, torch.float32, device)
    scale = 0.37
    for training in (True, False):
        out, gi, gw, gb, _, _ = run_slim(bn, x, dy, training, penalty, scale)
        want = run_nn(bn, x, dy, training)
        grad = want[2].clone()
        reference.penalty_subgradient_([bn.weight.detach()], [grad], name, [scale], p, a, knee, eps)
        close(gw, grad, 2e-5, "grad_weight + penalty")
        close(gi, want[1], 2e-5, "grad_input")
        close(gb, want[3], 2e-5, "grad_bias")


@pytest.mark.parametrize("device", devices())
def test_penalty_nan_weight_and_zero_scale(device):
    x = make_input((4, 3, 5, 5), "nchw", torch.float32, device)
    w = torch.tensor([float("nan"), 1.0, -2.0], device=device)
    _, m, s = ops.batch_norm(x, w, None, None, None, True, 0.1, 1e-5)
    dy = torch.ones_like(x)
    _, gw, _ = ops.batch_norm_backward(dy, x, w, m, s, True, "l1", 0.5)
    assert torch.isnan(gw[0]) and torch.isfinite(gw[1:]).all()  # NaN stays visible
    _, gw0, _ = ops.batch_norm_backward(dy, x, w, m, s, True, "l1", 0.0)
    assert torch.isfinite(gw0).all()  # scale 0: exactly plain BatchNorm
    _, gw_none, _ = ops.batch_norm_backward(dy, x, None, m, s, True, "l1", 0.5)
    close(gw_none, gw0, 1e-6, "no weight: no penalty")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", [((3, 4, 5, 6), "nchw"), ((3, 4, 5, 6), "cl"), ((3, 4, 1, 1), "nchw"), ((7, 4), "nchw"),
                                  ((2, 3, 40, 3), "nchw")], ids=case_name)
def test_reference_matches_kernels(case, device):
    shape, fmt = case
    x = make_input(shape, fmt, torch.float32, device)
    dy = make_input(shape, fmt, torch.float32, device, seed=3)
    w, b = torch.rand(shape[1], device=device) + 0.5, torch.randn(shape[1], device=device)
    for training in (True, False):
        rm1, rv1 = torch.zeros(shape[1], device=device), torch.ones(shape[1], device=device)
        rm2, rv2 = rm1.clone(), rv1.clone()
        got = ops.batch_norm(x, w, b, rm1, rv1, training, 0.2, 1e-3)
        want = reference.batch_norm(x, w, b, rm2, rv2, training, 0.2, 1e-3, "tl1", 0.1, 0.0, 1.0, 0.0, 0.0)
        for g, r in zip(got + (rm1, rv1), want + (rm2, rv2)):
            close(g, r, 2e-6, "forward")
        assert got[0].stride() == want[0].stride()
        gotb = ops.batch_norm_backward(dy, x, w, got[1], got[2], training, "tl1", 0.1, 0.0, 1.0, 0.0, 0.0)
        wantb = reference.batch_norm_backward(dy, x, w, got[1], got[2], training, "tl1", 0.1, 0.0, 1.0, 0.0, 0.0)
        for g, r in zip(gotb, wantb):
            close(g, r, 2e-5, "backward")


@pytest.mark.parametrize("device", devices())
def test_statistics_survive_a_large_mean(device):
    """|mean| >> std: the blocked two-pass/Welford statistics keep full precision (no cancellation)."""
    g = torch.Generator().manual_seed(0)
    # runs, planes (runs longer than 16384 values) and columns (3x3 maps) traversals; channels_last
    for shape, fmt in [((8, 5, 64, 64), "nchw"), ((2, 3, 130, 130), "nchw"), ((64, 6, 3, 3), "nchw"),
                       ((8, 5, 64, 64), "cl")]:
        x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 1e-2 + 1e3
        x = x64.float().to(device)
        if fmt == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
        _, mean, invstd = ops.batch_norm(x, None, None, None, None, True, 0.1, 0.0)
        xd = x.double().cpu()
        want_mean = xd.mean((0, 2, 3))
        want_std = xd.var((0, 2, 3), unbiased=False).sqrt()
        torch.testing.assert_close(mean.double().cpu(), want_mean, rtol=1e-7, atol=0)
        torch.testing.assert_close((1 / invstd.double().cpu()), want_std, rtol=1e-4, atol=0)


@pytest.mark.parametrize("device", devices())
def test_empty_batch(device):
    bn = random_bn((0, 3, 4, 4), torch.float32, device)
    x = torch.randn(0, 3, 4, 4, device=device)
    out, gi, gw, gb, rm, rv = run_slim(bn, x, torch.randn_like(x), True)
    assert out.shape == x.shape and gi.shape == x.shape
    assert torch.equal(rm, bn.running_mean) and torch.equal(rv, bn.running_var)
    assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))


# ----------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("case", [((3, 4, 5, 3), "nchw"), ((3, 4, 5, 3), "cl"), ((6, 4), "nchw"), ((2, 3, 40, 2), "nchw")],
                         ids=case_name)
def test_gradcheck_fp64(case, affine, training):
    shape, fmt = case
    x = make_input(shape, fmt, torch.float64, "cpu").requires_grad_()
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(shape[1], dtype=torch.float64).requires_grad_() if affine else None
    rm = torch.randn(shape[1], dtype=torch.float64) if not training else None
    rv = torch.rand(shape[1], dtype=torch.float64) + 0.5 if not training else None

    def f(x, w, b):
        return ops.batch_norm(x, w, b, rm, rv, training, 0.1, 1e-5)[0]

    inputs = (x, w, b)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_penalty_gradient_is_loss_plus_penalty_term():
    """The op's weight gradient is that of loss + scale * sum g(weight) (differentiable penalty_value)."""
    x = make_input((4, 5, 3, 3), "nchw", torch.float64, "cpu")
    w = (torch.rand(5, dtype=torch.float64) + 0.2).requires_grad_()
    dy = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    (ops.batch_norm(x, w, None, None, None, True, 0.1, 1e-5, "tl1", 0.3, 0.0, 0.5, 0.0, 0.0)[0] * dy).sum().backward()
    fused = w.grad.clone()
    w.grad = None
    loss = (ops.batch_norm(x, w, None, None, None, True, 0.1, 1e-5)[0] * dy).sum()
    (loss + ops.penalty_value([w], "tl1", [0.3], a=0.5)).backward()
    torch.testing.assert_close(fused, w.grad)


# ------------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    op = torch.ops.slimcore.batch_norm.default
    for shape, fmt in (((3, 4, 5, 3), "nchw"), ((3, 4, 5, 3), "cl"), ((6, 4), "nchw")):
        x = make_input(shape, fmt, torch.float32, device)
        w, b = torch.rand(shape[1], device=device), torch.randn(shape[1], device=device)
        rm, rv = torch.zeros(shape[1], device=device), torch.ones(shape[1], device=device)
        opcheck(op, (x, w, b, rm, rv, True, 0.1, 1e-5, "l1", 1e-3, 0.0, 0.0, 0.0, 0.0))
        opcheck(op, (x, w, b, rm, rv, False, 0.1, 1e-5, "l1", 1e-3, 0.0, 0.0, 0.0, 0.0))
        opcheck(op, (x, None, None, None, None, True, 0.1, 1e-5, "l1", 0.0, 0.0, 0.0, 0.0, 0.0))
        xg, wg, bg = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        opcheck(op, (xg, wg, bg, rm, rv, True, 0.1, 1e-5, "scad", 1.0, 0.0, 3.7, 0.2, 0.0))
        opcheck(op, (xg, None, None, rm, rv, False, 0.1, 1e-5, "lp", 1e-3, 0.5, 0.0, 0.0, 1e-4))
        _, m, s = op(x, w, b, None, None, True, 0.1, 1e-5, "l1", 0.0, 0.0, 0.0, 0.0, 0.0)
        dy = torch.randn_like(x)
        opcheck(torch.ops.slimcore.batch_norm_backward.default, (dy, x, w, m, s, True, "l1", 1e-3, 0.0, 0.0, 0.0, 0.0))
        opcheck(torch.ops.slimcore.batch_norm_backward.default, (dy, x, None, m, s, False, "mcp", 1.0, 0.0, 3.0, 0.3, 0.0))


# -------------------------------------------------------------------------------------- errors


def test_errors():
    x = torch.randn(4, 3, 5, 5)
    w = torch.ones(3)
    with pytest.raises(RuntimeError, match="expected more than 1 value per channel when training"):
        ops.batch_norm(torch.randn(1, 3, 1, 1), w, None, None, None, True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="must be contiguous \\(NCHW\\) or channels_last"):
        ops.batch_norm(x.transpose(2, 3), w, None, None, None, True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="weight must have shape \\[3\\]"):
        ops.batch_norm(x, torch.ones(4), None, None, None, True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="must share one dtype"):
        ops.batch_norm(x, w, torch.zeros(3, dtype=torch.float64), None, None, True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="or float32 for float16/bfloat16 input"):
        ops.batch_norm(x, w.double(), None, None, None, True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="both be given or both be None"):
        ops.batch_norm(x, w, None, torch.zeros(3), None, True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="eval mode \\(training=False\\) needs running_mean"):
        ops.batch_norm(x, w, None, None, None, False, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="unknown penalty 'l3'"):
        ops.batch_norm(x, w, None, None, None, True, 0.1, 1e-5, "l3", 1.0)
    with pytest.raises(RuntimeError, match="penalty scale must be finite and >= 0"):
        ops.batch_norm(x, w, None, None, None, True, 0.1, 1e-5, "l1", -1.0)
    with pytest.raises(RuntimeError, match="input must have a channel dimension"):
        ops.batch_norm(torch.randn(5), None, None, None, None, True, 0.1, 1e-5)
    _, m, s = ops.batch_norm(x, w, None, None, None, True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="must have the input's memory layout"):
        ops.batch_norm_backward(torch.randn(4, 5, 5, 3).permute(0, 3, 1, 2), x, w, m, s, True, "l1", 0.0)
    with pytest.raises(RuntimeError, match="save_mean must be a contiguous Float tensor of shape \\[3\\]"):
        ops.batch_norm_backward(x, x, w, m[:2], s, True, "l1", 0.0)


def test_any_gradient_layout_is_accepted():
    """out.sum().backward() hands the backward an expanded (stride 0) gradient: converted once."""
    for fmt in ("nchw", "cl"):
        x = make_input((4, 3, 6, 5), fmt, torch.float32, "cpu").requires_grad_()
        w = torch.rand(3, requires_grad=True)
        ops.batch_norm(x, w, None, None, None, True, 0.1, 1e-5)[0].sum().backward()
        x2 = x.detach().clone().requires_grad_()
        w2 = w.detach().clone().requires_grad_()
        nn.functional.batch_norm(x2, None, None, w2, None, True, 0.1, 1e-5).sum().backward()
        close(x.grad, x2.grad, 1e-5, "grad_input")
        close(w.grad, w2.grad, 2e-4, "grad_weight")  # sum of x_hat: ~0 after cancellation
