"""slimcore::penalty_subgradient_ (csrc/cpu/penalty_subgradient.cpp, csrc/cuda/penalty_subgradient.cu)
against reference.penalty_subgradient_, and the reference against finite differences of g."""

import pytest
import torch
from helpers import DTYPES, PENALTY_CASES, TOL, case_id, devices, sample_values
from torch.library import opcheck

from slimcore import ops, reference


@pytest.mark.parametrize("case", PENALTY_CASES, ids=case_id)
def test_reference_subgradient_is_the_derivative(case):
    name, p, a, knee, eps = case
    x = sample_values(n=400, seed=4)
    kinks = [0.0, knee, a * knee]
    away = torch.stack([(x.abs() - k).abs() > 1e-3 for k in kinks]).all(0)
    x = x[away]
    h = 1e-6
    numeric = (reference.value(x + h, name, p, a, knee, eps) - reference.value(x - h, name, p, a, knee, eps)) / (2 * h)
    torch.testing.assert_close(reference.subgradient(x, name, p, a, knee, eps), numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", PENALTY_CASES, ids=case_id)
def test_subgradient_at_zero_is_zero_and_nan_propagates(case):
    name, p, a, knee, eps = case
    w = torch.tensor([0.0, -0.0, float("nan")])
    g = torch.zeros(3)
    ops.penalty_subgradient_([w], [g], name, [1.0], p, a, knee, eps)
    assert g[0] == 0 and g[1] == 0
    assert torch.isnan(g[2]), "a NaN gamma must make its gradient NaN, not be silently skipped"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PENALTY_CASES, ids=case_id)
def test_subgradient_kernel_matches_reference(case, dtype, device):
    name, p, a, knee, eps = case
    gen = torch.Generator().manual_seed(5)
    weights = [sample_values(n=n, seed=n).to(dtype).to(device) for n in (1, 64, 2048, 40000)]
    weights.append(torch.empty(0, dtype=dtype, device=device))
    grads = [torch.randn(w.shape, generator=gen).to(dtype).to(device) for w in weights]  # += onto existing grads
    scales = [1e-4, 0.5, 2.0, 1e-2, 1.0]
    expected = [g.clone() for g in grads]
    reference.penalty_subgradient_(weights, expected, name, scales, p, a, knee, eps)
    before = [w.clone() for w in weights]
    ops.penalty_subgradient_(weights, grads, name, scales, p, a, knee, eps)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, **TOL[dtype])
    for w, w0 in zip(weights, before):
        assert torch.equal(w, w0), "weights must not be modified"


@pytest.mark.parametrize("device", devices())
def test_l1_subgradient_is_the_reference_repos_updatebn(device):
    # network-slimming main.py: m.weight.grad.data.add_(s * torch.sign(m.weight.data))
    torch.manual_seed(0)
    weights = [torch.randn(c, device=device) for c in (16, 32, 64)]
    weights[0][3] = 0.0
    grads = [torch.randn_like(w) for w in weights]
    expected = [g + 1e-4 * torch.sign(w) for g, w in zip(grads, weights)]
    ops.penalty_subgradient_(weights, grads, "l1", [1e-4])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
def test_subgradient_over_many_tensors_and_mixed_dtypes(device):
    g = torch.Generator().manual_seed(6)
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
    weights = [torch.randn(int(torch.randint(1, 300, (1,), generator=g)), generator=g).to(dtypes[i % 4]).to(device)
               for i in range(700)]
    grads = [torch.zeros_like(w) for w in weights]
    expected = [torch.zeros_like(w) for w in weights]
    scales = [1e-3 * (1 + i % 5) for i in range(len(weights))]
    reference.penalty_subgradient_(weights, expected, "scad", scales, 0.0, 3.7, 0.5, 0.0)
    ops.penalty_subgradient_(weights, grads, "scad", scales, a=3.7, knee=0.5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, **TOL[got.dtype])


def test_subgradient_rejects_mismatched_grads():
    w = [torch.randn(4), torch.randn(3)]
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape \[2\] but weights\[1\] has shape \[3\]"):
        ops.penalty_subgradient_(w, [torch.zeros(4), torch.zeros(2)], "l1", [1.0])
    with pytest.raises(RuntimeError, match=r"grads\[0\] is Double but weights\[0\] is Float"):
        ops.penalty_subgradient_(w, [torch.zeros(4, dtype=torch.float64), torch.zeros(3)], "l1", [1.0])
    with pytest.raises(RuntimeError, match="got 2 weights but 1 grads"):
        ops.penalty_subgradient_(w, [torch.zeros(4)], "l1", [1.0])
    with pytest.raises(RuntimeError, match="must be floating point"):
        ops.penalty_subgradient_([torch.ones(4, dtype=torch.int32)], [torch.ones(4, dtype=torch.int32)], "l1", [1.0])
    with pytest.raises(RuntimeError, match="TL1 penalty needs a finite a > 0"):
        ops.penalty_subgradient_(w, [torch.zeros(4), torch.zeros(3)], "tl1", [1.0], a=0.0)
    with pytest.raises(RuntimeError, match="MCP penalty needs a finite gamma > 1"):
        ops.penalty_subgradient_(w, [torch.zeros(4), torch.zeros(3)], "mcp", [1.0], a=1.0, knee=0.1)


@pytest.mark.cuda
def test_subgradient_rejects_mixed_devices():
    w = [torch.randn(4), torch.randn(3, device="cuda")]
    with pytest.raises(RuntimeError, match="mixed devices"):
        ops.penalty_subgradient_(w, [torch.zeros(4), torch.zeros(3, device="cuda")], "l1", [1.0])


@pytest.mark.parametrize("device", devices())
def test_subgradient_opcheck(device):
    w = [torch.randn(7, device=device), torch.randn(5, device=device)]
    g = [torch.randn(7, device=device), torch.randn(5, device=device)]
    opcheck(torch.ops.slimcore.penalty_subgradient_.default, (w, g, "lp", [1e-3], 0.5, 0.0, 0.0, 1e-4))
