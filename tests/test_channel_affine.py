"""slimcore::channel_affine (csrc/cpu/channel_affine.cpp, csrc/cuda/channel_affine.cu) against
reference.channel_affine and against what it replaces: an eval-mode BatchNorm over
x.index_select(1, index) followed by the activation, written with torch.nn modules (independent
of both)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import devices
from torch import nn
from torch.library import opcheck

from slimcore import ops, reference
from slimcore.nn import ChannelAffine

ACTIVATIONS = ["none", "relu", "relu6", "hardswish", "silu"]
TORCH_ACTIVATION = {"none": nn.Identity(), "relu": nn.ReLU(), "relu6": nn.ReLU6(), "hardswish": nn.Hardswish(),
                    "silu": nn.SiLU()}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# The kernel computes x * scale + shift in float32 (float64) and rounds once, as the reference does;
# only the fused multiply-add may differ by an ulp of the accumulation type, then one rounding.
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}

# (N, C, spatial...): 2-D (BatchNorm1d), 3-D, CIFAR-like and ImageNet-like maps, S = 1, 5-D.
SHAPES = [(5, 7), (3, 6, 11), (2, 13, 8, 8), (1, 40, 17, 19), (4, 9, 1, 1), (2, 5, 3, 4, 5), (3, 33, 2, 2)]


def layouts(shape):
    out = ["contiguous"]
    if len(shape) in (4, 5):
        out.append("channels_last")
    return out


def make_input(shape, dtype, device, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def index_sets(c, g):
    """None, empty, one, a sorted selection with runs (pruning keeps increasing indices), a
    permutation, duplicates."""
    keep = torch.nonzero(torch.rand(c, generator=g) < 0.6).flatten()
    return [None, torch.empty(0, dtype=torch.long), torch.tensor([c - 1]), keep, torch.randperm(c, generator=g),
            torch.randint(0, c, (c + 3,), generator=g)]


def batchnorm_reference(x, index, bn, activation):
    """What deploy replaces: index_select, then an nn.BatchNorm in eval mode, then the activation."""
    y = x if index is None else x.index_select(1, index)
    return TORCH_ACTIVATION[activation](bn(y))


def random_bn(channels, dim, g, dtype=torch.float32):
    bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dim](channels).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.2)
    return bn.eval()


def coefficients(bn, dtype):
    """scale/shift of an eval BN, written from its definition (not ChannelAffine.from_batchnorm)."""
    invstd = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    scale = bn.weight.double() * invstd
    shift = bn.bias.double() - bn.running_mean.double() * scale
    return scale.to(dtype), shift.to(dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_and_batchnorm(shape, dtype, device):
    g = torch.Generator().manual_seed(sum(shape))
    for layout in layouts(shape):
        x = make_input(shape, dtype, device, layout, seed=len(shape))
        before = x.clone()
        for index in index_sets(shape[1], g):
            index = None if index is None else index.to(device)
            c_out = shape[1] if index is None else len(index)
            bn = random_bn(c_out, len(shape), g).double()
            param_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
            scale, shift = (t.to(device) for t in coefficients(bn, param_dtype))
            for act in ACTIVATIONS:
                got = ops.channel_affine(x, index, scale, shift, act)
                ref = reference.channel_affine(x, index, scale, shift, act)
                assert got.dtype == dtype and got.shape == ref.shape == (shape[0], c_out, *shape[2:])
                torch.testing.assert_close(got, ref, **TOL[dtype])
                # The output keeps the input's layout.
                assert got.stride() == ref.stride(), (layout, got.stride(), ref.stride())
                if c_out == 0:  # nothing to compare (torch's BatchNorm refuses 0 channels)
                    continue
                # Independent: torch's own BatchNorm and activation, in float64.
                want = batchnorm_reference(x.double().cpu(), None if index is None else index.cpu(), bn, act)
                torch.testing.assert_close(got.double().cpu(), want, **TOL[dtype])
        assert torch.equal(x, before)


@pytest.mark.parametrize("device", devices())
def test_large_maps_split_across_threads(device):
    # Tasks start and end inside planes and rows (the tests set a tiny task size, conftest.py).
    g = torch.Generator().manual_seed(3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for layout in ["contiguous", "channels_last"]:
            x = make_input((3, 70, 33, 31), torch.float32, device, layout)
            for index in [None, torch.arange(1, 70, 2), torch.arange(0, 60), torch.randperm(70, generator=g)[:50]]:
                index = None if index is None else index.to(device)
                c = 70 if index is None else len(index)
                scale, shift = torch.randn(c, generator=g).to(device), torch.randn(c, generator=g).to(device)
                for act in ["none", "relu", "silu"]:
                    torch.testing.assert_close(ops.channel_affine(x, index, scale, shift, act),
                                               reference.channel_affine(x, index, scale, shift, act))
    finally:
        torch.set_num_threads(threads)


def test_nan_and_inf_propagate_like_torch():
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), -1.0, 7.0, 2.0]]).view(1, 6, 1, 1).repeat(2, 1, 3, 5)
    ones, zeros = torch.ones(6), torch.zeros(6)
    for act in ACTIVATIONS:
        got = ops.channel_affine(x, None, ones, zeros, act)
        want = TORCH_ACTIVATION[act](x)
        assert torch.equal(torch.isnan(got), torch.isnan(want)), act
        torch.testing.assert_close(got, want, equal_nan=True)


def test_module_matches_selected_batchnorm_and_portable_form():
    # ChannelAffine.from_batchnorm on the pruner's SelectedBatchNorm2d, then ReLU; the portable
    # (plain ATen) form computes the same.
    from slimcore.nn import set_input_selection

    g = torch.Generator().manual_seed(1)
    bn = random_bn(5, 4, g)
    set_input_selection(bn, torch.tensor([7, 0, 3, 3, 9]))
    x = torch.randn(2, 10, 6, 6, generator=g)
    want = F.relu(bn(x))
    for portable in (False, True):
        m = ChannelAffine.from_batchnorm(bn, "relu", portable=portable)
        torch.testing.assert_close(m(x), want)
        torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last)), want)
        torch.testing.assert_close(m(x[:, :, ::2]), F.relu(bn(x[:, :, ::2])))  # a sliced input
    with pytest.raises(ValueError, match="no running statistics"):
        ChannelAffine.from_batchnorm(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        ChannelAffine(torch.ones(3), torch.zeros(3), activation="gelu")


# ----------------------------------------------------------------------------------------- errors

IMPLS = [pytest.param(ops, id="kernel"), pytest.param(reference, id="reference")]


@pytest.mark.parametrize("impl", IMPLS)
def test_rejects_bad_arguments(impl):
    x = torch.randn(2, 4, 3, 3)
    k, c = torch.ones(4), torch.zeros(4)
    cases = [
        ((x, None, k, c, "gelu"), ValueError, r"unknown activation 'gelu'; expected one of none, relu"),
        ((torch.randn(4), None, k, c, "none"), ValueError, r"input must have a channel dimension \(N, C, \.\.\.\), "
                                                          r"got shape \[4\]"),
        ((x.to(torch.int32), None, k, c, "none"), TypeError, r"input must be float32, float64, float16 or "
                                                             r"bfloat16, got Int$"),
        ((x.transpose(2, 3), None, k, c, "none"), ValueError, r"input must be contiguous \(NCHW\) or channels_last, "
                                                              r"got sizes \[2, 4, 3, 3\] and strides \[36, 9, 1, 3\]"),
        ((x, torch.tensor([0, 1], dtype=torch.int32), k[:2], c[:2], "none"), TypeError,
         r"index must be an int64 \(torch.long\) tensor, got Int$"),
        ((x, torch.tensor([[0, 1]]), k[:2], c[:2], "none"), ValueError, r"index must be 1-D, got shape \[1, 2\]"),
        ((x, torch.tensor([0, 4]), k[:2], c[:2], "none"), IndexError,
         r"index\[1\] = 4 is out of range for the input's 4 channels"),
        ((x, torch.tensor([-1]), k[:1], c[:1], "none"), IndexError, r"index\[0\] = -1 is out of range"),
        ((x, torch.tensor([0, 1]), k, c[:2], "none"), ValueError,
         r"scale must have shape \[2\] \(one value per output channel\), got \[4\]"),
        ((x, None, k, torch.zeros(4, 1), "none"), ValueError, r"shift must have shape \[4\] .*got \[4, 1\]"),
        ((x, None, k.double(), c, "none"), TypeError,
         r"scale is Double but input is Float; scale must have input's dtype \(or float32 for float16/bfloat16 input\)"),
        ((x.double(), None, k.double(), c, "none"), TypeError, r"shift is Float but input is Double"),
        ((x.bfloat16(), None, k.half(), c, "none"), TypeError, r"scale is Half but input is BFloat16"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern) as info:
            impl.channel_affine(*args)
        assert str(info.value).startswith("slimcore: channel_affine: ")
    # float32 coefficients with half input are fine (what a bf16 deployed model keeps)
    impl.channel_affine(x.bfloat16(), None, k, c, "relu")


@pytest.mark.cuda
def test_rejects_mixed_devices():
    x = torch.randn(2, 4, 3, 3, device="cuda")
    k, c = torch.ones(4, device="cuda"), torch.zeros(4, device="cuda")
    with pytest.raises(ValueError, match="slimcore: channel_affine: index is on cpu but input is on cuda:0"):
        ops.channel_affine(x, torch.tensor([0, 1, 2, 3]), k, c, "none")
    with pytest.raises(ValueError, match="slimcore: channel_affine: scale is on cpu but input is on cuda:0"):
        ops.channel_affine(x, None, k.cpu(), c, "none")


# ----------------------------------------------------------------------------------- opcheck, compile


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    op = torch.ops.slimcore.channel_affine.default
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 5, 5, generator=g).to(device)
    idx = torch.tensor([5, 0, 0, 3], device=device)
    k4, c4 = torch.randn(4, generator=g).to(device), torch.randn(4, generator=g).to(device)
    k6, c6 = torch.randn(6, generator=g).to(device), torch.randn(6, generator=g).to(device)
    samples = [
        (x, idx, k4, c4, "relu"),
        (x, None, k6, c6, "none"),
        (x.contiguous(memory_format=torch.channels_last), idx, k4, c4, "hardswish"),
        (x.double(), idx, k4.double(), c4.double(), "silu"),
        (x.bfloat16(), idx, k4, c4, "relu6"),
        (torch.randn(3, 6, device=device), None, k6, c6, "relu"),
        (x, torch.empty(0, dtype=torch.long, device=device), k4[:0], c4[:0], "relu"),
        (torch.randn(0, 6, 2, 2, device=device), idx, k4, c4, "relu"),
    ]
    for args in samples:
        opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static",
                                      "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_works_under_torch_compile(backend):
    x = torch.randn(2, 6, 4, 4)
    idx, k, c = torch.tensor([4, 1, 1]), torch.randn(3), torch.randn(3)

    def f(x):
        return ops.channel_affine(x * 2, idx, k, c, "relu") + 1

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend=backend)(x), f(x))


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_every_isa_copy_matches_the_reference(capability):
    # The kernel is compiled for baseline x86-64, AVX2 and AVX-512 and picked from ATen's CPU
    # capability, which ATEN_CPU_CAPABILITY lowers: run the lower copies in a subprocess (the
    # in-process tests run the best one).
    import os
    import subprocess
    import sys

    script = """
import torch
from slimcore import ops, reference
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 37, 9, 7, generator=g).to(dtype).contiguous(memory_format=fmt)
        for index in (None, torch.randperm(37, generator=g)[:20], torch.arange(3, 30)):
            c = 37 if index is None else len(index)
            k, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
            if dtype == torch.float64:
                k, b = k.double(), b.double()
            for act in ("none", "relu", "relu6", "hardswish", "silu"):
                got = ops.channel_affine(x, index, k, b, act)
                want = reference.channel_affine(x, index, k, b, act)
                tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
print("ok")
"""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
