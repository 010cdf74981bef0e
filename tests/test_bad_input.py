"""Bad input and faults (issue 21): every case gives a clear error naming the argument or the
problem, or the correct result; never a silent wrong answer, never a traceback from the CLI.

Covers the ops (mixed devices reaching the Meta kernels, empty lists), sparse_bn_step (frozen
gamma), SlimBatchNorm (meta parameters, double backward), channel_gather(_), prune (numpy numbers,
``ignore``/``leaf_modules``, an optimizer not passed), save_pruned/load_pruned (permissions,
damaged files, another architecture, crafted configs, leftover temporary files), the CLI, and
faults (SIGKILL during training and during a checkpoint write)."""

import copy
import math
import os
import pickle
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import slimcore
from slimcore import ops
from slimcore.pipeline import cli
from slimcore._io import CheckpointError, atomic_save

# ------------------------------------------------------------------------------------------ ops


def _mixed(n=3):
    return [torch.ones(n, device="meta"), torch.ones(n)]


@pytest.mark.parametrize("order", ["meta-first", "cpu-first"])
def test_penalty_ops_refuse_lists_mixing_meta_and_cpu(order):
    weights = _mixed() if order == "meta-first" else _mixed()[::-1]
    grads = [torch.zeros(3), torch.zeros(3)]
    for call in (lambda: ops.penalty_subgradient_(weights, grads, "l1", [1.0]),
                 lambda: ops.penalty_prox_(weights, "l1", [1.0]),
                 lambda: ops.penalty_value(weights, "l1", [1.0])):
        with pytest.raises(RuntimeError, match=r"weights\[\d\] is on (meta|cpu) but weights\[0\] is on (cpu|meta)"):
            call()
    # the CPU list with meta grads: the grads are named
    with pytest.raises(RuntimeError, match=r"grads\[0\] is on meta"):
        ops.penalty_subgradient_([torch.ones(3)], [torch.zeros(3, device="meta")], "l1", [1.0])


def test_penalty_ops_all_meta_still_trace():
    w = [torch.ones(3, device="meta"), torch.ones(2, device="meta")]
    v = ops.penalty_value(w, "l1", [1.0])
    assert v.device.type == "meta" and v.shape == () and v.dtype == torch.float32


def test_penalty_value_of_an_empty_list_is_zero_and_checks_its_arguments():
    v = ops.penalty_value([], "l1", [1.0])
    assert v.dtype == torch.float32 and v.shape == () and float(v) == 0.0
    with pytest.raises(ValueError, match="SCAD penalty needs a finite a > 2"):
        ops.penalty_value([], "scad", [1.0], a=1.5)
    with pytest.raises(ValueError, match="scale must be finite and >= 0"):
        ops.penalty_value([], "l1", [-1.0])
    with pytest.raises(ValueError, match="unknown penalty 'l3'"):
        ops.penalty_subgradient_([], [], "l3", [1.0])
    with pytest.raises(ValueError, match="MCP penalty needs a finite gamma > 1"):
        ops.penalty_prox_([], "mcp", [1.0], a=1.0, knee=0.1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scale=st.one_of(st.floats(max_value=-1e-300), st.just(math.nan), st.just(math.inf), st.just(-math.inf)))
def test_penalty_ops_refuse_bad_scales(scale):
    w = [torch.randn(5)]
    before = w[0].clone()
    g = [torch.zeros(5)]
    for call in (lambda: ops.penalty_subgradient_(w, g, "l1", [scale]),
                 lambda: ops.penalty_prox_(w, "l1", [scale]),
                 lambda: ops.penalty_value(w, "l1", [scale])):
        with pytest.raises((RuntimeError, ValueError), match="scale must be finite and >= 0"):
            call()
    assert torch.equal(w[0], before) and torch.equal(g[0], torch.zeros(5)), "a refused call must not write"


def test_channel_gather_refuses_an_index_on_another_device():
    w = torch.randn(4, 3)
    for op in (ops.channel_gather, ops.channel_gather_):
        with pytest.raises((ValueError, RuntimeError), match="out_index is on meta but weight is on cpu"):
            op(w.clone(), torch.tensor([0, 2], device="meta"), None)
    with pytest.raises((ValueError, RuntimeError), match="in_index is on cpu but weight is on meta"):
        ops.channel_gather(torch.ones(4, 3, device="meta"), None, torch.tensor([0, 1]))


@settings(max_examples=30, deadline=None)
@given(bad=st.integers(min_value=-50, max_value=50).filter(lambda v: not 0 <= v < 4))
def test_channel_gather_names_an_out_of_range_index(bad):
    w = torch.randn(4, 3)
    with pytest.raises(IndexError, match=rf"out_index\[1\] = {bad} is out of range"):
        ops.channel_gather(w, torch.tensor([0, bad]), None)


# ------------------------------------------------------------------------------ SlimBatchNorm


def test_slim_batchnorm_with_meta_parameters_refuses_a_cpu_input_like_batchnorm():
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(Exception):
        nn.BatchNorm2d(3, device="meta")(x)  # what the user compares with: it refuses
    for training in (True, False):
        bn = slimcore.SlimBatchNorm2d(3, device="meta", lam=1e-4).train(training)
        with pytest.raises(RuntimeError, match="slimcore.batch_norm: weight is on meta but input is on cpu"):
            bn(x)
        with torch.no_grad(), pytest.raises(RuntimeError, match="weight is on meta but input is on cpu"):
            bn(x)
    # and the other way round: a meta input with CPU parameters
    with pytest.raises(RuntimeError, match="weight is on cpu but input is on meta"):
        slimcore.SlimBatchNorm2d(3)(torch.randn(4, 3, 5, 5, device="meta"))


def _explicit_penalty(w, penalty, lam):
    """lam * sum g(w) from plain torch ops (independent of slimcore)."""
    if penalty == "l2":
        return lam * (w * w).sum()
    if penalty == "tl1":
        a = 0.5
        return lam * ((a + 1) * w.abs() / (a + w.abs())).sum()
    if penalty == "l1":
        return lam * w.abs().sum()
    raise AssertionError(penalty)


@pytest.mark.parametrize("training", [True, False])
def test_slim_batchnorm_second_derivatives_match_gradcheck(training):
    torch.manual_seed(0)
    bn = slimcore.SlimBatchNorm2d(3, dtype=torch.float64, lam=0.0).train(training)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    w = bn.weight.detach().clone().requires_grad_()
    b = bn.bias.detach().clone().requires_grad_()

    def f(x, w, b):
        return slimcore.ops.batch_norm(x, w, b, bn.running_mean, bn.running_var, training, 0.0, 1e-5)[0]

    torch.autograd.gradcheck(f, (x, w, b))
    torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("penalty", ["l1", "l2", "tl1"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_slim_batchnorm_double_backward_equals_batchnorm_plus_penalty(penalty, training, channels_last):
    """Training with a gradient penalty, loss + ||d loss / d x||^2 + ||d loss / d gamma||^2, through
    SlimBatchNorm2d equals the same through nn.BatchNorm2d with lam * sum g(gamma) added to the loss.
    (SlimBatchNorm adds the penalty once per backward call, so loss and gradient penalty go into
    one backward, as in training.)"""
    torch.manual_seed(1)
    lam = 0.3
    pen = slimcore.TL1(a=0.5) if penalty == "tl1" else penalty
    slim = slimcore.SlimBatchNorm2d(4, dtype=torch.float64, penalty=pen, lam=lam).train(training)
    ref = nn.BatchNorm2d(4, dtype=torch.float64).train(training)
    with torch.no_grad():
        for m in (slim, ref):
            m.weight.copy_(torch.tensor([0.7, -1.2, 0.4, 1.5], dtype=torch.float64))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64))
            m.running_mean.copy_(torch.tensor([0.1, 0.2, -0.3, 0.0], dtype=torch.float64))
            m.running_var.copy_(torch.tensor([0.9, 1.1, 1.3, 0.7], dtype=torch.float64))
    x0 = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    target = torch.randn(3, 4, 3, 3, dtype=torch.float64)

    def gradient_penalty(module, explicit):
        x = x0.clone().requires_grad_()
        loss = ((module(x) - target) ** 3).mean()  # cubic: its second derivative is not constant
        if explicit:
            loss = loss + _explicit_penalty(module.weight, penalty, lam)
        gx, gw = torch.autograd.grad(loss, (x, module.weight), create_graph=True)
        gp = (gx ** 2).sum() + (gw ** 2).sum()
        return (gx, gw) + torch.autograd.grad(loss + gp, (x, module.weight, module.bias))

    got = gradient_penalty(slim, False)
    want = gradient_penalty(ref, True)
    for name, g, w in zip(("dx", "dgamma", "d(loss+gp)/dx", "d(loss+gp)/dgamma", "d(loss+gp)/dbeta"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=f"{name} differs")
    # the second derivatives matter here: without them the result differs
    first_order = torch.autograd.grad(((ref(x0.clone().requires_grad_()) - target) ** 3).mean()
                                      + _explicit_penalty(ref.weight, penalty, lam), ref.weight)[0]
    assert not torch.allclose(got[3], first_order, rtol=1e-3), "the second derivative must not be silently zero"


def test_slim_batchnorm_first_order_backward_unchanged_with_grad_mode_off():
    # the fused kernel (no create_graph) and the differentiable path agree
    torch.manual_seed(2)
    bn = slimcore.SlimBatchNorm2d(3, dtype=torch.float64, penalty="l1", lam=0.1)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    out = bn(x)
    g = torch.randn_like(out)
    fused = torch.autograd.grad(out, (x, bn.weight, bn.bias), g, retain_graph=True)
    graph = torch.autograd.grad(out, (x, bn.weight, bn.bias), g, create_graph=True)
    for a, b in zip(fused, graph):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ sparse_bn_step


class _TwoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn1 = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn2(torch.relu(self.bn1(self.conv(x))))


def test_sparse_bn_step_skips_frozen_gamma():
    torch.manual_seed(0)
    model = _TwoBN()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([0.5, -0.2, 0.0]))
        model.bn2.weight.copy_(torch.tensor([-0.3, 0.4, 1.0]))
    model.bn1.weight.requires_grad_(False)
    model(torch.randn(4, 2, 3, 3)).square().sum().backward()
    assert model.bn1.weight.grad is None
    before = model.bn2.weight.grad.clone()
    slimcore.sparse_bn_step(model, lam=0.1)  # no "call loss.backward() first"
    assert model.bn1.weight.grad is None, "a frozen gamma gets no gradient"
    torch.testing.assert_close(model.bn2.weight.grad, before + 0.1 * torch.sign(model.bn2.weight))
    # proximal mode leaves the frozen gamma alone
    frozen = model.bn1.weight.clone()
    slimcore.sparse_bn_step(model, lam=0.5, mode="proximal", lr=1.0)
    assert torch.equal(model.bn1.weight, frozen)
    torch.testing.assert_close(model.bn2.weight, torch.tensor([0.0, 0.0, 0.5]))
    assert [w is model.bn2.weight for w in slimcore.SparseBNStep(model).weights] == [True]


def test_sparse_bn_step_with_every_gamma_frozen_says_so():
    model = _TwoBN().requires_grad_(False)
    with pytest.raises(ValueError, match=r"every BatchNorm weight of _TwoBN is frozen \(requires_grad=False\)"):
        slimcore.sparse_bn_step(model, lam=0.1)


def test_sparse_bn_step_still_asks_for_backward_when_a_trainable_gamma_has_no_grad():
    with pytest.raises(ValueError, match=r"bn1.weight, bn2.weight has no .grad; call loss.backward\(\) first"):
        slimcore.sparse_bn_step(_TwoBN(), lam=0.1)


@pytest.mark.parametrize("lam", [-1.0, math.nan, math.inf, "0.1", True])
def test_sparse_bn_step_refuses_a_bad_lam(lam):
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        slimcore.sparse_bn_step(_TwoBN(), lam=lam)


# ------------------------------------------------------------------------------------- prune


def _lenet():
    torch.manual_seed(0)
    model = slimcore.models.build("lenet5", num_classes=10, in_channels=1, input_size=28)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.01)
    return model.eval(), torch.randn(2, 1, 28, 28)


@pytest.mark.parametrize("ratio", [np.float32(0.5), np.float64(0.5), np.array(0.5)[()]])
def test_prune_accepts_numpy_numbers(ratio):
    model, x = _lenet()
    want = slimcore.prune(copy.deepcopy(model), x, ratio=0.5)
    got = slimcore.prune(model, x, ratio=ratio, round_to=np.int64(1), min_channels=np.int32(1),
                         max_layer_ratio=np.float32(1.0))
    assert got.channels == want.channels and got.removed == want.removed and type(got.ratio) is float


def test_ratio_searches_accept_numpy_targets():
    model, x = _lenet()
    assert slimcore.ratio_for_flops(model, x, np.float32(0.5)) == slimcore.ratio_for_flops(model, x, 0.5)
    assert slimcore.ratio_for_channels(model, x, np.float64(0.4)) == slimcore.ratio_for_channels(model, x, 0.4)
    with pytest.raises(ValueError, match=r"flops_fraction must be in \(0, 1\], got True"):
        slimcore.ratio_for_flops(model, x, True)


@pytest.mark.parametrize("ratio", [True, np.bool_(False), "0.5", None, math.nan, 1.0])
def test_prune_refuses_a_ratio_that_is_not_a_number_in_range(ratio):
    model, x = _lenet()
    with pytest.raises(ValueError, match="ratio must be a number in"):
        slimcore.prune(model, x, ratio=ratio)


def test_prune_ignore_takes_one_name_as_one_entry():
    model, x = _lenet()
    name = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    one = slimcore.prune(copy.deepcopy(model), x, ratio=0.5, ignore=name)
    listed = slimcore.prune(copy.deepcopy(model), x, ratio=0.5, ignore=[name])
    assert one.removed == listed.removed and name not in one.removed
    with pytest.raises(ValueError, match="ignore names '34', which is not a submodule"):
        slimcore.prune(model, x, ratio=0.5, ignore="34")  # not '3' and '4'


def test_prune_refuses_a_string_for_leaf_modules():
    model, x = _lenet()
    with pytest.raises(TypeError, match="leaf_modules must be submodules or module classes, not a string"):
        slimcore.prune(model, x, ratio=0.5, leaf_modules="features")
    with pytest.raises(TypeError, match="leaf_modules must be"):
        slimcore.ratio_for_flops(model, x, 0.5, leaf_modules="features")


def _adam_trained():
    model, x = _lenet()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    opt.step()
    return model.eval(), x, opt


def test_prune_warns_about_an_optimizer_with_state_that_was_not_passed():
    model, x, opt = _adam_trained()
    with pytest.warns(UserWarning, match=r"Adam optimizer holds state .* not passed as optimizer="):
        slimcore.prune(model, x, ratio=0.5)
    model.train()
    nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    with pytest.raises(RuntimeError):  # what the warning predicted
        opt.step()


def test_prune_does_not_warn_when_the_optimizer_is_passed_or_it_is_a_dry_run(recwarn):
    model, x, opt = _adam_trained()
    slimcore.prune(model, x, ratio=0.3, dry_run=True)
    slimcore.prune(model, x, ratio=0.5, optimizer=opt)
    assert not [w for w in recwarn if "optimizer" in str(w.message)]
    model.train()
    nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    opt.step()  # the compacted state fits
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        slimcore.prune(model, x, ratio=0.1, optimizer=[opt])


# --------------------------------------------------------------------------- save / load


def _pruned_lenet():
    model, x = _lenet()
    slimcore.prune(model, x, ratio=0.5)
    return model, x


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_save_pruned_gets_torch_save_permissions(tmp_path, umask):
    model, _ = _pruned_lenet()
    old = os.umask(umask)
    try:
        slimcore.save_pruned(model, tmp_path / "a.pt")
        torch.save({}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "a.pt").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "b.pt").st_mode) == 0o666 & ~umask


def _lenet_builder(kernel=None):
    def build():
        m = slimcore.models.build("lenet5", num_classes=10, in_channels=1, input_size=28)
        if kernel is not None:  # same layer names, another kernel size
            conv = next(c for c in m.modules() if isinstance(c, nn.Conv2d))
            conv.kernel_size = (kernel, kernel)
            conv.padding = ((kernel - 1) // 2,) * 2
            conv.weight = nn.Parameter(torch.randn(conv.out_channels, conv.in_channels, kernel, kernel))
        return m
    return build


def _no_retry_advice(exc):
    assert "weights_only=False" not in str(exc), "never advise loading untrusted files with weights_only=False"


@pytest.mark.parametrize("content", ["empty", "truncated", "random", "text"])
def test_load_pruned_of_a_damaged_file_raises_checkpoint_error(tmp_path, content):
    model, _ = _pruned_lenet()
    good = tmp_path / "good.pt"
    slimcore.save_pruned(model, good, meta={"model": "lenet5"})
    data = {"empty": b"", "truncated": good.read_bytes()[: len(good.read_bytes()) // 2],
            "random": np.random.default_rng(0).bytes(4096), "text": b"not a checkpoint\n"}[content]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data)
    match = {"empty": "is empty", "truncated": "truncated or corrupted", "random": "not a torch checkpoint|truncated",
             "text": "not a torch checkpoint|truncated"}[content]
    with pytest.raises(CheckpointError, match=match) as info:
        slimcore.load_pruned(bad, _lenet_builder())
    _no_retry_advice(info.value)
    assert str(bad) in str(info.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_load_pruned_of_a_pickle_with_code_raises_checkpoint_error_without_retry_advice(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "slimcore.pruned/1", "x": _Evil()}, path)
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors") as info:
        slimcore.load_pruned(path, _lenet_builder())
    _no_retry_advice(info.value)
    with open(path, "wb") as f:
        pickle.dump({"x": _Evil()}, f)  # a plain pickle, not torch.save's zip
    with pytest.raises(CheckpointError) as info:
        slimcore.load_pruned(path, _lenet_builder())
    _no_retry_advice(info.value)


def test_load_pruned_into_another_architecture_raises_before_resizing(tmp_path):
    model, x = _pruned_lenet()
    path = tmp_path / "p.pt"
    slimcore.save_pruned(model, path)
    dense = _lenet_builder(kernel=3)()  # LeNet-5's first conv is 5x5
    calls = []

    def build():
        calls.append(1)
        return dense

    shapes = {k: v.shape for k, v in dense.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"kernel_size=\(3, 3\) need") as info:
        slimcore.load_pruned(path, build)
    assert "does not fit the model" in str(info.value)
    assert {k: v.shape for k, v in dense.state_dict().items()} == shapes, "nothing may be resized first"
    # the right architecture loads and computes the same
    loaded = slimcore.load_pruned(path, _lenet_builder()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _rewrite(path, edit):
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)


@pytest.mark.parametrize("case", ["negative", "zero", "bool", "wider", "groups", "type", "missing", "weight"])
def test_load_pruned_refuses_a_crafted_channel_config(tmp_path, case):
    model, _ = _pruned_lenet()
    path = tmp_path / "p.pt"
    slimcore.save_pruned(model, path)
    conv = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    linear = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    edits = {
        "negative": (lambda c: c["config"][conv].update(out_channels=-5), "out_channels must be a positive integer"),
        "zero": (lambda c: c["config"][conv].update(in_channels=0), "in_channels must be a positive integer"),
        "bool": (lambda c: c["config"][conv].update(groups=True), "groups must be a positive integer"),
        "wider": (lambda c: c["config"][linear].update(out_features=10_000),
                  "out_features=10000 is more than the unpruned model's"),
        "groups": (lambda c: c["config"][conv].update(groups=2), "groups=2 but the model's conv has groups=1"),
        "type": (lambda c: c["config"].update({conv: c["config"][linear]}), "but the model's Conv2d has"),
        "missing": (lambda c: c["state_dict"].pop(f"{conv}.weight"), f"no tensor '{conv}.weight'"),
        "weight": (lambda c: c["state_dict"].update({f"{linear}.weight": torch.zeros(3, 3)}),
                   r"weight has shape \(3, 3\)"),
    }
    edit, match = edits[case]
    _rewrite(path, edit)
    with pytest.raises(CheckpointError, match=match):
        slimcore.load_pruned(path, _lenet_builder())


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "model.pt"
    host = socket.gethostname().replace(".", "_")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".tmp-model.pt.{host}.{dead.pid}"
    live = tmp_path / f".tmp-model.pt.{host}.{os.getppid()}"  # a writer that is still running
    other = tmp_path / f".tmp-model.pt.otherhost.{dead.pid}"  # another machine's: cannot tell
    for f in (stale, live, other):
        f.write_bytes(b"partial")
    atomic_save({"x": torch.ones(2)}, target)
    assert not stale.exists() and live.exists() and other.exists()
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.pt", live.name, other.name])


_KILL_MID_WRITE = textwrap.dedent("""
    import os, signal, sys, torch
    from slimcore._io import atomic_save

    def partial_save(obj, f, *args, **kwargs):
        f.write(b"PK\\x03\\x04 half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = partial_save
    atomic_save({"w": torch.zeros(3)}, sys.argv[1])
""")


def test_a_kill_during_a_checkpoint_write_keeps_the_old_file_and_the_next_save_cleans_up(tmp_path):
    target = tmp_path / "checkpoint.pt"
    atomic_save({"w": torch.ones(3)}, target)
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_WRITE, str(target)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    host = socket.gethostname().replace(".", "_")
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".tmp-checkpoint.pt.{host}.")
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3)), "the old file must survive"
    atomic_save({"w": torch.full((3,), 2.0)}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"], "the next save removes the leftover"


# ---------------------------------------------------------------------------------------- CLI

TINY = ["--model", "lenet5", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--lam", "1e-3",
        "--quiet"]


def _cli_error(capsys, *argv):
    """Runs the CLI in-process (an uncaught exception fails the test with its traceback); returns
    the one error line."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}, stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got: {err}"
    assert "Traceback" not in err
    assert lines[0].startswith(f"slimcore {argv[0]}: error: "), lines[0]
    return lines[0]


def _replace(argv, flag, value):
    argv = list(argv)
    i = argv.index(flag)
    argv[i + 1] = value
    return argv


@pytest.mark.parametrize("args, match", [
    (["--lam", "-1"], r"--lam: must be a finite number >= 0, got '-1'"),
    (["--lam", "nan"], r"--lam: must be a finite number >= 0, got 'nan'"),
    (["--lam", "-1e-4"], r"--lam: must be a finite number >= 0, got '-1e-4'"),
    (["--penalty", "scad", "--a", "1.5"], r"--a \(SCAD's a\) must be > 2 for --penalty scad, got 1.5"),
    (["--penalty", "mcp", "--a", "1"], r"--a \(MCP's gamma\) must be > 1 for --penalty mcp, got 1"),
    (["--penalty", "tl1", "--a", "-2"], r"--a \(TL1's a\) must be > 0"),
    (["--penalty", "l1", "--a", "2"], "--a is a parameter of tl1, scad and mcp, not of l1"),
    (["--penalty", "lp", "--p", "1.5"], r"--p must be in \(0, 1\) for --penalty lp"),
    (["--epochs", "-3"], r"--epochs: must be an integer >= 1, got '-3'"),
    (["--epochs", "0"], r"--epochs: must be an integer >= 1, got '0'"),
    (["--batch-size", "0"], r"--batch-size: must be an integer >= 1, got '0'"),
    (["--lr", "-0.1"], r"--lr: must be a finite number > 0, got '-0.1'"),
    (["--lr", "0"], r"--lr: must be a finite number > 0"),
    (["--weight-decay", "-1e-4"], r"--weight-decay: must be a finite number >= 0, got '-1e-4'"),
    (["--weight-decay=-1e-4"], r"--weight-decay: must be a finite number >= 0, got '-1e-4'"),
    (["--momentum", "1.5"], r"--momentum: must be a number in \[0, 1\)"),
    (["--accumulate", "3"], "--batch-size 64 must be a multiple of --accumulate 3"),
    (["--val-split", "1"], r"--val-split: must be a number in \[0, 1\)"),
    (["--width", "0"], r"--width: must be a finite number > 0"),
])
def test_cli_train_refuses_bad_settings_in_one_line(tmp_path, capsys, args, match):
    argv = list(TINY)
    for flag in ("--lam", "--epochs", "--batch-size"):
        if flag in args:
            argv = [a for i, a in enumerate(argv) if not (a == flag or (i > 0 and argv[i - 1] == flag))]
    line = _cli_error(capsys, "train", *argv, *args, "--out", tmp_path / "run")
    assert __import__("re").search(match, line), line
    assert not (tmp_path / "run" / "train" / "model.pt").exists(), "nothing may be trained"


def test_cli_out_pointing_at_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    line = _cli_error(capsys, "train", *TINY, "--out", f)
    assert f"--out {f} is an existing file" in line
    line = _cli_error(capsys, "run", *TINY, "--out", f)
    assert "is an existing file" in line


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    assert cli.main(["train", *TINY, "--out", str(run)]) == 0
    return run


def test_cli_truncated_config_json(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(trained_run, run)
    text = (run / "config.json").read_text()
    (run / "config.json").write_text(text[: len(text) // 2])
    for cmd in (["prune", "--run", run], ["finetune", "--run", run, "--ratio", "0.5"], ["report", "--run", run]):
        line = _cli_error(capsys, *cmd)
        assert "config.json is not valid JSON" in line


def test_cli_truncated_model_pt(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(trained_run, run)
    model = run / "train" / "model.pt"
    model.write_bytes(model.read_bytes()[:2000])
    line = _cli_error(capsys, "prune", "--run", run, "--ratio", "0.5")
    assert "model.pt" in line and "truncated or corrupted" in line and "weights_only=False" not in line
    model.write_bytes(b"")
    assert "is empty" in _cli_error(capsys, "prune", "--run", run, "--ratio", "0.5")


def test_cli_finetune_refuses_bad_settings(trained_run, capsys):
    assert cli.main(["prune", "--run", str(trained_run), "--ratio", "0.5"]) == 0
    capsys.readouterr()
    for args, match in ((["--epochs", "0"], "--epochs: must be an integer >= 1"),
                        (["--lr", "-1"], "--lr: must be a finite number > 0"),
                        (["--batch-size", "-5"], "--batch-size: must be an integer >= 1")):
        line = _cli_error(capsys, "finetune", "--run", trained_run, "--ratio", "0.5", *args)
        assert match in line


# ------------------------------------------------------------------------------------- faults

_TRAIN_ARGS = ["--model", "lenet5", "--dataset", "synthetic", "--epochs", "4", "--batch-size", "64", "--lam", "1e-3",
               "--lr", "0.05", "--quiet"]


def test_sigkill_during_training_then_resume_is_exact(tmp_path):
    """A run killed (SIGKILL) after its first checkpoint and resumed ends exactly where an
    uninterrupted run ends, the lr schedule (MultiStepLR milestones 2 and 3) included."""
    env = dict(os.environ)
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run([sys.executable, "-m", "slimcore", "train", *_TRAIN_ARGS, "--out", str(full)], check=True, env=env)
    proc = subprocess.Popen([sys.executable, "-m", "slimcore", "train", *_TRAIN_ARGS, "--out", str(killed)], env=env)
    ckpt = killed / "train" / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    subprocess.run([sys.executable, "-m", "slimcore", "train", *_TRAIN_ARGS, "--resume", "--out", str(killed)],
                   check=True, env=env)
    a = torch.load(full / "train" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(killed / "train" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lrs = [float(line.split('"lr": ')[1].split(",")[0]) for line in open(killed / "train" / "metrics.jsonl")]
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.0005])
    assert not [p for p in (killed / "train").iterdir() if p.name.startswith(".tmp-")]
