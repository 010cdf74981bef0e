"""The pipeline (slimcore/pipeline/: train.py, cli.py, plots.py): every command end to end on tiny settings,
exact resume after a crash, clear errors, and DDP with two CPU processes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import slimcore
from slimcore import models
from slimcore.pipeline import cli, data
from slimcore.pipeline.train import Settings, fit, load_checkpoint, load_model, model_meta

TINY = ["--model", "lenet5", "--dataset", "synthetic", "--epochs", "2", "--batch-size", "64", "--lam", "1e-3",
        "--quiet"]


def run_cli(*args):
    assert cli.main([str(a) for a in args]) == 0


def test_train_prune_finetune_report(tmp_path):
    run = tmp_path / "run"
    run_cli("train", *TINY, "--val-split", "0.1", "--out", run)
    metrics = [json.loads(line) for line in open(run / "train" / "metrics.jsonl")]
    assert [m["epoch"] for m in metrics] == [0, 1] and metrics[-1]["val_acc"] is not None
    run_cli("prune", "--run", run, "--ratio", "0.3,0.6")
    for r in ("0.3", "0.6"):
        rep = json.load(open(run / f"prune-{r}" / "report.json"))
        model, meta = load_model(run / f"prune-{r}" / "model.pt")
        x = torch.zeros(1, *meta["input_shape"])
        assert slimcore.profile(model, x) == (rep["flops_after"], rep["params_after"])
        assert rep["size_after"] < rep["size_before"], "a pruned model must be smaller on disk"
        assert rep["params_after"] < rep["params_before"]
    run_cli("finetune", "--run", run, "--ratio", "0.6", "--epochs", "1", "--quiet")
    tuned = [json.loads(line) for line in open(run / "finetune-0.6" / "metrics.jsonl")]
    assert len(tuned) == 1 and tuned[0]["stage"] == "finetune"
    run_cli("report", "--run", run)
    text = (run / "report.md").read_text()
    assert "| 0.6 |" in text and "run_gamma.png" in text
    share = json.load(open(run / "prune-0.6" / "report.json"))["channels_removed_share"]
    assert 0 < share <= 1 and f"| 0.6 | {100 * share:.1f}% |" in text
    for png in ("run_gamma.png", "run_accuracy.png", "run_ratios.png"):
        assert (run / png).stat().st_size > 1000


def test_prune_options_compensation_auto_widths_and_names(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMCORE_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    run_cli("train", *TINY, "--out", run)
    run_cli("prune", "--run", run, "--ratio", "0.8", "--no-compensate", "--name", "plain")
    run_cli("prune", "--run", run, "--ratio", "0.8", "--round-to", "auto", "--latency-batch", "8",
            "--max-layer-ratio", "0.7", "--name", "auto")
    plain = json.load(open(run / "plain" / "report.json"))
    auto = json.load(open(run / "auto" / "report.json"))
    assert plain["compensate"] is False and plain["compensated_layers"] == 0
    assert auto["compensate"] is True and auto["round_to"] == "auto" and auto["widths"]
    assert all(w["chosen"] >= w["asked"] for w in auto["widths"])
    # the whole-model check's times and choice are recorded ("auto" is timed only if a layer widened)
    check = auto["latency_check"]
    widened = any(w["chosen"] != w["asked"] for w in auto["widths"])
    assert set(check["ms"]) == ({"auto"} if widened else set()) | {"1", "8", "16"}
    assert check["chosen"] in check["ms"] and all(v > 0 for v in check["ms"].values())
    assert json.load(open(run / "config.json"))["augment"] == "auto"
    share = lambda rep: min(after / before for before, after in rep["channels"].values())  # noqa: E731
    assert share(plain) < 0.3 <= share(auto), "max_layer_ratio=0.7: every layer keeps >= 30%"
    model, meta = load_model(run / "auto" / "model.pt")
    assert slimcore.profile(model, torch.zeros(1, *meta["input_shape"]))[1] == auto["params_after"]
    assert cli.main(["prune", "--run", str(run), "--ratio", "0.3,0.5", "--name", "x"]) == 2
    assert cli.main(["prune", "--run", str(run), "--ratio", "0.3", "--name", "train"]) == 2  # never the source
    for bad in (["--round-to", "fast"], ["--round-to", "0"], ["--latency-batch", "0"]):
        assert cli.main(["prune", "--run", str(run), *bad]) == 2  # argparse's error, as one line


def test_fused_bn_refuses_batchnorms_it_cannot_convert(tmp_path):
    class MyBatchNorm(torch.nn.BatchNorm2d):  # a subclass may do more than normalise: not converted
        pass

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), MyBatchNorm(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(10))
    train, _, _, spec = data.datasets("synthetic")
    loader = data.Loader(train, spec, 64, train=True, sampler=_FirstSamples(64))
    with pytest.raises(ValueError, match="would get no penalty"):
        fit(model, loader, None, None, Settings(epochs=1, batch_size=64, lam=1e-3, bn="fused", quiet=True),
            str(tmp_path), {}, torch.device("cpu"))
    assert type(model[1]) is MyBatchNorm


def test_multi_pass_run_and_sweep_report(tmp_path):
    run_cli("run", *TINY, "--ratio", "0.5", "--passes", "2", "--finetune-epochs", "1", "--out", tmp_path / "a")
    summary = json.load(open(tmp_path / "a" / "summary.json"))
    assert [s["pass"] for s in summary] == [1, 2]
    assert summary[1]["params_before"] == summary[0]["params_after"]  # pass 2 starts from pass 1's model
    assert summary[1]["params_after"] < summary[1]["params_before"]
    run_cli("run", *TINY[:-3], "--lam", "1e-2", "--quiet", "--ratio", "0.5", "--finetune-epochs", "1",
            "--out", tmp_path / "b")
    run_cli("report", "--sweep", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "sweep")
    assert "lambda" in (tmp_path / "sweep" / "report.md").read_text()
    run_cli("report", "--run", tmp_path / "a")
    assert "pass2" in (tmp_path / "a" / "report.md").read_text()


def test_resume_after_a_crash_gives_the_same_weights(tmp_path):
    args = cli.parser().parse_args(["train", *TINY[:4], "--epochs", "3", "--batch-size", "64", "--lam", "1e-3",
                                    "--quiet", "--out", str(tmp_path / "full")])
    cli.cmd_train(args)
    crashed = cli.parser().parse_args(["train", *TINY[:4], "--epochs", "3", "--batch-size", "64", "--lam", "1e-3",
                                       "--quiet", "--out", str(tmp_path / "crash")])
    with pytest.raises(RuntimeError, match="simulated crash after epoch 1"):
        cli.cmd_train(crashed, crash_after_epoch=1)
    assert not (tmp_path / "crash" / "train" / "model.pt").exists()
    crashed.resume = True
    cli.cmd_train(crashed)
    full = torch.load(tmp_path / "full" / "train" / "model.pt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "crash" / "train" / "model.pt", weights_only=True)["state_dict"]
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    lines = open(tmp_path / "crash" / "train" / "metrics.jsonl").read().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]
    # the filter history (criterion hbfp) survives the crash: one record per epoch, as without it
    full_h = torch.load(tmp_path / "full" / "train" / "filter_history.pt", weights_only=True)
    resumed_h = torch.load(tmp_path / "crash" / "train" / "filter_history.pt", weights_only=True)
    assert full_h.keys() == resumed_h.keys() and all(full_h[k].shape[0] == 3 for k in full_h)
    for k in full_h:
        assert torch.equal(full_h[k], resumed_h[k]), k


def test_corrupted_checkpoint_gives_a_clear_error(tmp_path, capsys):
    run_cli("train", *TINY, "--out", tmp_path)
    ckpt = tmp_path / "train" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    capsys.readouterr()
    assert cli.main([str(a) for a in ("train", *TINY, "--resume", "--out", tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimcore train: error: checkpoint ") and "corrupted or truncated" in err
    with pytest.raises(slimcore.CheckpointError, match="corrupted or truncated"):
        load_checkpoint(str(ckpt))


def test_cli_errors(tmp_path, capsys):
    assert cli.main(["prune", "--run", str(tmp_path)]) == 2
    assert "not a slimcore run directory" in capsys.readouterr().err
    run_cli("train", *TINY, "--out", tmp_path)
    assert cli.main(["prune", "--run", str(tmp_path), "--ratio", "1.5"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert cli.main(["train", "--model", "vgg11", "--dataset", "cifar10", "--out", str(tmp_path / "c")]) == 2
    assert "cifar.html" in capsys.readouterr().err


def test_amp_and_proximal_mode_set_gammas_to_exact_zeros(tmp_path):
    # The proximal step thresholds: small gammas become exactly 0.0 (a subgradient step only
    # oscillates around zero). At lam 3e-2 a few of LeNet's 570 gammas reach it in two epochs and
    # the network still learns.
    lam = TINY.index("--lam") + 1
    args = TINY[:lam] + ["3e-2"] + TINY[lam + 1:]
    run_cli("train", *args, "--amp", "--mode", "proximal", "--penalty", "tl1", "--out", tmp_path)
    metrics = [json.loads(line) for line in open(tmp_path / "train" / "metrics.jsonl")]
    model, _ = load_model(tmp_path / "train" / "model.pt")
    gammas = torch.cat([m.weight.detach().flatten() for m in model.modules()
                        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)])
    zeros = int((gammas == 0).sum())
    assert zeros > 0
    assert metrics[-1]["gamma_zero"] == pytest.approx(zeros / gammas.numel())
    assert metrics[-1]["train_acc"] > 0.3


class _FirstSamples:
    """A sampler over the first n samples in order (a few steps: rounding differences between BN
    kernels stay at rounding level; over more steps, training amplifies them chaotically: measured
    on this LeNet with SCAD, 4 optimizer steps differ by 1e-6 and 6 steps by 3e-3, once a ReLU or
    max-pool decision flips)."""

    def __init__(self, n):
        self.n = n

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(range(self.n))


@pytest.mark.parametrize("penalty", ["l1", "scad"])
def test_fused_bn_training_follows_stock_bn_and_saves_plain_bn(tmp_path, penalty):
    """bn="fused" (SlimBatchNorm: the penalty inside the BN backward, 1/k per micro-batch) trains
    the same weights as bn="stock" (nn.BatchNorm + sparse_bn_step once per optimizer step)."""
    train, _, _, spec = data.datasets("synthetic")
    trained = {}
    for bn in ("stock", "fused"):
        torch.manual_seed(0)
        model = models.build("lenet5", in_channels=1, input_size=28)
        loader = data.Loader(train, spec, 64, train=True, sampler=_FirstSamples(4 * 64))  # 2 epochs x 2 steps
        s = Settings(epochs=2, batch_size=64, accumulate=2, lam=3e-2, penalty=penalty, a=3.7, bn=bn, quiet=True)
        fit(model, loader, None, None, s, str(tmp_path / bn), model_meta("lenet5", {}, "synthetic", [1, 28, 28]),
            torch.device("cpu"))
        assert not any(isinstance(m, (slimcore.SlimBatchNorm1d, slimcore.SlimBatchNorm2d)) for m in model.modules()), "reverted after training"
        trained[bn] = model.state_dict()
    for name, want in trained["stock"].items():
        torch.testing.assert_close(trained["fused"][name], want, rtol=1e-4, atol=1e-5, msg=name)
    start = models.build("lenet5", in_channels=1, input_size=28).state_dict()
    assert not torch.equal(trained["fused"]["features.1.weight"], start["features.1.weight"])
    with pytest.raises(ValueError, match="proximal mode needs"):
        fit(models.build("lenet5", in_channels=1, input_size=28), loader, None, None,
            Settings(epochs=1, batch_size=64, lam=1e-3, mode="proximal", bn="fused", quiet=True), str(tmp_path / "p"),
            {}, torch.device("cpu"))
    assert cli.main(["train", *TINY, "--bn", "fused", "--mode", "proximal", "--out", str(tmp_path / "c")]) == 2


def test_channels_last_training_follows_nchw_and_hands_back_nchw(tmp_path):
    """channels_last=True trains the same weights as NCHW (a layout, not a method: same numbers up
    to conv rounding over a few steps), and the model it returns and saves is NCHW again, so the
    pruner's gather (which refuses channels_last weights) takes it as it is."""
    train, _, _, spec = data.datasets("synthetic")
    trained = {}
    for layout in (False, True):
        torch.manual_seed(0)
        model = models.build("vgg11", in_channels=1, input_size=28, width=0.125)
        loader = data.Loader(train, spec, 64, train=True, sampler=_FirstSamples(2 * 64))
        s = Settings(epochs=2, batch_size=64, lam=1e-2, channels_last=layout, quiet=True)
        fit(model, loader, None, None, s, str(tmp_path / str(layout)),
            model_meta("vgg11", {"width": 0.125}, "synthetic", [1, 28, 28]), torch.device("cpu"))
        assert all(p.is_contiguous() for p in model.parameters()), "handed back NCHW"
        during = load_checkpoint(str(tmp_path / str(layout) / "checkpoint.pt"))["model"]["state_dict"]
        conv = during["features.4.weight"]  # 16 x 8 x 3 x 3: the two layouts differ
        assert conv.is_contiguous(memory_format=torch.channels_last) == layout != conv.is_contiguous()
        trained[layout] = model.state_dict()
    for name, want in trained[False].items():
        torch.testing.assert_close(trained[True][name], want, rtol=1e-4, atol=1e-5, msg=name)
    start = models.build("vgg11", in_channels=1, input_size=28, width=0.125).state_dict()
    assert not torch.equal(trained[True]["features.0.weight"], start["features.0.weight"])
    with pytest.raises(ValueError, match="channels_last is for 2-D convolutions"):
        fit(torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1)), loader, None, None,
            Settings(epochs=1, channels_last=True, quiet=True), str(tmp_path / "3d"), {}, torch.device("cpu"))
    # from the CLI: train and fine-tune NHWC, prune the saved model
    tiny = [a if a != "lenet5" else "vgg11" for a in TINY]
    run_cli("train", *tiny, "--width", "0.125", "--channels-last", "--out", tmp_path / "cli")
    run_cli("prune", "--run", tmp_path / "cli", "--ratio", "0.5")
    run_cli("finetune", "--run", tmp_path / "cli", "--ratio", "0.5", "--epochs", "1", "--channels-last")
    config = json.load(open(tmp_path / "cli" / "config.json"))
    assert config["train"]["channels_last"] is True
    assert os.path.exists(tmp_path / "cli" / "finetune-0.5" / "model.pt")


def test_every_seed_model_trains_a_step_and_prunes_at_28_and_32():
    for name in models.NAMES:
        for size, channels in ((28, 1), (32, 3)):
            kwargs = {"input_size": size} if name in ("lenet5", "mlp") else {}
            model = models.build(name, in_channels=channels, width=0.25, **kwargs)
            x = torch.randn(4, channels, size, size)
            torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
            slimcore.sparse_bn_step(model, lam=1e-4)
            report = slimcore.prune(model.eval(), x, ratio=0.5)
            assert report.params_after < report.params_before, (name, size)


@pytest.mark.skipif(not os.path.exists(os.path.join(data.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_a_slice_of_fashion_mnist_trains():
    train, _, test, spec = data.datasets("fashion-mnist")
    train = data.ArrayDataset(train.images[:3000], train.labels[:3000])
    test = data.ArrayDataset(test.images[:1000], test.labels[:1000])
    model = models.build("lenet5", in_channels=1, input_size=28)
    s = Settings(epochs=2, batch_size=64, lr=0.05, lam=1e-4, quiet=True)
    record = fit(model, data.Loader(train, spec, 64, train=True), None, data.Loader(test, spec, 500), s,
                 os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fmnist-{os.getpid()}"),
                 model_meta("lenet5", {"in_channels": 1, "input_size": 28}, "fashion-mnist", [1, 28, 28]),
                 torch.device("cpu"))
    assert record["test_acc"] > 0.7


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not found")
@pytest.mark.parametrize("mode", ["subgradient", "proximal"])
def test_ddp_two_cpu_processes_match_one_process(tmp_path, mode):
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29517", worker, str(tmp_path), "64", "1",
                          mode], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    single = subprocess.run([sys.executable, worker, str(tmp_path), "64", "2", mode], env=env, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    rank0 = torch.load(tmp_path / "gamma-world2-rank0.pt")
    rank1 = torch.load(tmp_path / "gamma-world2-rank1.pt")
    alone = torch.load(tmp_path / "gamma-world1-rank0.pt")
    assert torch.equal(rank0, rank1), "gamma must be identical on every rank"
    # One process, same global batch, the batch split as the ranks split it: the same trajectory.
    torch.testing.assert_close(rank0, alone, rtol=1e-4, atol=1e-5)


def test_filter_history_is_the_l1_norm_of_each_filter_per_epoch(tmp_path):
    run_cli("train", *TINY, "--out", tmp_path)
    history = torch.load(tmp_path / "train" / "filter_history.pt", weights_only=True)
    model, _ = load_model(tmp_path / "train" / "model.pt")
    convs = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert history.keys() == convs.keys()
    for name, m in convs.items():
        last = m.weight.detach().double().abs().flatten(1).sum(1)  # after the last epoch
        assert history[name].shape == (2, m.weight.shape[0])
        torch.testing.assert_close(history[name][-1], last, rtol=1e-6, atol=0)  # recorded from fp32 sums
        assert not torch.equal(history[name][0], history[name][1]), "one record per epoch, not one copy"


def test_prune_to_a_flops_budget_per_criterion_and_finetune_by_stage(tmp_path, capsys):
    run = tmp_path / "run"
    run_cli("train", *TINY, "--out", run)
    for criterion in ("bn_scale", "l1_filter", "hbfp", "random"):
        run_cli("prune", "--run", run, "--criterion", criterion, "--scope", "layer", "--flops", "0.6,0.3")
        for f in (0.6, 0.3):
            rep = json.load(open(run / f"prune-{criterion}-flops{f:g}" / "report.json"))
            assert rep["flops_target"] == f and rep["criterion"] == criterion
            assert rep["flops_after"] <= f * rep["flops_before"]
            model, meta = load_model(run / f"prune-{criterion}-flops{f:g}" / "model.pt")
            assert slimcore.profile(model, torch.zeros(1, *meta["input_shape"]))[0] == rep["flops_after"]
    run_cli("finetune", "--run", run, "--stage", "prune-hbfp-flops0.3,prune-random-flops0.6", "--epochs", "1", "--quiet")
    for name in ("finetune-hbfp-flops0.3", "finetune-random-flops0.6"):
        assert len(open(run / name / "metrics.jsonl").read().splitlines()) == 1
    run_cli("report", "--sweep", run, "--out", tmp_path / "sweep")
    text = (tmp_path / "sweep" / "report.md").read_text()
    assert "| run | prune-hbfp-flops0.3 | hbfp | layer |" in text and "sweep_pareto.png" in text
    assert (tmp_path / "sweep" / "sweep_accuracy.png").stat().st_size > 1000
    assert (tmp_path / "sweep" / "sweep_pareto.png").stat().st_size > 1000
    # errors name the problem
    assert cli.main(["prune", "--run", str(run), "--ratio", "0.5", "--flops", "0.5"]) == 2
    assert "give one of --ratio, --flops, --channels and --latency, not --ratio and --flops" in capsys.readouterr().err
    assert cli.main(["prune", "--run", str(run), "--flops", "0"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert cli.main(["prune", "--run", str(run), "--flops", "0.0001"]) == 2
    assert "no ratio keeps" in capsys.readouterr().err
    assert cli.main(["prune", "--run", str(run), "--source", "prune-random-flops0.6", "--criterion", "hbfp"]) == 2
    assert "needs the filter history" in capsys.readouterr().err
    assert cli.main(["finetune", "--run", str(run), "--stage", "train"]) == 2
    assert "not a prune stage" in capsys.readouterr().err


def test_prune_to_a_share_of_the_channels_under_a_layer_cap(tmp_path, capsys):
    run = tmp_path / "run"
    run_cli("train", *TINY, "--out", run)
    run_cli("prune", "--run", run, "--channels", "0.5", "--max-layer-ratio", "0.6")
    rep = json.load(open(run / "prune-bn_scale-channels0.5" / "report.json"))
    assert rep["channels_target"] == 0.5 and rep["max_layer_ratio"] == 0.6
    assert rep["channels_removed_share"] >= 0.5 and rep["ratio"] > 0.5, "the cap puts channels back"
    model, meta = load_model(run / "prune-bn_scale-channels0.5" / "model.pt")
    bns = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    kept = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    assert 1 - kept / sum(rep["channels"][n][0] for n in bns) == pytest.approx(rep["channels_removed_share"])
    assert f"{100 * rep['channels_removed_share']:.1f}%" in capsys.readouterr().out  # the prune table
    # round_to=auto at a searched ratio: the whole-model check stays off, as in the search
    run_cli("prune", "--run", run, "--channels", "0.5", "--round-to", "auto", "--latency-batch", "8",
            "--name", "auto")
    auto = json.load(open(run / "auto" / "report.json"))
    assert auto["latency_check"] is None and auto["channels_removed_share"] >= 0.5
    assert cli.main(["prune", "--run", str(run), "--channels", "0.7", "--max-layer-ratio", "0.5"]) == 2
    assert "no ratio removes 0.7 of the channels" in capsys.readouterr().err
    assert cli.main(["prune", "--run", str(run), "--channels", "0.5", "--flops", "0.5"]) == 2
    assert "not --flops and --channels" in capsys.readouterr().err


def test_prune_to_a_measured_latency_from_the_cli(tmp_path, capsys):
    # Timings are the machine's: the test checks the stage the search writes, not a speed.
    run = tmp_path / "run"
    run_cli("train", *TINY, "--out", run)
    run_cli("prune", "--run", run, "--latency", "0.9", "--latency-batch", "8")
    stage = run / "prune-bn_scale-latency0.9"
    rep = json.load(open(stage / "report.json"))
    assert rep["latency_target"] == 0.9 and 0.0 <= rep["ratio"] < 1.0
    model, meta = load_model(stage / "model.pt")
    assert slimcore.profile(model, torch.zeros(1, *meta["input_shape"]))[0] == rep["flops_after"]
    assert cli.main(["prune", "--run", str(run), "--latency", "0"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert cli.main(["prune", "--run", str(run), "--latency", "0.5", "--flops", "0.5"]) == 2
    assert "not --flops and --latency" in capsys.readouterr().err


def test_scad_and_mcp_shape_form_from_the_cli(tmp_path, capsys):
    from slimcore.pipeline.train import make_penalty

    args = cli.parser().parse_args(["train", *TINY, "--penalty", "scad", "--theta", "0.5", "--out", str(tmp_path)])
    assert make_penalty(cli.settings_from_args(args)) == slimcore.SCAD(a=3.7, theta=0.5)
    args = cli.parser().parse_args(["train", *TINY, "--penalty", "mcp", "--a", "2", "--out", str(tmp_path)])
    assert make_penalty(cli.settings_from_args(args)) == slimcore.MCP(gamma=2.0)
    run_cli("train", *TINY, "--penalty", "mcp", "--theta", "0.3", "--out", tmp_path / "m")
    assert json.load(open(tmp_path / "m" / "config.json"))["train"]["theta"] == 0.3
    assert cli.main(["train", *TINY, "--penalty", "l1", "--theta", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "--theta is a scad / mcp parameter" in capsys.readouterr().err


def test_sweep_report_averages_runs_that_differ_only_by_seed(tmp_path):
    runs = []
    for seed in (0, 1, 2):
        run = tmp_path / f"l1-s{seed}"
        run_cli("train", *TINY[:4], "--epochs", "1", "--batch-size", "64", "--lam", "1e-3", "--quiet",
                "--seed", seed, "--out", run)
        run_cli("prune", "--run", run, "--ratio", "0.4")
        runs.append(run)
    config = json.load(open(runs[0] / "config.json"))
    del config["train"]["theta"]  # as written before --theta existed: still the same settings
    (runs[0] / "config.json").write_text(json.dumps(config))
    other = tmp_path / "tl1"  # another penalty: its own row, never averaged in
    run_cli("train", *TINY[:4], "--epochs", "1", "--batch-size", "64", "--lam", "1e-3", "--quiet",
            "--penalty", "tl1", "--out", other)
    run_cli("report", "--sweep", *runs, other, "--out", tmp_path / "sweep")
    text = (tmp_path / "sweep" / "report.md").read_text()
    accs = [json.load(open(r / "prune-0.4" / "report.json"))["acc_after"] * 100 for r in runs]
    mean = sum(accs) / 3
    std = (sum((a - mean) ** 2 for a in accs) / 2) ** 0.5
    row = next(line for line in text.splitlines() if line.startswith("| l1-s0, l1-s1, l1-s2 |"))
    assert "| 3 |" in row and f"{mean:.2f} ± {std:.2f}" in row
    assert any(line.startswith("| tl1 | tl1 a=1 |") and "| 1 |" in line for line in text.splitlines())
