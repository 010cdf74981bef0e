"""slimcore.prune (slimcore/pruning/): the pruned model must compute exactly
what the dense model computes with report.removed channels zeroed at the listed modules' outputs,
and its params/FLOPs must be what the report says."""

import copy

import numpy as np
import pytest
import torch
import torchvision
from helpers import assert_same_function, randomize_batchnorms, zero_removed
from torch import nn

import slimcore
import slimcore.models as seed_models

TORCHVISION = ["resnet18", "resnet50", "vgg16_bn", "densenet121", "mobilenet_v2", "mobilenet_v3_small",
               "efficientnet_b0", "regnet_y_400mf", "resnext50_32x4d"]
SEEDS = [("vgg16", 32, 3), ("vgg19", 32, 3), ("preresnet56", 32, 3), ("preresnet164", 32, 3), ("densenet40", 32, 3),
         ("lenet5", 28, 1), ("mlp", 28, 1)]


def build_torchvision(name):
    torch.manual_seed(0)
    return randomize_batchnorms(getattr(torchvision.models, name)(num_classes=10)).eval(), torch.randn(2, 3, 64, 64)


def build_seed(name, size, channels):
    torch.manual_seed(0)
    kwargs = {"input_size": size} if name in ("lenet5", "mlp") else {}
    model = seed_models.build(name, num_classes=10, in_channels=channels, **kwargs)
    return randomize_batchnorms(model).eval(), torch.randn(2, channels, size, size)


def check_prune(model, x, **kwargs):
    dense = copy.deepcopy(model)
    report = slimcore.prune(model, x, compensate=False, **kwargs)
    zero_removed(dense, report.removed)
    assert_same_function(model, dense, x)
    flops, params = slimcore.profile(model, x)
    assert (flops, params) == (report.flops_after, report.params_after)
    assert (report.flops_before, report.params_before) == slimcore.profile(dense, x)
    for name, (before, after) in report.channels.items():
        if any(name.startswith(block + ".") for block in report.collapsed):
            assert after == 0  # the block is x + constant now
            continue
        m = model.get_submodule(name)
        assert after == (m.out_features if isinstance(m, nn.Linear) else getattr(m, "out_channels", None) or m.num_features)
        assert before - after == len(report.removed.get(name, []))
    return report


@pytest.mark.parametrize("ratio", [0.3, 0.7])
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_prune_exactly(name, ratio):
    model, x = build_torchvision(name)
    report = check_prune(model, x, ratio=ratio)
    assert report.params_after < report.params_before and report.flops_after < report.flops_before


@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize("name", ["densenet40", "densenet121"])
def test_selection_batchnorms_at_high_ratios_keep_the_inputs_they_read(name, round_to):
    """At 95% a selection BN (reading some channels of a concat) is put back to min_channels /
    round_to with channels whose input the threshold also removed; those inputs come back too.
    (Before the fix: selected_index -1 and an IndexError in forward.)"""
    model, x = build_torchvision(name) if name == "densenet121" else build_seed(name, 32, 3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand_like(m.weight) ** 3)
    report = check_prune(model, x, ratio=0.95, round_to=round_to)
    assert report.flops_after < 0.3 * report.flops_before
    for layer, (before, after) in report.channels.items():  # the inputs put back are rounded too
        if isinstance(model.get_submodule(layer), nn.Conv2d):
            assert after == before or after % round_to == 0, (layer, before, after)
    for m in model.modules():
        index = getattr(m, "selected_index", None)
        if index is not None:
            assert int(index.min()) >= 0 and len(index) >= 1


@pytest.mark.parametrize("ratio", [0.3, 0.7])
@pytest.mark.parametrize("name,size,channels", SEEDS)
def test_seed_models_prune_exactly(name, size, channels, ratio):
    model, x = build_seed(name, size, channels)
    report = check_prune(model, x, ratio=ratio)
    assert report.params_after < report.params_before


@pytest.mark.parametrize("name,size,channels", [("mlp", 28, 1), ("lenet5", 28, 1), ("vgg11", 32, 1)])
def test_a_batch_of_one_prunes_as_a_batch_of_two(name, size, channels):
    """A batch of one with a single input channel makes flatten's view ambiguous ([1, 1, 28, 28]
    -> [1, 784] fits the channels into dim 0 or dim 1); the MLP froze every layer when dim 0 was
    taken. The same channels go whatever the batch size."""
    removed = []
    for batch in (1, 2):
        model, x = build_seed(name, size, channels)
        report = check_prune(model, x[:1].expand(batch, -1, -1, -1).contiguous(), ratio=0.5)
        assert report.params_after < 0.7 * report.params_before
        removed.append({k: sorted(v) for k, v in report.removed.items()})
    assert removed[0] == removed[1]


@pytest.mark.parametrize("criterion", ["l1_filter", "cfp", "random"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121"])
def test_other_criteria_prune_exactly(name, criterion):
    model, x = build_torchvision(name)
    check_prune(model, x, ratio=0.5, criterion=criterion)


def test_layer_scope_removes_ratio_of_every_layer():
    model, x = build_seed("vgg16", 32, 3)
    report = check_prune(model, x, ratio=0.5, scope="layer")
    for name, (before, after) in report.channels.items():
        if name.startswith("features"):
            assert after == before - before // 2, name


def test_global_bn_scale_is_the_papers_percentile_on_a_plain_chain():
    model, x = build_seed("vgg19", 32, 3)
    gammas = torch.cat([m.weight.detach().abs() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    report = slimcore.prune(model, x, ratio=0.4)
    expected = int((gammas < torch.sort(gammas).values[int(0.4 * len(gammas))]).sum())
    assert sum(len(report.removed.get(n, [])) for n in bn_names) == expected


@pytest.mark.parametrize("round_to", [8, 32])
def test_round_to_and_min_channels(round_to):
    model, x = build_torchvision("resnet18")
    with torch.no_grad():  # make one layer almost dead: min_channels must keep it alive
        model.layer1[0].bn1.weight.mul_(1e-6)
    report = check_prune(model, x, ratio=0.6, round_to=round_to, min_channels=round_to)
    for name, (before, after) in report.channels.items():
        assert after == before or (after % round_to == 0 and after >= round_to), (name, before, after)
    assert report.channels["layer1.0.conv1"][1] >= round_to


def test_dry_run_reports_without_touching_the_model():
    model, x = build_torchvision("densenet121")
    before = copy.deepcopy(model.state_dict())
    dry = slimcore.prune(model, x, ratio=0.5, dry_run=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    real = slimcore.prune(model, x, ratio=0.5)
    assert (dry.params_after, dry.flops_after, dry.removed) == (real.params_after, real.flops_after, real.removed)


def test_ignore_keeps_modules_untouched():
    model, x = build_torchvision("resnet18")
    report = check_prune(model, x, ratio=0.5, ignore=["layer1.0.conv1", model.layer2[0].conv2])
    assert "layer1.0.conv1" not in report.removed and "layer2.0.conv2" not in report.removed
    assert model.layer1[0].conv1.out_channels == 64


def test_multi_pass_pruning_of_selection_batchnorms():
    model, x = build_seed("densenet40", 32, 3)
    check_prune(model, x, ratio=0.4)
    assert any(isinstance(m, slimcore.nn.SelectedBatchNorm2d) for m in model.modules())
    report = check_prune(model, x, ratio=0.3)  # prune the pruned model again
    assert report.channels_removed > 0


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_optimizer_state_follows_the_pruned_parameters(opt_name):
    torch.manual_seed(0)
    model, x = build_seed("preresnet56", 32, 3)
    model.train()
    y = torch.randint(0, 10, (2,))
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-3)}[opt_name]
    opt = make(model.parameters())

    def step(m, o):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    step(model, opt)  # fill momentum / moments
    dense = copy.deepcopy(model)
    dense_opt = make(dense.parameters())
    dense_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict may alias the tensors
    ids = [id(p) for p in model.parameters()]
    report = slimcore.prune(model.eval(), x, ratio=0.5, optimizer=opt, compensate=False)
    assert [id(p) for p in model.parameters()] == ids, "Parameters must keep their identity"
    zero_removed(dense, report.removed)
    model.train(), dense.train()
    step(model, opt)
    step(dense, dense_opt)
    assert_same_function(model.eval(), dense.eval(), x, rtol=1e-4)


def test_save_and_load_round_trip(tmp_path):
    model, x = build_seed("preresnet164", 32, 3)
    slimcore.prune(model, x, ratio=0.6)
    path = tmp_path / "pruned.pt"
    slimcore.save_pruned(model, path)
    loaded = slimcore.load_pruned(path, lambda: seed_models.build("preresnet164", num_classes=10)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="not a slimcore pruned checkpoint"):
        torch.save({"x": 1}, tmp_path / "other.pt")
        slimcore.load_pruned(tmp_path / "other.pt", lambda: seed_models.build("preresnet164"))


def test_pruned_model_scripts_traces_and_exports():
    model, x = build_seed("densenet40", 32, 3)
    slimcore.prune(model, x, ratio=0.5)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), want)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), want)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), want)
        torch.testing.assert_close(torch.compile(model, backend="aot_eager")(x), want)


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.fx cannot trace it; the capture runs it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if x.sum() > 0 else -y  # a branch on the input's values (one on y's would freeze y)


class Wrapper(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.block(x).mean((2, 3)))


def test_control_flow_on_values_is_captured_and_pruned():
    torch.manual_seed(0)
    model = randomize_batchnorms(Wrapper(DataDependent())).eval()
    x = torch.randn(2, 3, 16, 16)
    report = check_prune(model, x, ratio=0.5)
    assert report.channels["block.conv"] == (8, 4)


def test_a_model_that_does_not_run_gets_a_clear_error():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            y = self.conv(x)
            return y.view(y.shape[0], 3, -1)  # 8 x 14 x 14 values do not split into 3 rows

    model = Wrapper(Broken())
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(slimcore.TraceFailure, match=r"(?s)could not capture Wrapper.*test_prune.py:\d+: return y.view"):
        slimcore.prune(model, x)
    report = slimcore.prune(Wrapper(DataDependent()), x, leaf_modules=[DataDependent])  # opaque leaf
    assert report.removed == {}


def test_bad_arguments():
    model, x = build_seed("lenet5", 28, 1)
    for kwargs, match in [(dict(ratio=1.0), "ratio must be"), (dict(ratio=-0.1), "ratio must be"),
                          (dict(criterion="taylor"), "unknown criterion"), (dict(scope="net"), "scope must be"),
                          (dict(round_to=0), "round_to must be"), (dict(min_channels=0), "min_channels must be"),
                          (dict(ignore=["nope"]), "not a submodule"), (dict(criterion="hbfp"), "needs history")]:
        with pytest.raises(ValueError, match=match):
            slimcore.prune(model, x, **kwargs)


def test_hbfp_with_a_recorded_history():
    model, x = build_seed("lenet5", 28, 1)
    history = slimcore.FilterHistory(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    y = torch.randint(0, 10, (2,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model.train()(x), y).backward()
        opt.step()
        history.record()
    check_prune(model.eval(), x, ratio=0.5, criterion="hbfp", history=history)


def test_frozen_reasons_are_reported():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3)
            self.bn2 = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            y = self.bn(self.conv(x)).roll(1, dims=1)  # no channel rule: freezes bn's channels
            z = torch.sigmoid(self.bn2(self.conv2(y)))  # f(0) != 0 before the head: freezes bn2's
            return self.fc(z.mean((2, 3)))

    model = randomize_batchnorms(Odd()).eval()
    x = torch.randn(2, 3, 16, 16)
    report = slimcore.prune(model, x, ratio=0.9)
    assert report.removed == {}
    text = " | ".join(report.notes)
    assert "aten.roll" in text and "not zero when removed" in text


def test_pruned_model_exports_to_onnx():
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, x = build_seed("densenet40", 32, 3)
    slimcore.prune(model, x, ratio=0.5)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("criterion,scope", [("bn_scale", "global"), ("l1_filter", "layer"), ("cfp", "global"),
                                             ("random", "layer")])
@pytest.mark.parametrize("target", [0.75, 0.4])
def test_ratio_for_flops_is_the_smallest_ratio_within_the_budget(criterion, scope, target):
    model, x = build_seed("vgg16", 32, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ratio = slimcore.ratio_for_flops(model, x, target, criterion=criterion, scope=scope)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "dry runs must not change the model"

    def kept(r):
        rep = slimcore.prune(model, x, ratio=r, criterion=criterion, scope=scope, dry_run=True)
        return rep.flops_after / rep.flops_before

    # Independent check: a plain scan of ratios brackets the answer within the bisection's resolution.
    grid = np.linspace(0, 0.99, 34)
    first_ok = next(r for r in grid if kept(r) <= target)
    assert kept(ratio) <= target < kept(max(ratio - 2e-4, 0.0))
    assert ratio <= first_ok + 1e-9
    pruned = copy.deepcopy(model)
    report = slimcore.prune(pruned, x, ratio=ratio, criterion=criterion, scope=scope)
    flops, _ = slimcore.profile(pruned, x)
    assert flops == report.flops_after and flops <= target * report.flops_before


@pytest.mark.parametrize("name,size,channels,options", [
    ("preresnet56", 32, 3, {"compensate": False}), ("densenet40", 32, 3, {"round_to": 8}), ("vgg11", 28, 1, {"max_layer_ratio": 0.8}),
    ("mobilenet_v2", 64, 3, {"scope": "layer", "criterion": "l1_filter", "min_channels": 4})])
def test_ratio_searches_bisect_on_what_prune_would_do(name, size, channels, options):
    """ratio_for_flops and ratio_for_channels trace and score once, then only move the threshold:
    the FLOPs (share of channels removed) they see at each ratio are those of the model prune()
    rebuilds (reports) at that ratio (residual blocks, concat, depthwise, round_to, layer caps and
    collapsed blocks included)."""
    from slimcore.pruning.options import PruneOptions
    from slimcore.pruning.search import dry_measure

    model, x = build_torchvision(name) if name == "mobilenet_v2" else build_seed(name, size, channels)
    with torch.no_grad():  # spread gammas, some near zero, so residual blocks collapse at high ratios
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand_like(m.weight) ** 3)
        if name == "preresnet56":  # dead branches: these blocks collapse
            for block in list(model.layer1)[1::3] + list(model.layer2)[1::3]:
                block.bn2.weight.zero_()
    kept = dry_measure(model, x, "flops_kept", PruneOptions(**options))
    removed = dry_measure(model, x, "channels_removed", PruneOptions(**options))
    dense_flops, _ = slimcore.profile(model, x)
    collapsed = 0
    for r in np.linspace(0.0, 0.95, 7):
        pruned = copy.deepcopy(model)
        rep = slimcore.prune(pruned, x, ratio=float(r), **options)
        collapsed += len(rep.collapsed)
        flops, _ = slimcore.profile(pruned, x)  # counted on the rebuilt model: independent of prune's bookkeeping
        assert kept(float(r)) == flops / dense_flops, r
        assert removed(float(r)) == rep.channels_removed_share, r
    if name == "preresnet56":
        assert collapsed > 0, "the check should cover collapsed blocks"


@pytest.mark.parametrize("options", [{}, {"max_layer_ratio": 0.6}])
def test_channels_removed_share_counts_a_residual_stream_once_per_conv(options):
    # resnet18: every conv output is scored (the residual streams tie channels of several convs);
    # the share is counted here from the rebuilt convs alone.
    model, x = build_torchvision("resnet18")
    dense = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    report = slimcore.prune(model, x, ratio=0.75, compensate=False, **options)
    kept = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    assert report.channels_removed_share == pytest.approx(1 - kept / dense, abs=1e-12)
    if options:  # the cap puts channels back
        assert report.channels_removed_share <= 0.6
    else:  # the threshold stops short of a stream's whole group at most
        assert 0.74 < report.channels_removed_share <= 0.75


def test_smallest_ratio_bisects_and_looks_past_a_dip_near_one():
    from slimcore.pruning.search import smallest_ratio

    assert smallest_ratio(lambda r: r >= 0.3, 1e-4) == pytest.approx(0.3, abs=1e-4)
    assert smallest_ratio(lambda r: True, 1e-4) == 0.0
    dip = smallest_ratio(lambda r: 0.3 <= r < 0.97, 1e-4)  # the largest ratio fails
    assert 0.3 <= dip <= 0.3 + 1e-4
    assert smallest_ratio(lambda r: False, 1e-4) is None


@pytest.mark.parametrize("options", [{}, {"max_layer_ratio": 0.9}, {"round_to": 8, "max_layer_ratio": 0.8}])
def test_ratio_for_channels_is_the_smallest_ratio_removing_the_share(options):
    model, x = build_seed("vgg11", 32, 3)
    resolution = 1e-4
    ratio = slimcore.ratio_for_channels(model, x, 0.7, resolution=resolution, **options)
    share = slimcore.prune(copy.deepcopy(model), x, ratio=ratio, dry_run=True, **options).channels_removed_share
    less = slimcore.prune(copy.deepcopy(model), x, ratio=ratio - resolution, dry_run=True, **options)
    assert share >= 0.7 > less.channels_removed_share
    if not options:  # the plain threshold: the share itself, to one channel
        total = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        assert abs(ratio - 0.7) <= 1 / total + resolution
    else:  # the cap puts channels back: a larger ratio is needed
        assert ratio > 0.7 + resolution
    assert slimcore.ratio_for_channels(model, x, 1e-6) <= 1e-3
    with pytest.raises(ValueError, match="no ratio removes 0.7 of the channels"):
        slimcore.ratio_for_channels(model, x, 0.7, max_layer_ratio=0.6)
    with pytest.raises(ValueError, match="share must be in"):
        slimcore.ratio_for_channels(model, x, 0.0)
    with pytest.raises(ValueError, match="'dry_run' is not a prune option here"):
        slimcore.ratio_for_channels(model, x, 0.5, dry_run=True)


def test_ratio_for_flops_errors():
    model, x = build_seed("lenet5", 28, 1)
    assert slimcore.ratio_for_flops(model, x, 1.0) == 0.0
    for bad in (0.0, 1.5, "half", True):
        with pytest.raises(ValueError, match="flops_fraction must be in"):
            slimcore.ratio_for_flops(model, x, bad)
    with pytest.raises(ValueError, match="'ratio' is not a prune option here"):
        slimcore.ratio_for_flops(model, x, 0.5, ratio=0.3)
    with pytest.raises(ValueError, match="no ratio keeps 0.001 of the FLOPs"):
        slimcore.ratio_for_flops(model, x, 0.001, min_channels=2)


class FlopsTimer:
    """A deterministic stand-in for LatencyTable.time_models: a model's "seconds" are its FLOPs."""

    def __init__(self):
        self.timed = []

    def time_models(self, models, example_inputs):
        self.timed.append(list(models))
        return [float(slimcore.profile(m, example_inputs)[0]) for m in models]


@pytest.mark.parametrize("target", [0.6, 0.3])
def test_ratio_for_latency_reaches_the_target_on_a_deterministic_timer(target):
    # With latency = FLOPs the latency search must land where the FLOPs search does, and the model
    # it measures must be the one prune() builds at that ratio.
    model, x = build_seed("vgg11", 32, 3)
    before = copy.deepcopy(model.state_dict())
    timer = FlopsTimer()
    ratio = slimcore.ratio_for_latency(model, x, target, resolution=1e-3, latency_table=timer)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # not changed
    assert ratio == pytest.approx(slimcore.ratio_for_flops(model, x, target, resolution=1e-3), abs=1e-3)
    report = slimcore.prune(copy.deepcopy(model), x, ratio=ratio)
    assert report.flops_after <= target * report.flops_before
    smaller = slimcore.prune(copy.deepcopy(model), x, ratio=max(ratio - 2e-3, 0.0), dry_run=True)
    assert smaller.flops_after > target * smaller.flops_before  # the smallest such ratio, to the resolution
    assert all(len(models) == 2 for models in timer.timed)  # dense and candidate timed together


def test_ratio_for_latency_times_the_deployed_form_and_refuses_what_it_cannot_reach():
    model, x = build_seed("vgg11", 32, 3)
    deployed = []

    def deploy(m):
        assert not m.training
        deployed.append(m)
        return m

    timer = FlopsTimer()
    slimcore.ratio_for_latency(model, x, 0.5, resolution=0.05, latency_table=timer, deploy=deploy)
    dense, candidates = deployed[0], deployed[1:]  # each candidate is timed next to the deployed dense model
    assert [[id(m) for m in models] for models in timer.timed] == [[id(dense), id(c)] for c in candidates]
    with pytest.raises(ValueError, match="no ratio runs in 0.001 of the dense latency"):
        slimcore.ratio_for_latency(model, x, 0.001, resolution=0.05, latency_table=FlopsTimer(), min_channels=2)
    with pytest.raises(TypeError, match="deploy must return the model to time"):
        slimcore.ratio_for_latency(model, x, 0.5, latency_table=FlopsTimer(), deploy=lambda m: None)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="latency_fraction must be in"):
            slimcore.ratio_for_latency(model, x, bad, latency_table=FlopsTimer())
    with pytest.raises(ValueError, match="'check_latency' is not an option here"):
        slimcore.ratio_for_latency(model, x, 0.5, latency_table=FlopsTimer(), check_latency=False)


def test_a_layer_starved_to_min_channels_is_reported():
    model, x = build_seed("vgg11", 32, 3)
    bn = model.features[5]  # the second conv's BatchNorm: all of its channels look unimportant
    with torch.no_grad():
        bn.weight.mul_(1e-4)
    starved = slimcore.prune(copy.deepcopy(model), x, ratio=0.3, dry_run=True)
    assert starved.channels["features.4"][1] == 1
    assert any("keep only min_channels=1 (features.4)" in n and "max_layer_ratio" in n for n in starved.notes)
    assert starved.starved == ["features.4"]
    capped = slimcore.prune(copy.deepcopy(model), x, ratio=0.3, max_layer_ratio=0.9, dry_run=True)
    assert capped.channels["features.4"][1] > 1 and not any("min_channels" in n for n in capped.notes)
    assert capped.starved == []


def bn_removed_share(model, report):
    """Share of all BatchNorm channels gone, counted from report.channels (the rebuilt layers)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    before = sum(report.channels[n][0] for n in names)
    return sum(report.channels[n][0] - report.channels[n][1] for n in names) / before


@pytest.mark.parametrize("options", [{}, {"max_layer_ratio": 0.9}, {"max_layer_ratio": 0.6}, {"round_to": 8}])
def test_channels_removed_share_is_what_the_rebuilt_layers_lost(options):
    # With a cap or rounding the share removed differs from the ratio asked; the report says which.
    model, x = build_seed("vgg11", 32, 3)
    report = slimcore.prune(model, x, ratio=0.75, **options)
    assert report.channels_removed_share == pytest.approx(bn_removed_share(model, report), abs=1e-12)
    if not options:  # the plain global threshold removes the share asked, to one channel
        total = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        assert abs(report.channels_removed_share - 0.75) <= 1 / total
    if options.get("max_layer_ratio") == 0.6:
        assert report.channels_removed_share <= 0.6 + 1e-9 < 0.75
    assert f"channels removed: {100 * report.channels_removed_share:.1f}%" in str(report)


class HeadsAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, sized the way detector code
    writes it: the qkv projection is viewed into heads with sizes from attributes, split into
    q, k, v, and the result is viewed back with the width of the block's own input."""

    def __init__(self, width, heads, key_ratio=0.5):
        super().__init__()
        self.heads, self.value_dim = heads, width // heads
        self.query_dim = int(self.value_dim * key_ratio)
        self.scale = self.query_dim ** -0.5
        self.qkv = nn.Sequential(nn.Conv2d(width, width + 2 * heads * self.query_dim, 1, bias=False),
                                 nn.BatchNorm2d(width + 2 * heads * self.query_dim))
        self.position = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),
                                      nn.BatchNorm2d(width))
        self.out = nn.Sequential(nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        b, c, h, w = x.shape
        per_head = 2 * self.query_dim + self.value_dim
        q, k, v = self.qkv(x).view(b, self.heads, per_head, h * w).split(
            [self.query_dim, self.query_dim, self.value_dim], dim=2)
        weights = (q.transpose(-2, -1) @ k * self.scale).softmax(dim=-1)
        y = (v @ weights.transpose(-2, -1)).view(b, c, h, w) + self.position(v.reshape(b, c, h, w))
        return self.out(y)


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.SiLU())
        self.attention = HeadsAttention(32, heads=4)
        self.head = nn.Sequential(nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16), nn.SiLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.attention(x))


def test_multi_head_attention_prunes_whole_channels_of_every_head():
    """Views into heads tie channel j of every head; q and k channels go together (q^T k); the
    values and the residual stream go together position by position, since the code views the
    values back with the input's width. Key and value widths follow through their attributes."""
    torch.manual_seed(0)
    model = randomize_batchnorms(AttentionNet()).eval()
    x = torch.randn(2, 3, 8, 8)
    report = check_prune(model, x, ratio=0.5)
    attention = model.attention
    assert report.prunable["attention.qkv.0"][0] == report.prunable["attention.qkv.0"][1]  # all prunable
    assert attention.value_dim < 8 and attention.query_dim < 4
    qkv = attention.qkv[0].out_channels
    assert qkv == attention.heads * (2 * attention.query_dim + attention.value_dim)
    assert model.stem[0].out_channels == attention.heads * attention.value_dim
    assert attention.scale == 2 ** -1  # the dense model's scale: the masked model keeps it too
