"""benchmarks/latency.py on a tiny model: the JSON schema other tools read, and params/FLOPs
equal slimcore.profile of the same dense and slimmed models."""

import copy
import json
import os
import sys

import pytest
import torch

import slimcore

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import latency  # noqa: E402

FIELDS = {"model": str, "ratio": float, "batch_size": int, "device": str, "dtype": str, "threads": int,
          "params_dense": int, "params_slim": int, "flops_dense": int, "flops_slim": int,
          "latency_dense_ms": float, "latency_slim_ms": float, "speedup": float, "flops_speedup": float,
          "realised_fraction": float}


@pytest.mark.parametrize("options", [[], ["--form", "as-pruned", "--fold-bn", "--channels-last", "--round-to", "4"]],
                         ids=["deploy", "as-pruned-options"])
def test_latency_script_writes_its_schema(tmp_path, options):
    out = tmp_path / "latency.json"
    latency.main(["--models", "lenet5,mlp", "--ratios", "0.3,0.6", "--batch-sizes", "2,4", "--repeats", "3",
                  "--round-seconds", "0.01", "--out", str(out), *options])
    data = json.loads(out.read_text())
    assert {"device", "torch", "threads", "commit", "records"} <= set(data)
    assert data["torch"] == torch.__version__
    records = data["records"]
    assert len(records) == 2 * 2 * 2  # models x ratios x batch sizes
    for rec in records:
        for key, kind in FIELDS.items():
            assert isinstance(rec[key], kind), (key, rec[key])
        assert rec["speedup"] == pytest.approx(rec["latency_dense_ms"] / rec["latency_slim_ms"])
        assert rec["flops_speedup"] == pytest.approx(rec["flops_dense"] / rec["flops_slim"])
        assert rec["realised_fraction"] == pytest.approx(rec["speedup"] / rec["flops_speedup"])
        assert rec["slower_than_dense"] == (rec["latency_slim_ms"] > rec["latency_dense_ms"])
    # Params and FLOPs are those of the very models benchmarked: rebuild them independently.
    round_to = 4 if options else 1
    for rec in records:
        assert rec["form"] == ("as-pruned" if options else "deploy")
        assert rec["memory_format_dense"] in ("contiguous", "channels_last")
        dense, shape = latency.build(rec["model"])
        x = torch.randn(1, *shape)
        slim = copy.deepcopy(dense)
        slimcore.prune(slim, x, ratio=rec["ratio"], round_to=round_to)
        assert (rec["flops_dense"], rec["params_dense"]) == slimcore.profile(dense, x)
        assert (rec["flops_slim"], rec["params_slim"]) == slimcore.profile(slim, x)
    assert (tmp_path / "latency.png").exists()


def test_several_round_to_values_including_auto_in_one_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMCORE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "latency.json"
    latency.main(["--models", "lenet5", "--ratios", "0.5", "--batch-sizes", "4", "--repeats", "3",
                  "--round-seconds", "0.01", "--round-to", "1,8,auto", "--out", str(out)])
    records = json.loads(out.read_text())["records"]
    assert [r["round_to"] for r in records] == [1, 8, "auto"]
    assert len({r["latency_dense_ms"] for r in records}) == 1  # one dense model, timed once against all
    by = {r["round_to"]: r for r in records}
    assert by[1]["flops_slim"] <= by["auto"]["flops_slim"]  # auto only keeps more channels
    assert isinstance(by["auto"]["auto_widened_layers"], int) and by[1]["auto_widened_layers"] is None
    assert list((tmp_path / "cache").glob("latency-cpu-*.json"))


def test_fold_bn_makes_the_whole_model_check_time_folded_candidates(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMCORE_CACHE_DIR", str(tmp_path / "cache"))
    real_prune, deployed = slimcore.prune, []

    def spy(model, x, **kwargs):
        if kwargs.get("deploy") is not None:
            hook = kwargs["deploy"]

            def recording(m):
                out = hook(m)
                deployed.append(not any(isinstance(b, torch.nn.BatchNorm2d) for b in out.modules()))
                return out

            kwargs["deploy"] = recording
        return real_prune(model, x, **kwargs)

    monkeypatch.setattr(latency.slimcore, "prune", spy)
    out = tmp_path / "latency.json"
    latency.main(["--models", "lenet5", "--ratios", "0.5", "--batch-sizes", "4", "--repeats", "3", "--fold-bn",
                  "--form", "as-pruned", "--round-seconds", "0.01", "--round-to", "1,auto", "--out", str(out)])
    by = {r["round_to"]: r for r in json.loads(out.read_text())["records"]}
    assert by["auto"]["auto_latency_check"] is not None
    assert len(deployed) == len(by["auto"]["auto_latency_check"]["ms"]) and all(deployed)


def test_drawn_gammas_make_the_global_threshold_remove_the_share():
    dense, shape = latency.build("preresnet56")
    report = slimcore.prune(copy.deepcopy(dense), torch.randn(1, *shape), ratio=0.5, dry_run=True)
    narrowed = [(before, after) for name, (before, after) in report.channels.items() if "conv" in name]
    kept = sum(a for _, a in narrowed) / sum(b for b, _ in narrowed)
    assert 0.35 < kept < 0.65, f"about half of the conv channels should stay, kept {kept:.2f}"


def test_latency_from_a_run_directory(tmp_path):
    from slimcore.pipeline import cli
    from slimcore.pipeline.train import load_model

    run = tmp_path / "run"
    assert cli.main(["train", "--model", "lenet5", "--dataset", "synthetic", "--epochs", "1", "--lam", "1e-3",
                     "--quiet", "--out", str(run)]) == 0
    out = tmp_path / "latency.json"
    latency.main(["--from-run", str(run), "--ratios", "0.5", "--batch-sizes", "4", "--repeats", "3",
                  "--round-seconds", "0.01", "--out", str(out)])
    rec = json.loads(out.read_text())["records"][0]
    assert rec["model"].startswith("lenet5")
    trained, meta = load_model(run / "train" / "model.pt")
    x = torch.randn(1, *meta["input_shape"])
    slim = copy.deepcopy(trained).eval()
    slimcore.prune(slim, x, ratio=0.5)  # pruned by the run's own gammas
    assert (rec["flops_dense"], rec["params_dense"]) == slimcore.profile(trained, x)
    assert (rec["flops_slim"], rec["params_slim"]) == slimcore.profile(slim, x)


def test_deploy_form_times_deployed_models_for_dense_and_slim(tmp_path, monkeypatch):
    # Both variants go through slimcore.deploy (spied on), each with the timed batch.
    real, batches = slimcore.deploy, []

    def spy(model, x, **kwargs):
        batches.append(x.shape[0])
        return real(model, x, **kwargs)

    monkeypatch.setattr(latency.slimcore, "deploy", spy)
    out = tmp_path / "latency.json"
    latency.main(["--models", "preresnet56", "--ratios", "0.5", "--batch-sizes", "3", "--repeats", "3",
                  "--round-seconds", "0.01", "--out", str(out)])
    (rec,) = json.loads(out.read_text())["records"]
    assert rec["form"] == "deploy" and batches == [3, 3]
    assert {rec["memory_format_dense"], rec["memory_format_slim"]} <= {"contiguous", "channels_last"}


def test_forms_refuse_options_of_another_form():
    for argv in (["--fold-bn"], ["--compile"], ["--form", "compile", "--fold-bn"]):
        with pytest.raises(SystemExit) as info:
            latency.main(["--models", "lenet5", *argv])
        assert info.value.code == 2


def test_onnxruntime_form(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "latency.json"
    latency.main(["--models", "lenet5", "--ratios", "0.5", "--batch-sizes", "2", "--repeats", "3",
                  "--round-seconds", "0.01", "--form", "onnxruntime", "--out", str(out)])
    (rec,) = json.loads(out.read_text())["records"]
    assert rec["form"] == "onnxruntime" and rec["latency_slim_ms"] > 0
