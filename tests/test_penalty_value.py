"""slimcore::penalty_value (csrc/cpu/penalty_value.cpp, csrc/cuda/penalty_value.cu) against
reference.penalty_value; its autograd formula against the subgradient op."""

import pytest
import torch
from helpers import DTYPES, PENALTY_CASES, case_id, devices, sample_values
from torch.library import opcheck

from slimcore import ops, reference


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PENALTY_CASES, ids=case_id)
def test_value_kernel_matches_reference(case, dtype, device):
    name, p, a, knee, eps = case
    weights = [sample_values(n=n, seed=n).to(dtype).to(device) for n in (3, 500, 70000)]
    weights.append(torch.empty(0, dtype=dtype, device=device))
    scales = [0.5, 1.0, 1e-3, 2.0]
    got = ops.penalty_value(weights, name, scales, p, a, knee, eps)
    want = reference.penalty_value(weights, name, scales, p, a, knee, eps)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == () and got.device.type == device
    # Sums of ~70k terms in a different order: relative tolerance.
    torch.testing.assert_close(got, want, rtol=1e-9 if dtype == torch.float64 else 1e-5, atol=1e-6)


@pytest.mark.parametrize("device", devices())
def test_value_propagates_nan(device):
    got = ops.penalty_value([torch.tensor([1.0, float("nan")], device=device)], "l1", [1.0])
    assert torch.isnan(got)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", PENALTY_CASES, ids=case_id)
def test_value_gradient_is_the_subgradient(case, device):
    name, p, a, knee, eps = case
    weights = [sample_values(n=n, seed=n).float().to(device).requires_grad_() for n in (10, 300)]
    ops.penalty_value(weights, name, [0.7, 0.2], p, a, knee, eps).mul(3.0).backward()
    for w, s in zip(weights, (0.7, 0.2)):
        torch.testing.assert_close(w.grad, 3.0 * s * reference.subgradient(w.detach(), name, p, a, knee, eps))


@pytest.mark.parametrize("device", devices())
def test_value_opcheck(device):
    w = [torch.randn(7, device=device), torch.randn(5, device=device)]
    opcheck(torch.ops.slimcore.penalty_value.default, (w, "tl1", [1.0], 0.0, 1.0, 0.0, 0.0))
    wg = [t.clone().requires_grad_() for t in w]
    opcheck(torch.ops.slimcore.penalty_value.default, (wg, "scad", [0.5, 2.0], 0.0, 3.7, 0.4, 0.0))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_ops_work_under_torch_compile(backend):
    def penalty_step(weights, grads):
        ops.penalty_subgradient_(weights, grads, "l1", [1e-2])
        ops.penalty_prox_(weights, "tl1", [0.05], a=1.0)
        return ops.penalty_value(weights, "lp", [1.0], p=0.5)

    torch.manual_seed(0)
    w_eager = [torch.randn(8), torch.randn(16)]
    g_eager = [torch.randn(8), torch.randn(16)]
    w_comp = [t.clone() for t in w_eager]
    g_comp = [t.clone() for t in g_eager]
    want = penalty_step(w_eager, g_eager)
    got = torch.compile(penalty_step, fullgraph=True, backend=backend)(w_comp, g_comp)
    torch.testing.assert_close(got, want)
    for a, b in zip(w_comp + g_comp, w_eager + g_eager):
        torch.testing.assert_close(a, b)
