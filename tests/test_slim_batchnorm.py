"""slimcore.SlimBatchNorm1d/2d, convert_bn, revert_bn, set_penalty_scale (slimcore/sparsity/batchnorm.py): drop-in
nn.BatchNorm semantics, the fused penalty against nn.BatchNorm + sparse_bn_step (one step, a short
sparsity-training run, gradient accumulation), torch.compile, fx, and the pruner on converted models."""

import copy

import pytest
import torch
import torch.fx
from helpers import assert_same_function, devices, randomize_batchnorms, zero_removed
from torch import nn

import slimcore
import slimcore.models as seed_models
from slimcore import reference
from slimcore.nn import SelectedBatchNorm2d, SelectedSlimBatchNorm2d, SlimBatchNorm1d, SlimBatchNorm2d


def pair(cls_nn, cls_slim, *args, device="cpu", **kwargs):
    torch.manual_seed(0)
    ref = cls_nn(*args, **kwargs).to(device)
    slim = cls_slim(*args, **kwargs).to(device)
    randomize_batchnorms(ref, seed=3)
    slim.load_state_dict(ref.state_dict())
    return ref, slim


def assert_modules_agree(ref, slim, atol=2e-5):
    for (name, a), (_, b) in zip(ref.state_dict().items(), slim.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")
    for name in ("weight", "bias"):
        a, b = getattr(ref, name), getattr(slim, name)
        if a is not None and a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=atol, msg=lambda m: f"{name}.grad: {m}")


KWARGS = [
    {}, {"momentum": None}, {"track_running_stats": False}, {"affine": False}, {"eps": 1e-3, "momentum": 0.3},
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kwargs", KWARGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "1d", "1d-ncl", "sliced"])
def test_drop_in_for_nn_batchnorm(layout, kwargs, device):
    """Same outputs, gradients, running statistics and num_batches_tracked as nn.BatchNorm over
    several training steps, then in eval mode (lam = 0: plain BatchNorm)."""
    one_d = layout.startswith("1d")
    ref, slim = pair(nn.BatchNorm1d if one_d else nn.BatchNorm2d, SlimBatchNorm1d if one_d else SlimBatchNorm2d, 7,
                     device=device, **kwargs)
    shape = {"1d": (16, 7), "1d-ncl": (4, 7, 9)}.get(layout, (4, 7, 5, 6))
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        training = step < 3
        ref.train(training)
        slim.train(training)
        x = (torch.randn(shape if layout != "sliced" else (4, 7, 5, 12), generator=g) * 2 + 1).to(device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        if layout == "sliced":
            x = x[..., ::2]  # neither contiguous nor channels_last: one explicit copy in forward
        dy = torch.randn(shape, generator=g).to(device)
        x1, x2 = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        for m in (ref, slim):
            m.zero_grad()
        y1, y2 = ref(x1), slim(x2)
        y1.backward(dy)
        y2.backward(dy)
        torch.testing.assert_close(y2, y1, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=2e-5)
        if layout == "channels_last":
            assert y2.is_contiguous(memory_format=torch.channels_last)
        assert_modules_agree(ref, slim)


def test_state_dict_interchange_and_identity():
    ref, slim = pair(nn.BatchNorm2d, SlimBatchNorm2d, 5)
    assert isinstance(slim, nn.BatchNorm2d) and isinstance(slim, nn.modules.batchnorm._BatchNorm)
    assert list(ref.state_dict()) == list(slim.state_dict())
    back = nn.BatchNorm2d(5)
    back.load_state_dict(slim.state_dict())
    fresh = SlimBatchNorm2d(5, penalty="tl1", lam=1e-3)
    fresh.load_state_dict(ref.state_dict())
    assert [n for n, _ in fresh.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in fresh.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert "penalty=TL1(a=1.0), lam=0.001" in repr(fresh)
    clone = copy.deepcopy(fresh)
    assert clone.lam == 1e-3 and clone.penalty == slimcore.TL1()


def test_penalty_settings_and_validation():
    bn = SlimBatchNorm2d(3)
    assert bn.lam == 0.0 and bn.penalty_scale == 1.0 and bn.penalty == slimcore.L1()
    bn.lam = 1e-3
    bn.penalty = "scad"
    bn.penalty = slimcore.Lp(0.5)
    bn.penalty_scale = 0.25
    assert bn._penalty_args == ("lp", 1e-3 * 0.25, 0.5, 0.0, 0.0, 1e-4)
    with pytest.raises(ValueError, match="LpNorm couples every BN weight"):
        bn.penalty = slimcore.LpNorm(0.5)
    with pytest.raises(ValueError, match="unknown penalty"):
        SlimBatchNorm2d(3, penalty="l3")
    for bad in (-1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
            bn.lam = bad
    with pytest.raises(ValueError, match="penalty_scale must be a finite number >= 0"):
        bn.penalty_scale = -0.5
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        slimcore.convert_bn(nn.Sequential(nn.BatchNorm2d(3)), lam=-1)
    # SCAD's native form has strength 1 and knee lam: lam = 0 must still be exactly plain BN
    bn.penalty, bn.lam, bn.penalty_scale = "scad", 0.0, 1.0
    assert bn._penalty_args[1] == 0.0


def test_single_value_per_channel_raises_like_pytorch():
    ref, slim = nn.BatchNorm2d(3), SlimBatchNorm2d(3)
    x = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError) as want:
        ref(x)
    with pytest.raises(ValueError) as got:
        slim(x)
    assert str(got.value) == str(want.value)
    slim.eval()
    torch.testing.assert_close(slim(x), ref.eval()(x))
    with pytest.raises(ValueError, match="expected 4D input"):
        slim(torch.randn(2, 3))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("penalty", ["l1", slimcore.TL1(a=0.5), slimcore.SCAD(theta=0.2), slimcore.Lp(0.5)], ids=str)
def test_penalty_matches_nn_plus_sparse_bn_step(penalty, device):
    ref, slim = pair(nn.BatchNorm2d, SlimBatchNorm2d, 6, device=device)
    slim.penalty, slim.lam = penalty, 3e-2
    x = torch.randn(4, 6, 5, 5, device=device)
    dy = torch.randn(4, 6, 5, 5, device=device)
    ref(x).backward(dy)
    slimcore.sparse_bn_step(ref, lam=3e-2, penalty=penalty)
    slim(x).backward(dy)
    torch.testing.assert_close(slim.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slim.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- convert / revert


def small_cnn(bn=nn.BatchNorm2d, width=8):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), bn(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), bn(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 2 * width), nn.BatchNorm1d(2 * width), nn.ReLU(),
        nn.Linear(2 * width, 10),
    )


def test_convert_and_revert_keep_modules_and_state():
    torch.manual_seed(0)
    model = nn.Sequential(small_cnn(), nn.Unflatten(1, (10, 1, 1)), nn.BatchNorm3d(10), nn.SyncBatchNorm(10))
    randomize_batchnorms(model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert slimcore.convert_bn(model, penalty=slimcore.TL1(a=0.5), lam=1e-3, penalty_scale=0.5) is model
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["0.1"] == "SlimBatchNorm2d" and kinds["0.4"] == "SlimBatchNorm2d" and kinds["0.9"] == "SlimBatchNorm1d"
    assert kinds["2"] == "BatchNorm3d" and kinds["3"] == "SyncBatchNorm"
    assert model[0][1].lam == 1e-3 and model[0][1].penalty == slimcore.TL1(a=0.5) and model[0][1].penalty_scale == 0.5
    assert all(model.get_submodule(n) is m for n, m in modules.items())
    assert all(dict(model.named_parameters())[n] is p for n, p in params.items())
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())
    assert slimcore.set_penalty_scale(model, 0.25) == 3 and model[0][4].penalty_scale == 0.25
    slimcore.convert_bn(model, "l2", lam=0.0)  # converting again updates the settings
    assert model[0][1].penalty == slimcore.L2() and model[0][1].lam == 0.0
    model[0](torch.randn(4, 3, 6, 6)).sum().backward()
    opt.step()  # the optimizer still holds the model's parameters
    assert slimcore.revert_bn(model) is model
    assert type(model[0][1]) is nn.BatchNorm2d and type(model[0][9]) is nn.BatchNorm1d
    assert not hasattr(model[0][1], "_penalty_args")
    with pytest.raises(ValueError, match="LpNorm couples"):
        slimcore.convert_bn(model, slimcore.LpNorm(0.5))
    sel = SelectedBatchNorm2d(4)
    sel.register_buffer("selected_index", torch.tensor([0, 2, 3, 5]))
    holder = nn.Sequential(sel)
    slimcore.convert_bn(holder)
    assert type(holder[0]) is SelectedSlimBatchNorm2d
    slimcore.revert_bn(holder)
    assert type(holder[0]) is SelectedBatchNorm2d


def test_sparsity_training_trajectory_matches_sparse_bn_step():
    """A short sparsity-training run (SGD, momentum, weight decay): convert_bn's fused penalty gives
    the gamma trajectory of nn.BatchNorm2d + sparse_bn_step."""
    torch.manual_seed(0)
    ref = small_cnn()
    randomize_batchnorms(ref)
    slim = slimcore.convert_bn(copy.deepcopy(ref), penalty="l1", lam=1e-2)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt_slim = torch.optim.SGD(slim.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    step = slimcore.SparseBNStep(ref, lam=1e-2, penalty="l1")
    g = torch.Generator().manual_seed(1)
    for it in range(15):
        x = torch.randn(16, 3, 8, 8, generator=g)
        if it % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 10, (16,), generator=g)
        for model, opt in ((ref, opt_ref), (slim, opt_slim)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), target).backward()
            if model is ref:
                step()
            opt.step()
        for a, b in zip(slimcore.bn_weights(ref), slimcore.bn_weights(slim)):
            torch.testing.assert_close(b[1], a[1], rtol=1e-4, atol=1e-5, msg=lambda m: f"step {it} {a[0]}: {m}")


@pytest.mark.parametrize("mode", ["scale", "last"])
def test_gradient_accumulation_counts_the_penalty_once(mode):
    """k micro-batches: penalty_scale = 1/k (or the penalty on the last micro-batch only) gives the
    gradient of one full step: mean of the micro-batch losses, then sparse_bn_step once."""
    torch.manual_seed(0)
    ref = small_cnn()
    randomize_batchnorms(ref)
    slim = slimcore.convert_bn(copy.deepcopy(ref), penalty="tl1", lam=5e-2)
    k = 3
    xs = [torch.randn(8, 3, 6, 6) for _ in range(k)]
    ref.zero_grad()
    for x in xs:
        (ref(x).square().mean() / k).backward()
    slimcore.sparse_bn_step(ref, lam=5e-2, penalty="tl1")
    slim.zero_grad()
    for i, x in enumerate(xs):
        if mode == "scale":
            slimcore.set_penalty_scale(slim, 1.0 / k)
        else:
            slimcore.set_penalty_scale(slim, 1.0 if i == k - 1 else 0.0)
        (slim(x).square().mean() / k).backward()
    for a, b in zip(slimcore.bn_weights(ref), slimcore.bn_weights(slim)):
        torch.testing.assert_close(b[1].grad, a[1].grad, rtol=1e-5, atol=1e-6)
    # without it the penalty would be counted k times
    slimcore.set_penalty_scale(slim, 1.0)
    slim.zero_grad()
    for x in xs:
        (slim(x).square().mean() / k).backward()
    w = slim[1].weight
    extra = w.grad - ref[1].weight.grad
    want = (k - 1) * 5e-2 * reference.subgradient(w.detach(), "tl1", a=1.0)
    torch.testing.assert_close(extra, want, rtol=1e-4, atol=1e-6)


def test_sparse_bn_step_still_works_on_converted_models():
    """lam = 0 in the module + sparse_bn_step = nn.BatchNorm + sparse_bn_step (both would double-count)."""
    torch.manual_seed(0)
    ref = small_cnn()
    randomize_batchnorms(ref)
    slim = slimcore.convert_bn(copy.deepcopy(ref), lam=0.0)
    x = torch.randn(8, 3, 6, 6)
    for model in (ref, slim):
        model(x).sum().backward()
        slimcore.sparse_bn_step(model, lam=1e-2)
    assert len(slimcore.bn_weights(slim)) == 3
    for a, b in zip(slimcore.bn_weights(ref), slimcore.bn_weights(slim)):
        torch.testing.assert_close(b[1].grad, a[1].grad, rtol=1e-4, atol=2e-5)


# ------------------------------------------------------------------------------ compile and fx


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_matches_eager(backend):
    torch.manual_seed(0)
    eager = slimcore.convert_bn(small_cnn(), penalty="l1", lam=1e-2)
    randomize_batchnorms(eager)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    for training in (True, True, False):
        eager.train(training)
        compiled_model.train(training)
        x = torch.randn(6, 3, 8, 8, generator=g)
        for m in (eager, compiled_model):
            m.zero_grad()
        y1, y2 = eager(x), compiled(x)
        torch.testing.assert_close(y2, y1, rtol=1e-4, atol=1e-5)
        y1.square().sum().backward()
        y2.square().sum().backward()
        params = dict(eager.named_parameters())
        for (n, p1), (_, p2) in zip(eager.named_parameters(), compiled_model.named_parameters()):
            if n == "8.bias" and training:
                # The Linear bias before the BatchNorm1d has an exactly zero gradient in training (BN
                # removes the batch mean): both sides hold rounding noise at the weight gradient's scale.
                noise = 1e-4 * params["8.weight"].grad.abs().max()
                assert p1.grad.abs().max() <= noise and p2.grad.abs().max() <= noise, (p1.grad, p2.grad, noise)
                continue
            torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"{n}: {m}")
        for (n, b1), (_, b2) in zip(eager.named_buffers(), compiled_model.named_buffers()):
            torch.testing.assert_close(b2, b1, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_pruner_sees_slim_batchnorm_as_a_batchnorm():
    """slimcore::batch_norm is one of the batch-norm ops the pruner's rules know: each converted
    BN is a BN of its own parameters, coupled to the conv before it, as nn.BatchNorm2d is."""
    from slimcore.pruning.graph import analyze

    plain = small_cnn().eval()
    model = slimcore.convert_bn(small_cnn(), lam=1e-3).eval()
    x = torch.randn(2, 3, 6, 6)
    slim_graph, plain_graph = analyze(model, (x,)), analyze(plain, (x,))
    kinds = {n: (mc.kind, mc.producer) for n, mc in slim_graph.modules.items()}
    assert kinds == {n: (mc.kind, mc.producer) for n, mc in plain_graph.modules.items()}
    assert {n for n, (k, _) in kinds.items() if k == "bn"} >= {"1", "4"}


# ------------------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("name", ["vgg11", "preresnet56"])
def test_prune_works_on_converted_models(name):
    """A converted model prunes exactly as the plain one (same channels; selection BNs stay slim)
    and keeps training with its penalty afterwards."""
    torch.manual_seed(0)
    plain = randomize_batchnorms(seed_models.build(name, num_classes=10)).eval()
    slim = slimcore.convert_bn(copy.deepcopy(plain), lam=1e-3)
    x = torch.randn(2, 3, 32, 32)
    dense = copy.deepcopy(slim)
    report_plain = slimcore.prune(plain, x, ratio=0.5, compensate=False)
    report = slimcore.prune(slim, x, ratio=0.5, compensate=False)  # the masked-model contract
    assert report.removed == report_plain.removed and report.params_after == report_plain.params_after
    zero_removed(dense, report.removed)
    assert_same_function(slim, dense, x)
    kinds = {type(m) for m in slim.modules()}
    assert SlimBatchNorm2d in kinds and nn.BatchNorm2d not in kinds
    if name == "preresnet56":
        assert SelectedSlimBatchNorm2d in kinds
    slim.train()
    slim(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(w.grad is not None for _, w in slimcore.bn_weights(slim))
    slimcore.sparse_bn_step(slim, lam=0.0)
