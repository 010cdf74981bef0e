"""round_to="auto" (slimcore/pruning/widths.py): latency-aware channel counts.

The choice logic is tested with a table whose "timings" come from a known cost model (so the right
answer is computable); real timing, the cache and the report are tested on a tiny model."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torchvision

import slimcore
from slimcore import models
from slimcore import LatencyTable
from helpers import assert_same_function, randomize_batchnorms, zero_removed


class BlockCostTable(LatencyTable):
    """Time = MACs with both widths rounded up to multiples of 16, plus a big penalty for an input
    width that is not a multiple of 8: the fastest width is known for every layer."""

    def __init__(self, **kwargs):
        super().__init__(persist=False, **kwargs)
        self.calls = []

    def measure(self, requests):
        return [self.cost(*r) for r in requests]

    def cost(self, layer, cin, cout, in_shape):
        assert cin > 0 and cout > 0, "an empty layer must not be timed"
        self.calls.append((layer.name, cin, cout))
        up = lambda c: -(-c // 16) * 16  # noqa: E731
        spatial = 1
        for s in in_shape[2:]:
            spatial *= s
        k = 1
        for s in getattr(layer.module, "kernel_size", ()):
            k *= s
        return 1e-9 * up(cin) * up(cout) * spatial * k * (3.0 if cin % 8 else 1.0)

    def time_models(self, models, example_inputs):
        """The whole-model check under the same cost model: the sum over every conv and linear."""
        totals = []
        for model in models:
            seen = []
            hooks = [m.register_forward_hook(lambda m, args, out, n=n: seen.append((n, m, args[0].shape)))
                     for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
            with torch.no_grad():
                model.eval()(*example_inputs)
            for h in hooks:
                h.remove()
            totals.append(sum(self.cost(SimpleNamespace(name=n, module=m), shape[1], self.out_width(m), shape)
                              for n, m, shape in seen))
        self.model_timings = totals
        return totals

    @staticmethod
    def out_width(m):
        return m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features


class FixedVerdictTable(BlockCostTable):
    """Layer costs as BlockCostTable; the whole-model check gets given times for its candidates
    (per-layer widths "auto", then round_to 1, 8, 16)."""

    def __init__(self, verdict, **kwargs):
        super().__init__(**kwargs)
        self.verdict = verdict

    def time_models(self, models, example_inputs):
        assert len(models) == len(self.verdict) == 4
        return list(self.verdict)


def widths(model):
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


def test_auto_never_keeps_fewer_channels_and_prunes_exactly():
    model = randomize_batchnorms(models.build("vgg11", width=0.5)).eval()
    x = torch.randn(2, 3, 32, 32)
    plain = copy.deepcopy(model)
    dense = copy.deepcopy(model)
    ref = slimcore.prune(plain, x, ratio=0.5, compensate=False)
    table = BlockCostTable(batch=2)
    report = slimcore.prune(model, x, ratio=0.5, round_to="auto", latency_table=table, compensate=False)
    # Never fewer channels than round_to=1, in every layer; and exactly the masked-model contract.
    w_auto, w_plain = widths(model), widths(plain)
    assert all(w_auto[n] >= w_plain[n] for n in w_plain)
    zero_removed(dense, report.removed)
    assert_same_function(model, dense, x)
    assert (report.flops_after, report.params_after) == slimcore.profile(model, x)
    # The report: every layer's asked width is round_to=1's, and the chosen one is the fastest
    # candidate under the cost model (ties to the narrower one), widened only when it pays.
    assert report.widths and table.calls
    for choice in report.widths:
        first = choice["layer"].split(",")[0]
        assert choice["asked"] == w_plain[first] and choice["chosen"] == w_auto[first]
        ms = {int(k): v for k, v in choice["ms"].items()}
        assert choice["asked"] in ms and choice["chosen"] in ms
        assert all(w >= choice["asked"] for w in ms)
        assert ms[choice["chosen"]] <= min(ms.values()) / (1 - 0.05) * (1 + 1e-9)  # within the 5% margin
    widened = [c for c in report.widths if c["chosen"] > c["asked"]]
    assert widened, "the cost model makes odd widths slow: some layer must have been widened"
    assert all(c["chosen"] % 8 == 0 or c["chosen"] == c["size"] for c in widened)
    assert "round_to=auto" in str(report)
    assert report.flops_after > ref.flops_after  # the widened layers cost FLOPs, by choice


def test_auto_uses_the_fastest_whole_model_and_never_one_slower_than_round_to_1():
    """The whole-model check: the per-layer widths ("auto") or a uniform round_to, whichever whole
    model is fastest, if it beats round_to=1 by 2%; else round_to=1's model. All stay exact."""
    base = randomize_batchnorms(models.build("vgg11", width=0.5)).eval()
    x = torch.randn(2, 3, 32, 32)
    reference = {}
    for r in (1, 8):
        reference[r] = copy.deepcopy(base)
        slimcore.prune(reference[r], x, ratio=0.5, compensate=False, round_to=r)
    assert widths(reference[1]) != widths(reference[8])
    cases = [((0.5, 1.0, 0.9, 0.95), "auto"), ((1.0, 1.0, 0.8, 0.9), "8"), ((2.0, 1.0, 1.5, 1.2), "1"),
             ((0.99, 1.0, 0.995, 0.99), "1")]  # the last: nothing is 2% faster
    for verdict, chosen in cases:
        model, dense = copy.deepcopy(base), copy.deepcopy(base)
        report = slimcore.prune(model, x, ratio=0.5, round_to="auto", latency_table=FixedVerdictTable(verdict, batch=2),
                                compensate=False)
        assert any(c["chosen"] > c["asked"] for c in report.widths)
        check = report.latency_check
        assert check["chosen"] == chosen
        assert check["ms"] == pytest.approx(dict(zip(("auto", "1", "8", "16"), (v * 1e3 for v in verdict))))
        if chosen == "auto":
            assert all(widths(model)[c["layer"].split(",")[0]] == c["chosen"] for c in report.widths)
            assert widths(model) != widths(reference[1])
        else:
            assert widths(model) == widths(reference[int(chosen)])
        assert f"using {'the per-layer widths' if chosen == 'auto' else 'round_to=' + chosen}" in str(report)
        assert (report.flops_after, report.params_after) == slimcore.profile(model, x)
        zero_removed(dense, report.removed)
        assert_same_function(model, dense, x)
    # No check asked for: the per-layer widths stay whatever the whole model does.
    model = copy.deepcopy(base)
    report = slimcore.prune(model, x, ratio=0.5, round_to="auto", latency_table=FixedVerdictTable((2.0, 1.0, 1.0, 1.0), batch=2),
                            compensate=False, check_latency=False)
    assert report.latency_check is None and widths(model) != widths(reference[1])


class DeployedCostTable(BlockCostTable):
    """Times each candidate by its BatchNorm count: 1 s per BN left, so only deployed (folded)
    candidates come out fast; records what it was given."""

    def time_models(self, models, example_inputs):
        self.timed = models
        return [float(sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())) + 0.1 * i
                for i, model in enumerate(models)]


def test_the_whole_model_check_times_the_deployed_candidates():
    base = randomize_batchnorms(models.build("vgg11", width=0.5)).eval()
    x = torch.randn(2, 3, 32, 32)
    seen = []

    def fold(m):
        assert not m.training  # handed over in eval mode, after pruning
        seen.append(widths(m))
        slimcore.fold_bn(m, x)
        return m

    model, table = copy.deepcopy(base), DeployedCostTable(batch=2)
    report = slimcore.prune(model, x, ratio=0.5, round_to="auto", latency_table=table, compensate=False, deploy=fold)
    assert len(seen) == len(table.timed) == len(report.latency_check["ms"])
    assert all(not any(isinstance(m, torch.nn.BatchNorm2d) for m in t.modules()) for t in table.timed)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()), "the returned model is not deployed"
    with pytest.raises(TypeError, match="deploy must return the model"):
        slimcore.prune(copy.deepcopy(base), x, ratio=0.5, round_to="auto", latency_table=DeployedCostTable(batch=2),
                       deploy=lambda m: None)


def test_whole_model_timing_on_copies_of_a_real_model():
    """LatencyTable.time_models: real interleaved timings of whole models at the table's batch."""
    table = LatencyTable(batch=4, persist=False)
    small = models.build("vgg11", width=0.125).eval()
    big = models.build("vgg11", width=0.5).eval()
    seconds = table.time_models([small, big], (torch.randn(1, 3, 32, 32),), min_runs=5, min_seconds=0.0)
    assert len(seconds) == 2 and 0 < seconds[0] < seconds[1]  # 16x the MACs


def test_auto_widens_residual_streams_and_depthwise_layers_consistently():
    model = randomize_batchnorms(torchvision.models.mobilenet_v2(num_classes=10)).eval()
    x = torch.randn(1, 3, 64, 64)
    dense = copy.deepcopy(model)
    report = slimcore.prune(model, x, ratio=0.4, round_to="auto", latency_table=BlockCostTable(batch=1),
                            compensate=False)
    zero_removed(dense, report.removed)
    assert_same_function(model, dense, x)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels


def test_auto_after_collapsed_residual_blocks():
    from test_collapse import dead_share, kill_branches

    model = randomize_batchnorms(models.build("preresnet164")).eval()  # bottleneck blocks
    kill_branches(model)
    x = torch.randn(2, 3, 32, 32)
    report = slimcore.prune(model, x, ratio=dead_share(model, x) + 0.2, round_to="auto",
                            latency_table=BlockCostTable(batch=2))
    assert report.collapsed and report.widths
    assert (report.flops_after, report.params_after) == slimcore.profile(model, x)
    assert all(w["chosen"] >= w["asked"] > 0 for w in report.widths)


def test_auto_prunes_an_already_pruned_model_again():
    """A second pass sees CompensatedConv2d layers (the first pass's bias compensation): they are
    timed as the plain convs they compute."""
    model = randomize_batchnorms(models.build("vgg11", width=0.25)).eval()
    x = torch.randn(2, 3, 32, 32)
    slimcore.prune(model, x, ratio=0.5)
    assert any(isinstance(m, slimcore.nn.CompensatedConv2d) for m in model.modules())
    table = LatencyTable(batch=2, persist=False, min_seconds=0.0, min_runs=1)
    dense = copy.deepcopy(model)
    report = slimcore.prune(model, x, ratio=0.3, round_to="auto", latency_table=table, compensate=False)
    assert report.widths and table.measured > 0
    assert all(k.startswith("Conv2d|") or k.startswith("linear|") for k in table.entries)
    zero_removed(dense, report.removed)
    assert_same_function(model, dense, x)


def test_an_unwritable_cache_warns_and_keeps_the_timings(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    table = LatencyTable(cache_dir=blocker / "cache", batch=2, min_seconds=0.0, min_runs=1)
    model = randomize_batchnorms(models.build("lenet5", in_channels=1, input_size=28)).eval()
    with pytest.warns(UserWarning, match="cannot write the latency cache"):
        report = slimcore.prune(model, torch.randn(2, 1, 28, 28), ratio=0.5, round_to="auto", latency_table=table)
    assert report.widths and table.entries


def test_real_timings_are_cached_on_disk(tmp_path):
    model = randomize_batchnorms(models.build("lenet5", in_channels=1, input_size=28)).eval()
    x = torch.randn(4, 1, 28, 28)
    table = LatencyTable(cache_dir=tmp_path, batch=4, min_seconds=0.0, min_runs=2)
    first = slimcore.prune(copy.deepcopy(model), x, ratio=0.5, round_to="auto", latency_table=table)
    assert table.measured > 0 and table.path.startswith(str(tmp_path))
    cached = json.load(open(table.path))
    assert len(cached) == table.measured and all(v > 0 for v in cached.values())
    again = LatencyTable(cache_dir=tmp_path, batch=4)
    second = slimcore.prune(copy.deepcopy(model), x, ratio=0.5, round_to="auto", latency_table=again)
    assert again.measured == 0, "a second prune of the same shapes must read the cache"
    assert second.widths == first.widths
    (tmp_path / table.path.split("/")[-1]).write_text("{not json")
    broken = LatencyTable(cache_dir=tmp_path, batch=4, min_seconds=0.0, min_runs=2)
    slimcore.prune(copy.deepcopy(model), x, ratio=0.5, round_to="auto", latency_table=broken)
    assert broken.measured > 0  # an unreadable cache is measured again, not an error


def test_auto_uses_the_model_device_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMCORE_CACHE_DIR", str(tmp_path))
    model = randomize_batchnorms(models.build("lenet5", in_channels=1, input_size=28)).eval()
    report = slimcore.prune(model, torch.randn(2, 1, 28, 28), ratio=0.5, round_to="auto")
    assert report.widths and list(tmp_path.glob("latency-cpu-*.json"))


@pytest.mark.parametrize("bad", ["fast", 0, 2.5, True])
def test_bad_round_to_is_refused(bad):
    model = models.build("lenet5", in_channels=1, input_size=28)
    with pytest.raises(ValueError, match="round_to must be an integer >= 1 or 'auto'"):
        slimcore.prune(model, torch.randn(2, 1, 28, 28), round_to=bad)
