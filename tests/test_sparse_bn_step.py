"""slimcore.sparse_bn_step / SparseBNStep / sparsity_loss (slimcore/sparsity/step.py): the penalty step over
every BatchNorm of a model, checked against the reference repo's per-layer loop and the reference ops."""

import copy
import math

import pytest
import torch
from helpers import devices
from torch import nn

import slimcore
from slimcore import reference


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 12, 3), nn.BatchNorm2d(12), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 16),
        nn.BatchNorm1d(16),
        nn.Linear(16, 4),
    )


def loss_backward(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 10, 10, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def bn_modules(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_l1_step_equals_reference_repo_updatebn():
    model = small_model()
    with torch.no_grad():
        bn_modules(model)[0].weight[2] = 0.0
    loss_backward(model)
    expected = {id(m): m.weight.grad + 1e-4 * torch.sign(m.weight.data) for m in bn_modules(model)}
    slimcore.sparse_bn_step(model, lam=1e-4)
    for m in bn_modules(model):
        torch.testing.assert_close(m.weight.grad, expected[id(m)], rtol=0, atol=0)


def test_step_covers_every_batchnorm_kind_and_only_them():
    model = nn.ModuleDict(dict(a=nn.BatchNorm1d(3), b=nn.BatchNorm2d(4), c=nn.BatchNorm3d(5), d=nn.SyncBatchNorm(6),
                               e=nn.BatchNorm2d(7, affine=False), f=nn.Linear(2, 2), g=nn.LayerNorm(3)))
    names = [n for n, _ in slimcore.bn_weights(model)]
    assert names == ["a.weight", "b.weight", "c.weight", "d.weight"]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    slimcore.sparse_bn_step(model, lam=0.5)
    for key in "abcd":
        assert torch.equal(model[key].weight.grad, torch.full_like(model[key].weight, 0.5))
    assert torch.equal(model["f"].weight.grad, torch.zeros(2, 2))
    assert torch.equal(model["g"].weight.grad, torch.zeros(3))


@pytest.mark.parametrize("penalty", [slimcore.L1(), slimcore.L2(), slimcore.Lp(0.5), slimcore.TL1(0.5),
                                     slimcore.SCAD(), slimcore.MCP(), slimcore.SCAD(theta=0.2),
                                     slimcore.MCP(gamma=2.0, theta=0.1)], ids=repr)
def test_subgradient_step_equals_reference_for_each_penalty(penalty):
    model = small_model()
    loss_backward(model)
    lam = 3e-3
    weights = [m.weight for m in bn_modules(model)]
    expected = [w.grad.clone() for w in weights]
    t = penalty.term(lam)
    reference.penalty_subgradient_([w.detach() for w in weights], expected, t.op, [t.strength], t.p, t.a, t.knee, t.eps)
    slimcore.sparse_bn_step(model, lam=lam, penalty=penalty)
    for w, e in zip(weights, expected):
        torch.testing.assert_close(w.grad, e)


def test_native_and_shape_forms_of_scad():
    # Native SCAD: lam is its own lambda, slope lam at 0. Shape form: slope lam at 0, flat beyond a*theta.
    w = nn.Parameter(torch.tensor([0.01, 0.05, 0.5, 5.0]))
    w.grad = torch.zeros(4)
    slimcore.sparse_bn_step([w], lam=0.1, penalty="scad")
    torch.testing.assert_close(w.grad, torch.tensor([0.1, 0.1, 0.0, 0.0]))
    w.grad = torch.zeros(4)
    slimcore.sparse_bn_step([w], lam=1e-3, penalty=slimcore.SCAD(a=3.7, theta=0.1))
    # |x| <= theta: slope lam; theta < |x| <= a*theta: (lam/theta)*(a*theta-|x|)/(a-1); beyond: 0.
    torch.testing.assert_close(w.grad, torch.tensor([1e-3, 1e-3, 0.0, 0.0]))


def test_lpnorm_subgradient_is_the_gradient_of_the_seed_formula():
    model = small_model()
    weights = [m.weight for m in bn_modules(model)]
    with torch.no_grad():
        for w in weights:
            w.uniform_(0.1, 1.0)  # away from 0, where eps is irrelevant
    p, lam = 0.5, 1e-3
    for w in weights:
        w.grad = torch.zeros_like(w)
    slimcore.sparse_bn_step(model, lam=lam, penalty=slimcore.LpNorm(p, eps=0.0))
    got = [w.grad.clone() for w in weights]
    # Autograd of lam * (sum_i |gamma_i|^p)^(1/p) over all BN weights, in float64.
    w64 = [w.detach().double().requires_grad_() for w in weights]
    (lam * sum((w.abs() ** p).sum() for w in w64) ** (1 / p)).backward()
    for g, w in zip(got, w64):
        torch.testing.assert_close(g.double(), w.grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("penalty", ["l1", slimcore.Lp(0.5), slimcore.TL1(1.0), slimcore.LpNorm(0.5, eps=0.0)],
                         ids=str)
def test_sparsity_loss_backward_equals_the_subgradient_step(penalty):
    model_a, model_b = small_model(), small_model()
    for m in (model_a, model_b):
        for w in slimcore.bn_weights(m):
            w[1].grad = torch.zeros_like(w[1])
    slimcore.sparsity_loss(model_a, lam=2e-3, penalty=penalty).backward()
    slimcore.sparse_bn_step(model_b, lam=2e-3, penalty=penalty)
    for (_, wa), (_, wb) in zip(slimcore.bn_weights(model_a), slimcore.bn_weights(model_b)):
        torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-5, atol=1e-9)


def test_sparsity_loss_value():
    w = [torch.tensor([1.0, -2.0, 0.0]), torch.tensor([0.5])]
    assert slimcore.sparsity_loss(w, lam=0.1).item() == pytest.approx(0.1 * 3.5)
    assert slimcore.sparsity_loss(w, lam=0.1, penalty=slimcore.LpNorm(0.5)).item() == pytest.approx(
        0.1 * (1 + math.sqrt(2) + math.sqrt(0.5)) ** 2, rel=1e-5)


@pytest.mark.parametrize("penalty", ["l1", slimcore.Lp(0.5), slimcore.Lp(2 / 3), slimcore.Lp(0.3), slimcore.TL1(0.5),
                                     "scad", "mcp"], ids=str)
def test_proximal_step_equals_reference_and_reads_group_lr(penalty):
    model = small_model()
    bns = bn_modules(model)
    other = [p for p in model.parameters() if all(p is not m.weight for m in bns)]
    opt = torch.optim.SGD([{"params": other, "lr": 0.1},
                           {"params": [bns[0].weight], "lr": 0.2},
                           {"params": [m.weight for m in bns[1:]], "lr": 0.05}], momentum=0.9)
    lam = 0.5 if str(penalty) in ("scad", "mcp") else 0.3
    pen = slimcore.penalties.get(penalty)
    t = pen.term(lam)
    momentum = 0.9
    expected = []
    for m, lr in zip(bns, [0.2, 0.05, 0.05]):
        mu = lr / (1 - momentum) * t.strength
        expected.append(reference.prox(m.weight.detach().clone(), mu, t.op, t.p, t.a, t.knee, t.eps))
    slimcore.sparse_bn_step(model, lam=lam, penalty=penalty, mode="proximal", optimizer=opt, momentum=momentum)
    for m, e in zip(bns, expected):
        torch.testing.assert_close(m.weight.detach(), e)


def test_proximal_training_gives_exact_zeros_where_subgradient_does_not():
    def train(mode):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(256, 10, generator=g)
        y = (x[:, 0] > 0).long()
        step = slimcore.SparseBNStep(model, lam=2e-2, mode=mode, momentum=0.9 if mode == "proximal" else 0.0)
        for _ in range(300):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if mode == "subgradient":
                step()
                opt.step()
            else:
                opt.step()
                step(optimizer=opt)
        return model[1].weight.detach()

    prox, sub = train("proximal"), train("subgradient")
    assert (prox == 0).sum() >= 16, f"proximal mode should zero many gammas exactly, got {(prox == 0).sum()}"
    assert (sub == 0).sum() == 0
    assert (sub.abs() < 1e-2).sum() >= 16  # subgradient mode drives them near zero, not to zero


def test_params_iterable_and_prepared_step_agree():
    model_a, model_b = small_model(), small_model()
    loss_backward(model_a)
    loss_backward(model_b)
    step = slimcore.SparseBNStep(model_a, lam=1e-3, penalty="tl1")
    step()
    slimcore.sparse_bn_step((w for _, w in slimcore.bn_weights(model_b)), lam=1e-3, penalty="tl1")
    for (_, wa), (_, wb) in zip(slimcore.bn_weights(model_a), slimcore.bn_weights(model_b)):
        assert torch.equal(wa.grad, wb.grad)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_step_on_low_and_high_precision_models(dtype, device):
    model = small_model().to(device=device, dtype=dtype)
    for _, w in slimcore.bn_weights(model):
        w.grad = torch.zeros_like(w)
    ref = copy.deepcopy(model)
    slimcore.sparse_bn_step(model, lam=0.25, penalty=slimcore.TL1(1.0))
    slimcore.sparse_bn_step(model, lam=0.25, penalty=slimcore.TL1(1.0), mode="proximal", lr=0.1)
    for (_, w), (_, r) in zip(slimcore.bn_weights(model), slimcore.bn_weights(ref)):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        want_grad = (0.25 * reference.subgradient(r.detach().to(acc), "tl1", a=1.0)).to(dtype)
        want_w = reference.prox(r.detach().to(acc), 0.025, "tl1", a=1.0).to(dtype)
        tol = dict(rtol=1e-2, atol=1e-2) if dtype != torch.float64 else {}
        torch.testing.assert_close(w.grad, want_grad, **tol)
        torch.testing.assert_close(w.detach(), want_w, **tol)


def test_nan_gamma_stays_nan():
    w = nn.Parameter(torch.tensor([float("nan"), 1.0]))
    w.grad = torch.zeros(2)
    slimcore.sparse_bn_step([w], lam=1e-2)
    assert torch.isnan(w.grad[0]) and w.grad[1] == pytest.approx(1e-2)
    slimcore.sparse_bn_step([w], lam=1e-2, mode="proximal", lr=1.0)
    assert torch.isnan(w[0])


def test_lpnorm_with_a_nan_gamma_makes_every_gradient_nan():
    w = nn.Parameter(torch.tensor([float("nan"), 1.0, 0.5]))
    w.grad = torch.zeros(3)
    slimcore.sparse_bn_step([w], lam=1e-2, penalty=slimcore.LpNorm(0.5))
    assert torch.isnan(w.grad).all()


def test_clear_errors_on_bad_input():
    model = small_model()
    with pytest.raises(ValueError, match=r"1.weight, 3.1.weight, 7.weight has no .grad; call loss.backward\(\) first"):
        slimcore.sparse_bn_step(model)
    with pytest.raises(ValueError, match="has no BatchNorm layer"):
        slimcore.sparse_bn_step(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="parameter iterable is empty"):
        slimcore.sparse_bn_step([])
    with pytest.raises(ValueError, match="Lp needs 0 < p < 1"):
        slimcore.sparse_bn_step(model, penalty=slimcore.Lp(1.5))
    with pytest.raises(ValueError, match="SCAD needs a > 2"):
        slimcore.SCAD(a=2.0)
    with pytest.raises(ValueError, match="MCP needs gamma > 1"):
        slimcore.penalties.get("mcp", gamma=0.5)
    with pytest.raises(ValueError, match="unknown penalty 'l0'"):
        slimcore.sparse_bn_step(model, penalty="l0")
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        slimcore.sparse_bn_step(model, lam=-1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        slimcore.sparse_bn_step(model, mode="prox")
    with pytest.raises(ValueError, match="LpNorm has no proximal operator"):
        slimcore.sparse_bn_step(model, penalty=slimcore.LpNorm(0.5), mode="proximal", lr=0.1)
    with pytest.raises(ValueError, match="needs exactly one of lr= or optimizer="):
        slimcore.sparse_bn_step(model, mode="proximal")
    with pytest.raises(ValueError, match="are for mode='proximal'"):
        slimcore.sparse_bn_step(model, lr=0.1)
    with pytest.raises(ValueError, match="momentum must be a finite number in"):
        slimcore.sparse_bn_step(model, mode="proximal", lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="is not in any param group"):
        slimcore.sparse_bn_step(model, mode="proximal", optimizer=torch.optim.SGD(model[0].parameters(), lr=0.1))
    with pytest.raises(TypeError, match="not a single tensor"):
        slimcore.sparse_bn_step(torch.zeros(3))
    ints = [torch.zeros(3, dtype=torch.int64)]
    ints[0].grad = None
    with pytest.raises(RuntimeError, match="must be floating point"):
        slimcore.sparse_bn_step(ints, mode="proximal", lr=0.1)
