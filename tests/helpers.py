"""Test helpers: tolerances per dtype, parameter sets covering every penalty regime, brute force."""

import numpy as np
import torch

from slimcore import reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Tolerances for compiled kernel vs reference: both compute in fp32 (fp64 for fp64) and round once.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}

# (penalty, p, a, knee, eps): every penalty and each regime of its formulas.
PENALTY_CASES = [
    ("l1", 0.0, 0.0, 0.0, 0.0),
    ("l2", 0.0, 0.0, 0.0, 0.0),
    ("lp", 0.5, 0.0, 0.0, 1e-4),
    ("lp", 2.0 / 3.0, 0.0, 0.0, 1e-4),
    ("lp", 0.25, 0.0, 0.0, 1e-3),
    ("lp", 0.75, 0.0, 0.0, 0.0),
    ("tl1", 0.0, 1.0, 0.0, 0.0),
    ("tl1", 0.0, 0.5, 0.0, 0.0),
    ("tl1", 0.0, 0.1, 0.0, 0.0),
    ("scad", 0.0, 3.7, 0.3, 0.0),
    ("scad", 0.0, 2.5, 0.2, 0.0),
    ("mcp", 0.0, 3.0, 0.3, 0.0),
    ("mcp", 0.0, 1.5, 0.2, 0.0),
]


def case_id(case):
    name, p, a, knee, eps = case
    return f"{name}-p{p:.3g}-a{a:g}-k{knee:g}"


def sample_values(n=257, seed=0, scale=1.5):
    """Random values plus the edge cases: 0, -0, tiny, negative, large."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale
    edge = torch.tensor([0.0, -0.0, 1e-7, -1e-7, 1e-3, -1e-3, 5.0, -5.0, 0.3, -0.3], dtype=torch.float64)
    return torch.cat([x, edge])


def brute_force_prox(v, mu, penalty, p, a, knee, eps):
    """Global argmin of 1/2 (x-v)^2 + mu*g(x) over a 40,001-point grid on [-|v|-.5, |v|+.5] plus 0,
    for each v (float64). Returns (argmin, min objective)."""
    v = np.asarray(v, dtype=np.float64)
    out_x, out_f = np.empty_like(v), np.empty_like(v)
    for i, vi in enumerate(v):
        r = abs(vi) + 0.5
        grid = np.concatenate([np.linspace(-r, r, 40001), [0.0]])
        xs = torch.from_numpy(grid)
        f = 0.5 * (xs - vi) ** 2 + mu * reference.value(xs, penalty, p, a, knee, 0.0)
        j = int(torch.argmin(f))
        out_x[i], out_f[i] = grid[j], float(f[j])
    return out_x, out_f


def objective(x, v, mu, penalty, p, a, knee):
    x = torch.as_tensor(x, dtype=torch.float64)
    v = torch.as_tensor(v, dtype=torch.float64)
    return (0.5 * (x - v) ** 2 + mu * reference.value(x, penalty, p, a, knee, 0.0)).numpy()


def devices():
    """CPU, and CUDA marked so conftest skips it when no GPU is visible."""
    import pytest

    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def flat_outputs(out):
    """The tensors of a model's output (nested tuples, lists and dict values), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for a in out for t in flat_outputs(a)]
    return []


def randomize_batchnorms(model, seed=0):
    """Random gamma, beta and running statistics, so a BN is not the identity and |gamma| ranks."""
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.01)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def zero_removed(model, removed):
    """Forward hooks that zero report.removed channels at each listed module's output: the masked
    dense model the pruned model must reproduce. Returns the hook handles."""
    from torch import nn

    handles = []
    for name, idx in removed.items():
        module = model.get_submodule(name)
        dim = -1 if isinstance(module, nn.Linear) else 1
        index = torch.tensor(idx, dtype=torch.long)

        def hook(m, args, out, index=index, dim=dim):
            return out.index_fill(dim, index.to(out.device), 0.0)

        handles.append(module.register_forward_hook(hook))
    return handles


def assert_same_function(pruned, masked, x, rtol=1e-4):
    with torch.no_grad():
        want, got = masked(x), pruned(x)
    scale = want.abs().max().clamp(min=1e-12)
    err = (got - want).abs().max() / scale
    assert err <= rtol, f"pruned model differs from the masked dense model: max relative error {err:.2e}"
