"""slimcore::penalty_prox_ (csrc/cpu/penalty_prox.cpp, csrc/cuda/penalty_prox.cu) against
reference.penalty_prox_, and both against a brute-force global argmin."""

import math

import numpy as np
import pytest
import torch
from helpers import DTYPES, PENALTY_CASES, TOL, brute_force_prox, case_id, devices, objective, sample_values
from torch.library import opcheck

from slimcore import ops, reference

MUS = [1e-3, 0.05, 0.3, 1.0, 3.0]


def kernel_prox(v, mu, case):
    name, p, a, knee, eps = case
    out = v.clone()
    ops.penalty_prox_([out], name, [mu], p, a, knee, eps)
    return out


@pytest.mark.parametrize("mu", MUS)
@pytest.mark.parametrize("case", PENALTY_CASES, ids=case_id)
def test_prox_is_the_global_minimiser(case, mu):
    name, p, a, knee, eps = case
    v = sample_values(n=40, seed=1)
    _, f_brute = brute_force_prox(v, mu, name, p, a, knee, eps)
    for label, x in [("reference", reference.prox(v, mu, name, p, a, knee, eps)), ("kernel", kernel_prox(v, mu, case))]:
        f = objective(x, v, mu, name, p, a, knee)
        worst = np.max(f - f_brute)
        assert worst <= 1e-9, f"{label} prox is not a global minimiser: objective above brute force by {worst:.3g}"
        # Every g is even: the prox keeps the sign and shrinks, never flips.
        assert torch.all(x * v >= 0) and torch.all(x.abs() <= v.abs() + 1e-12), label


@pytest.mark.parametrize("case", PENALTY_CASES, ids=case_id)
def test_prox_fp32_kernel_is_a_minimiser(case):
    name, p, a, knee, eps = case
    v64 = sample_values(n=40, seed=2)
    v = v64.float()
    mu = 0.2
    x = kernel_prox(v, mu, case).double()
    _, f_brute = brute_force_prox(v.double(), mu, name, p, a, knee, eps)
    f = objective(x, v.double(), mu, name, p, a, knee)
    assert np.max(f - f_brute) <= 2e-6


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PENALTY_CASES, ids=case_id)
def test_prox_kernel_matches_reference(case, dtype, device):
    name, p, a, knee, eps = case
    tensors = [sample_values(n=n, seed=n, scale=s).to(dtype).to(device) for n, s in [(1, 1.0), (300, 0.3), (5000, 1.0)]]
    tensors.append(torch.empty(0, dtype=dtype, device=device))  # zero-size tensors are skipped
    mus = [0.01, 0.2, 1.0, 0.5]
    expected = [reference.prox(t.double() if dtype == torch.float64 else t.float(), m, name, p, a, knee, eps).to(dtype)
                for t, m in zip(tensors, mus)]
    ops.penalty_prox_(tensors, name, mus, p, a, knee, eps)
    for got, want in zip(tensors, expected):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("device", devices())
def test_prox_gives_exact_zeros_and_keeps_non_finite(device):
    v = torch.tensor([0.05, -0.09, 0.0, 0.2, -0.3, float("nan"), float("inf"), -float("inf")], device=device)
    ops.penalty_prox_([v], "l1", [0.1])
    expected = torch.tensor([0.0, 0.0, 0.0, 0.1, -0.2, float("nan"), float("inf"), -float("inf")], device=device)
    torch.testing.assert_close(v, expected, equal_nan=True)
    assert (v[:3] == 0).all()  # exactly zero, not small


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", PENALTY_CASES, ids=case_id)
def test_prox_with_zero_step_is_identity(case, device):
    name, p, a, knee, eps = case
    v = sample_values(n=50).float().to(device)
    out = v.clone()
    ops.penalty_prox_([out], name, [0.0], p, a, knee, eps)
    assert torch.equal(out, v)


@pytest.mark.parametrize("device", devices())
def test_prox_over_many_tensors_and_mixed_dtypes(device):
    # More tensors than one launch's metadata holds (256) and a tensor larger than a chunk.
    g = torch.Generator().manual_seed(3)
    dtypes = [torch.float32, torch.float16, torch.float64, torch.bfloat16]
    tensors = [torch.randn(int(torch.randint(1, 200, (1,), generator=g)), generator=g).to(dtypes[i % 4]).to(device)
               for i in range(600)]
    tensors.append(torch.randn(70000, generator=g).to(device))
    mus = [0.01 * (1 + i % 7) for i in range(len(tensors))]
    expected = [reference.prox(t.double() if t.dtype == torch.float64 else t.float(), m, "tl1", a=0.5).to(t.dtype)
                for t, m in zip(tensors, mus)]
    ops.penalty_prox_(tensors, "tl1", mus, a=0.5)
    for got, want in zip(tensors, expected):
        torch.testing.assert_close(got, want, **TOL[got.dtype])


def test_prox_rejects_bad_arguments():
    w = [torch.randn(4)]
    with pytest.raises(RuntimeError, match="SCAD penalty needs a finite a > 2"):
        ops.penalty_prox_(w, "scad", [0.1], a=2.0, knee=0.1)
    with pytest.raises(RuntimeError, match="Lp penalty needs 0 < p < 1"):
        ops.penalty_prox_(w, "lp", [0.1], p=1.5)
    with pytest.raises(RuntimeError, match="unknown penalty 'l0'"):
        ops.penalty_prox_(w, "l0", [0.1])
    with pytest.raises(RuntimeError, match="scale must have 1 entry or one per tensor"):
        ops.penalty_prox_(w, "l1", [0.1, 0.2])
    with pytest.raises(RuntimeError, match="scale must be finite and >= 0"):
        ops.penalty_prox_(w, "l1", [-0.1])
    with pytest.raises(RuntimeError, match="must be floating point"):
        ops.penalty_prox_([torch.arange(4)], "l1", [0.1])
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.penalty_prox_([torch.randn(4, 4).t()], "l1", [0.1])


@pytest.mark.parametrize("device", devices())
def test_prox_opcheck(device):
    args = ([torch.randn(7, device=device), torch.randn(3, device=device, dtype=torch.float64)], "mcp", [0.5, 0.2],
            0.0, 3.0, 0.3, 0.0)
    opcheck(torch.ops.slimcore.penalty_prox_.default, args)


def test_prox_matches_closed_form_spot_values():
    # Hand-derived points independent of both implementations.
    # L1 soft threshold; L2 shrink v/(1+2mu); MCP firm threshold gamma*(u-c*lam)/(gamma-c).
    v = torch.tensor([1.0], dtype=torch.float64)
    assert reference.prox(v, 0.25, "l1").item() == pytest.approx(0.75)
    assert kernel_prox(v, 0.25, ("l2", 0, 0, 0, 0)).item() == pytest.approx(1.0 / 1.5)
    assert kernel_prox(torch.tensor([0.5], dtype=torch.float64), 0.5, ("mcp", 0, 3.0, 0.3, 0)).item() == pytest.approx(
        3.0 * (0.5 - 0.15) / 2.5)
    # Lp p=1/2 jump at the threshold: prox(thr+) -> mu^(2/3).
    mu = 0.1
    thr = 1.5 * mu ** (2 / 3)
    x = kernel_prox(torch.tensor([thr * (1 + 1e-9)], dtype=torch.float64), mu, ("lp", 0.5, 0, 0, 0)).item()
    assert x == pytest.approx(mu ** (2 / 3), rel=1e-4)
    assert kernel_prox(torch.tensor([thr * (1 - 1e-9)], dtype=torch.float64), mu, ("lp", 0.5, 0, 0, 0)).item() == 0.0
    assert math.isfinite(x)
