"""Latency-aware channel selection (slimcore/latency_select.py, slimcore.prune_for_latency).

Timings are replaced by a deterministic table whose "seconds" are multiply-accumulates (per layer
and per whole model, as slimcore.profile counts them), so budgets and importances are exact; no
test depends on this machine's speed."""

import copy
import itertools
import json

import numpy as np
import pytest
import torch
from helpers import assert_same_function, randomize_batchnorms, zero_removed
from torch import nn

import slimcore
import slimcore.models as seed_models
from slimcore.pipeline import cli
from slimcore.pipeline.train import load_model


class MacsTable:
    """LatencyTable's interface with MACs for seconds: a standalone layer's (run on the meta device)
    and a whole model's (slimcore.profile)."""

    def __init__(self):
        self.layer_calls, self.model_calls = 0, []

    def time(self, layer, cin, cout, in_shape):
        self.layer_calls += 1
        if cin == 0 or cout == 0:
            return 0.0
        m = layer.instantiate(cin, cout, "meta", torch.float32, False)
        y = m(torch.empty(layer.input_shape(cin, in_shape, 1), device="meta"))
        per_output = (cin // getattr(m, "groups", 1)) * int(np.prod(getattr(m, "kernel_size", (1,))))
        return float(y.numel() * per_output)

    def prefetch(self, requests):
        pass

    def time_models(self, models, example_inputs):
        self.model_calls.append(len(models))
        return [float(slimcore.profile(m, example_inputs)[0]) for m in models]


def bn_importance(model):
    """Sum of |gamma| over the BatchNorms of a (pruned) model: bn_scale's importance kept."""
    return sum(float(m.weight.detach().abs().sum()) for m in model.modules() if isinstance(m, nn.BatchNorm2d))


class TwoCosts(nn.Module):
    """Three conv-BN layers of equal width whose channels cost very different time: the first runs
    at 32x32 from 3 inputs, the others at 4x4. All three BNs hold the same gammas, so the global
    threshold thins them alike; at a latency budget the first layer's channels are the ones to give."""

    def __init__(self, width=12):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.b, self.bn_b = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.c, self.bn_c = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 10)
        gammas = torch.linspace(0.05, 1.0, width)[torch.randperm(width, generator=torch.Generator().manual_seed(0))]
        with torch.no_grad():
            for bn in (self.bn_a, self.bn_b, self.bn_c):
                bn.weight.copy_(gammas)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn_a(self.a(x))), 8)
        x = torch.relu(self.bn_b(self.b(x)))
        x = torch.relu(self.bn_c(self.c(x)))
        return self.head(x.mean((2, 3)))


def two_costs_macs(ka, kb, kc):
    """MACs of TwoCosts with ka, kb, kc channels kept, written out by hand (the reference)."""
    return 3 * ka * 9 * 32 * 32 + ka * kb * 9 * 4 * 4 + kb * kc * 9 * 4 * 4 + kc * 10


@pytest.mark.parametrize("fraction", [0.6, 0.4])
def test_latency_selection_beats_the_threshold_where_channels_cost_differently(fraction):
    model, x = TwoCosts().eval(), torch.randn(2, 3, 32, 32)
    dense = slimcore.profile(model, x)[0]
    assert dense == two_costs_macs(12, 12, 12)
    aware, threshold = copy.deepcopy(model), copy.deepcopy(model)
    rep = slimcore.prune_for_latency(aware, x, fraction, latency_table=MacsTable(), resolution=0.01, compensate=False,
                                     importance="sum")  # the threshold's own objective, compared below
    thr = slimcore.prune_for_latency(threshold, x, fraction, latency_table=MacsTable(), selection="threshold",
                                     resolution=0.01, compensate=False)
    assert (rep.selection, thr.selection) == ("latency", "threshold")
    for m, r in ((aware, rep), (threshold, thr)):  # both within the budget, and the report says what it measured
        macs = slimcore.profile(m, x)[0]
        assert macs <= fraction * dense
        assert r.latency["measured_fraction"] == pytest.approx(macs / dense)
    kept = [aware.get_submodule(n).out_channels for n in ("a", "b", "c")]
    assert two_costs_macs(*kept) == slimcore.profile(aware, x)[0]
    # The best any choice of kept counts can do within the budget, by brute force over all of them.
    gammas = np.sort(model.bn_a.weight.detach().numpy())[::-1]
    top = np.concatenate([[0.0], np.cumsum(gammas)])
    best = max(top[ka] + top[kb] + top[kc] for ka, kb, kc in itertools.product(range(1, 13), repeat=3)
               if two_costs_macs(ka, kb, kc) <= fraction * dense)
    got, plain = bn_importance(aware), bn_importance(threshold)
    assert got > plain + 0.5, (kept, got, plain)  # strictly more (here: by whole channels' worth)
    assert got >= 0.97 * best and got <= best + 1e-4
    assert kept[0] < min(kept[1:])  # the expensive layer gave most


def log_share_objective(kept, gammas):
    """importance="log_share"'s objective for TwoCosts keeping its top ``kept`` channels per layer
    (all layers hold the same gammas): sum over layers of log((kept score + s) / (dense score + s)),
    s one average channel of the layer, written out independently of latency_select."""
    top = np.concatenate([[0.0], np.cumsum(np.sort(gammas)[::-1])])
    smooth = top[-1] / len(gammas)
    return sum(np.log((top[k] + smooth) / (top[-1] + smooth)) for k in kept)


@pytest.mark.parametrize("fraction", [0.6, 0.4, 0.2])
def test_log_share_importance_keeps_layers_balanced_near_the_brute_force_best(fraction):
    model, x = TwoCosts().eval(), torch.randn(2, 3, 32, 32)
    gammas = model.bn_a.weight.detach().double().numpy()
    dense = two_costs_macs(12, 12, 12)
    kept = {}
    for importance in ("sum", "log_share"):
        m = copy.deepcopy(model)
        rep = slimcore.prune_for_latency(m, x, fraction, latency_table=MacsTable(), importance=importance,
                                         resolution=0.01, compensate=False)
        assert rep.latency["importance"] == importance and f"importance {importance}" in str(rep)
        kept[importance] = [m.get_submodule(n).out_channels for n in ("a", "b", "c")]
        assert two_costs_macs(*kept[importance]) <= fraction * dense
    best = max(log_share_objective(k, gammas) for k in itertools.product(range(1, 13), repeat=3)
               if two_costs_macs(*k) <= fraction * dense)
    got = log_share_objective(kept["log_share"], gammas)
    assert best - 0.05 <= got <= best + 1e-9, (kept, got, best)  # within 5% of the best product of shares (a greedy)
    if fraction == 0.2:  # here "sum" strips the expensive layer to one channel; log_share does not
        assert kept["sum"][0] == 1 and kept["log_share"][0] > 1
        assert got > log_share_objective(kept["sum"], gammas) + 0.1


def build_seed(name, size=32, width=0.25):
    torch.manual_seed(0)
    model = seed_models.build(name, num_classes=10, in_channels=3, width=width)
    return randomize_batchnorms(model).eval(), torch.randn(2, 3, size, size)


def test_on_vgg_the_budget_holds_and_at_least_the_thresholds_importance_stays():
    model, x = build_seed("vgg11")
    dense = slimcore.profile(model, x)[0]
    for fraction in (0.5, 0.3):
        aware, threshold = copy.deepcopy(model), copy.deepcopy(model)
        table = MacsTable()
        rep = slimcore.prune_for_latency(aware, x, fraction, latency_table=table, resolution=0.02, importance="sum")
        slimcore.prune_for_latency(threshold, x, fraction, latency_table=MacsTable(), selection="threshold",
                                   resolution=0.02)
        assert slimcore.profile(aware, x)[0] <= fraction * dense
        assert slimcore.profile(threshold, x)[0] <= fraction * dense
        assert bn_importance(aware) >= bn_importance(threshold)
        assert set(table.model_calls) == {2}  # every candidate timed next to the dense model
        # MACs are bilinear in a conv's widths: the per-layer estimate is the measured fraction
        assert rep.latency["estimated_fraction"] == pytest.approx(rep.latency["measured_fraction"], rel=1e-9)
        assert f"{100 * rep.channels_removed_share:.1f}%" in str(rep) and "latency-aware" in str(rep)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the stream's unscaled channels score inf: no overflow, no nan
@pytest.mark.parametrize("importance", ["sum", "log_share"])
def test_coupled_residual_channels_go_together_and_the_function_is_kept(importance):
    # pre-activation ResNet: the residual stream's channels are one group across every block; the
    # pruned model must equal the dense one with the removed channels zeroed (else groups split).
    model, x = build_seed("preresnet56", width=0.5)
    dense = copy.deepcopy(model)
    rep = slimcore.prune_for_latency(model, x, 0.5, latency_table=MacsTable(), resolution=0.02, compensate=False,
                                     importance=importance)
    assert rep.latency["measured_fraction"] <= 0.5
    zero_removed(dense, rep.removed)
    assert_same_function(model, dense, x)
    stream = [n for n in rep.removed if n.endswith("conv3") or n == "conv1"]
    assert len({tuple(rep.removed[n]) for n in stream}) <= 1


@pytest.mark.parametrize("options", [{"min_channels": 6}, {"max_layer_ratio": 0.6}, {"round_to": 4}])
def test_per_layer_limits_hold(options):
    model, x = build_seed("vgg11")
    before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    rep = slimcore.prune_for_latency(model, x, 0.4, latency_table=MacsTable(), resolution=0.02, **options)
    assert rep.latency["measured_fraction"] <= 0.4
    after = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert any(after[n] < before[n] for n in before)
    for n in before:
        if "min_channels" in options:
            assert after[n] >= 6
        if "max_layer_ratio" in options:
            assert after[n] >= before[n] - int(0.6 * before[n])
        if "round_to" in options:
            assert after[n] % 4 == 0 or after[n] == before[n]


def test_bad_arguments():
    model, x = build_seed("vgg11")
    for bad in (0.0, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="latency_fraction must be in"):
            slimcore.prune_for_latency(model, x, bad, latency_table=MacsTable())
    with pytest.raises(ValueError, match="selection must be one of"):
        slimcore.prune_for_latency(model, x, 0.5, selection="fast", latency_table=MacsTable())
    with pytest.raises(ValueError, match="importance must be one of"):
        slimcore.prune_for_latency(model, x, 0.5, importance="taylor", latency_table=MacsTable())
    with pytest.raises(ValueError, match="importance='log_share' is for selection='latency'"):
        slimcore.prune_for_latency(model, x, 0.5, selection="threshold", importance="log_share",
                                   latency_table=MacsTable())
    with pytest.raises(ValueError, match="round_to='auto' does not combine"):
        slimcore.prune_for_latency(model, x, 0.5, latency_table=MacsTable(), round_to="auto")
    with pytest.raises(ValueError, match="scope must be 'global'"):
        slimcore.prune_for_latency(model, x, 0.5, latency_table=MacsTable(), scope="layer")
    for key in ("ratio", "dry_run", "check_latency", "select"):
        with pytest.raises(ValueError, match=f"'{key}' is not"):
            slimcore.prune_for_latency(model, x, 0.5, latency_table=MacsTable(), **{key: 0.5})
    with pytest.raises(ValueError, match="no selection runs in 0.001 of the dense latency"):
        slimcore.prune_for_latency(TwoCosts(), torch.randn(2, 3, 32, 32), 0.001, latency_table=MacsTable(),
                                   resolution=0.05)
    with pytest.raises(ValueError, match="does not combine with round_to='auto'"):
        slimcore.prune(model, x, round_to="auto", select=lambda *a: None)
    untouched = copy.deepcopy(model.state_dict())  # nothing above changed the model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in untouched.items())


def test_cli_prunes_with_latency_aware_selection(tmp_path, capsys, monkeypatch):
    # Real timings of a tiny model: the test checks the stage written, not a speed.
    monkeypatch.setenv("SLIMCORE_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert cli.main(["train", "--model", "lenet5", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "64",
                     "--lam", "1e-3", "--quiet", "--out", str(run)]) == 0
    assert cli.main(["prune", "--run", str(run), "--latency", "0.9", "--selection", "latency",
                     "--latency-batch", "8"]) == 0
    rep = json.load(open(run / "prune-bn_scale-latency0.9-aware" / "report.json"))
    assert rep["selection"] == "latency" and rep["latency"]["target"] == 0.9
    assert rep["latency"]["measured_fraction"] > 0 and rep["ratio"] == rep["channels_removed_share"]
    model, meta = load_model(run / "prune-bn_scale-latency0.9-aware" / "model.pt")
    assert slimcore.profile(model, torch.zeros(1, *meta["input_shape"]))[0] == rep["flops_after"]
    assert rep["latency"]["importance"] == "log_share"  # the default
    assert cli.main(["prune", "--run", str(run), "--latency", "0.9", "--selection", "latency",
                     "--importance", "sum", "--latency-batch", "8"]) == 0
    rep = json.load(open(run / "prune-bn_scale-latency0.9-aware-sum" / "report.json"))
    assert rep["selection"] == "latency" and rep["latency"]["importance"] == "sum"
    capsys.readouterr()
    assert cli.main(["prune", "--run", str(run), "--ratio", "0.5", "--selection", "latency"]) == 2
    assert "give --latency with it" in capsys.readouterr().err
    assert cli.main(["prune", "--run", str(run), "--latency", "0.5", "--selection", "latency", "--round-to",
                     "auto"]) == 2
    assert "round_to='auto' does not combine" in capsys.readouterr().err
    assert cli.main(["prune", "--run", str(run), "--latency", "0.5", "--importance", "log_share"]) == 2
    assert "--importance log_share is for --selection latency" in capsys.readouterr().err
