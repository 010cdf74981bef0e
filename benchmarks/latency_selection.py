"""Latency-aware selection against the global threshold at equal measured latency (issue 19).

A sparsity-trained model (by default VGG-11 x0.5 on Fashion-MNIST, L1 lambda 1e-4, trained once by
`slimcore train` into --run and reused) is pruned to each latency budget twice, through the CLI's
prune stage (`slimcore prune --latency F --selection threshold|latency`):

    threshold           the global |gamma| threshold at the ratio ratio_for_latency finds
    latency             slimcore.prune_for_latency: channels chosen by importance per unit of
                        measured per-layer latency, cut where the measured latency meets the budget
                        (importance "sum": the sum of the kept |gamma|)
    latency-log_share   the same with importance "log_share" (the sum over layers of the log of the
                        share of its |gamma| each layer keeps)

(--selections chooses which.)

Both searches time deployed models (slimcore.deploy, NCHW) at --batch on one CPU thread (--threads)
against the deployed dense model, each candidate over --search-rounds interleaved rounds. Afterwards the dense and every pruned model are timed again
together in one interleaved run, --repeats times (median reported), so the two pruned models are
compared at equal measured latency. Accuracy: test set straight after pruning (deterministic) and
after --finetune-epochs of fine-tuning for each of --seeds (fine-tune seed and data order; mean and
standard deviation). Also reported: the importance kept (sum of |gamma| of the BNs left), the
quantity the "sum" latency-aware selection maximises, and the smallest share of its dense sum |gamma|
any BN keeps (what "log_share" keeps from starving).

    python benchmarks/latency_selection.py                       # trains runs/latency-selection first if needed
    python benchmarks/latency_selection.py --run RUN --budgets 0.5 --seeds 0

Results: benchmarks/results/latency-selection-cpu.json and .txt.
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import slimcore
from slimcore.inference.deploy import deploy_fn
from slimcore.pipeline import cli, stages
from slimcore.pipeline.train import Settings, evaluate, load_model
from slimcore.pruning.latency_select import IMPORTANCES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, device_name, environment, write_json  # noqa: E402


def importance(model):
    return sum(float(m.weight.detach().abs().sum()) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))


def layer_shares(model, dense):
    """Per BatchNorm (by name): the share of the dense model's sum |gamma| the pruned one keeps."""
    full = {n: m for n, m in dense.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    return [float(m.weight.detach().abs().sum() / full[n].weight.detach().abs().sum())
            for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def widths(model):
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def finetuned_accuracy(run, stage_dir, out_dir, epochs, steps, lr, seed, threads):
    """Test accuracy after fine-tuning: ``epochs`` of `slimcore finetune`'s stage, or with ``steps``
    only that many SGD steps (momentum 0.9, weight decay 1e-4, constant lr) in the seed's data order."""
    torch.set_num_threads(threads)
    s = Settings(epochs=epochs, lr=lr, lam=0.0, seed=seed, quiet=True, extra={"device": "cpu"})
    if not steps:
        return stages.finetune_stage(run, stage_dir, out_dir, s)["test_acc"]
    config = json.load(open(os.path.join(run, "config.json")))
    model, _ = load_model(os.path.join(stage_dir, "model.pt"))
    torch.manual_seed(seed)
    train_loader, _, test_loader, _ = stages.loaders(config, s, torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    done = 0
    while done < steps:
        for xb, yb in train_loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return evaluate(model, test_loader, torch.device("cpu"))[0]


class _SteadierTable(slimcore.LatencyTable):
    """The searches' whole-model timings with more interleaved rounds than the default (this
    benchmark runs on a shared machine, where one candidate's time can be off by 10%)."""

    rounds, seconds = 10, 0.2

    def time_models(self, models, example_inputs, min_runs=None, min_seconds=None):
        return super().time_models(models, example_inputs, min_runs or self.rounds, min_seconds or self.seconds)


def retime(args, run, dense_model, x, deploy, budgets, selections, env):
    """Times the dense model and every stage model of earlier runs together, interleaved: on a
    loaded machine the per-budget runs' timings drift apart; here all share each round."""
    torch.set_num_threads(args.threads)
    names = [f"prune-bench{f'-cap{float(c):g}' if float(c) < 1 else ''}-{s}-{b:g}"
             for c in args.retime.split(",") for b in budgets for s in selections]
    models = [dense_model] + [load_model(os.path.join(run, n, "model.pt"))[0] for n in names]
    deployed = [deploy(copy.deepcopy(m).eval()) for m in models]
    table = slimcore.LatencyTable("cpu", batch=args.batch, persist=False)
    runs = [table.time_models(deployed, (x,), min_runs=30, min_seconds=1.0) for _ in range(args.repeats)]
    fractions = {n: [r[i] / r[0] for r in runs] for i, n in enumerate(names, start=1)}
    write_json(args.out, {"environment": env, "repeats": args.repeats, "dense_ms": [r[0] * 1e3 for r in runs],
                          "fractions_per_run": fractions})
    lines = [f"# re-timed together, interleaved, {args.repeats} runs; {env['cpu']}, {args.threads} thread(s), "
             f"batch {args.batch}, deploy form; median (min-max) of the per-run fraction of the dense latency"]
    lines += [f"{n:<44} {statistics.median(f):.3f} ({min(f):.3f}-{max(f):.3f})" for n, f in fractions.items()]
    text = "\n".join(lines)
    print(text)
    with open(os.path.splitext(args.out)[0] + ".txt", "w") as f:
        f.write(text + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/latency-selection", help="run directory (trained there if empty)")
    parser.add_argument("--train-args", default="--model vgg11 --width 0.5 --dataset fashion-mnist --lam 1e-4 "
                                                "--epochs 5 --lr 0.1", help="`slimcore train` options, if training")
    parser.add_argument("--budgets", default="0.5,0.3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--selections", default="threshold,latency,latency-log_share",
                        help="threshold, latency (importance sum) and latency-<importance>")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--finetune-steps", type=int, default=0,
                        help="instead of whole epochs: this many SGD steps (batch 64) per fine-tune")
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for every timing")
    parser.add_argument("--train-threads", type=int, default=2, help="CPU threads for training and fine-tuning")
    parser.add_argument("--max-layer-ratio", type=float, default=1.0,
                        help="prune option for both selections: no layer loses more than this share")
    parser.add_argument("--search-rounds", type=int, default=30,
                        help="interleaved rounds of each candidate timing in the searches (slimcore's default: 10)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing runs of the final comparison")
    parser.add_argument("--out", default=os.path.join(RESULTS, "latency-selection-cpu.json"))
    parser.add_argument("--retime", default=None, metavar="CAPS",
                        help="only re-time the pruned models an earlier run left in --run (comma-separated "
                             "max_layer_ratio values of those runs, e.g. 1,0.75), all of them and the dense model "
                             "in one interleaved run, --repeats times; writes OUT")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    budgets = [float(b) for b in args.budgets.split(",")]
    _SteadierTable.rounds, _SteadierTable.seconds = args.search_rounds, 0.02 * args.search_rounds
    stages.LatencyTable = _SteadierTable  # the table prune_stage builds for its search
    seeds = [int(s) for s in args.seeds.split(",")]
    selections = args.selections.split(",")
    for name in selections:
        if name != "threshold" and (name.partition("-")[0] != "latency"
                                    or (name.partition("-")[2] or "sum") not in IMPORTANCES):
            parser.error(f"--selections: unknown selection {name!r}")
    run = args.run
    if not os.path.exists(os.path.join(run, "train", "model.pt")):
        torch.set_num_threads(args.train_threads)
        start = time.perf_counter()
        assert cli.main(["train", *args.train_args.split(), "--quiet", "--out", run]) == 0
        print(f"trained in {time.perf_counter() - start:.0f} s")
    config = json.load(open(os.path.join(run, "config.json")))
    dense_model, meta = load_model(os.path.join(run, "train", "model.pt"))
    x = torch.zeros(1, *meta["input_shape"])
    deploy = deploy_fn(x, memory_format="contiguous")
    env = environment(torch.device("cpu")) | {"cpu": device_name(torch.device("cpu")), "threads": args.threads, "batch": args.batch,
                           "form": "slimcore.deploy, NCHW", "run": run, "model": config.get("model"),
                           "model_kwargs": config.get("model_kwargs"), "train": config.get("train"),
                           "run_note": config.get("note")}
    print(f"{env['cpu']}, torch {torch.__version__}, timing threads {args.threads}, batch {args.batch}")
    if args.retime:
        return retime(args, run, dense_model, x, deploy, budgets, selections, env)
    tag = "prune-bench" + (f"-cap{args.max_layer_ratio:g}" if args.max_layer_ratio < 1 else "")
    rows = []
    for budget in budgets:
        row = {"budget": budget}
        stage_dirs = {}
        for selection in selections:
            torch.set_num_threads(args.threads)  # the searches time at this thread count
            start = time.perf_counter()
            kind, _, imp = selection.partition("-")
            rep = stages.prune_stage(run, os.path.join(run, "train"), None, device="cpu", latency_batch=args.batch,
                                     latency=budget, selection=kind, importance=imp or "sum",
                                     max_layer_ratio=args.max_layer_ratio,
                                     out_dir=os.path.join(run, f"{tag}-{selection}-{budget:g}"))
            stage = os.path.join(run, f"{tag}-{selection}-{budget:g}")
            stage_dirs[selection] = stage
            model, _ = load_model(os.path.join(stage, "model.pt"))
            row[selection] = {"search_seconds": time.perf_counter() - start, "ratio": rep["ratio"],
                              "channels_removed_share": rep["channels_removed_share"],
                              "acc_pruned": rep["acc_after"], "acc_dense": rep["acc_before"],
                              "flops_fraction": rep["flops_after"] / rep["flops_before"],
                              "params": rep["params_after"], "importance": importance(model),
                              "importance_dense": importance(dense_model), "conv_widths": widths(model),
                              "layer_shares": layer_shares(model, dense_model),
                              "search_measured_fraction": (rep["latency"] or {}).get("measured_fraction")}
            print(f"budget {budget:g} {selection:>17}: pruned acc {rep['acc_after']:.4f}, "
                  f"FLOPs {row[selection]['flops_fraction']:.3f}, widths {widths(model)}", flush=True)
        # One interleaved run of dense and every pruned model, repeated: equal latency is checked here.
        torch.set_num_threads(args.threads)
        table = slimcore.LatencyTable("cpu", batch=args.batch, persist=False)
        models = [dense_model] + [load_model(os.path.join(stage_dirs[s], "model.pt"))[0] for s in selections]
        deployed = [deploy(copy.deepcopy(m).eval()) for m in models]
        runs = [table.time_models(deployed, (x,), min_runs=30, min_seconds=1.0) for _ in range(args.repeats)]
        ms = [statistics.median(r[i] for r in runs) * 1e3 for i in range(len(models))]
        row["dense_ms"] = ms[0]
        for i, selection in enumerate(selections, start=1):
            row[selection]["ms"] = ms[i]
            row[selection]["latency_fraction"] = ms[i] / ms[0]
            row[selection]["fractions_per_run"] = [r[i] / r[0] for r in runs]
        for selection in selections:
            accs = [finetuned_accuracy(run, stage_dirs[selection], os.path.join(stage_dirs[selection] + f"-ft-seed{seed}"),
                                       args.finetune_epochs, args.finetune_steps, args.finetune_lr, seed,
                                       args.train_threads)
                    for seed in seeds]
            row[selection]["acc_finetuned"] = accs
            row[selection]["acc_finetuned_mean"] = statistics.mean(accs)
            row[selection]["acc_finetuned_std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"budget {budget:g} {selection:>17}: latency {row[selection]['latency_fraction']:.3f} of dense, "
                  f"fine-tuned {statistics.mean(accs):.4f} +- {row[selection]['acc_finetuned_std']:.4f}", flush=True)
        rows.append(row)
        write_json(args.out, {"environment": env, "max_layer_ratio": args.max_layer_ratio,
                              "search_rounds": args.search_rounds,
                              "finetune_epochs": args.finetune_epochs,
                              "finetune_steps": args.finetune_steps,
                              "finetune_lr": args.finetune_lr, "seeds": seeds, "rows": rows})
    width = max(9, *map(len, selections))
    lines = [f"# latency-aware selection vs global threshold; {env['cpu']}, torch {torch.__version__}, "
             f"{args.threads} thread(s), batch {args.batch}, deploy form; {config.get('model')} "
             f"{config.get('model_kwargs')} on {config.get('dataset')}, max_layer_ratio {args.max_layer_ratio:g}",
             "# fine-tune: " + (f"{args.finetune_steps} SGD steps of batch 64" if args.finetune_steps else
                                f"{args.finetune_epochs} epoch(s)") + f", lr {args.finetune_lr}, seeds {seeds} (mean +- std)",
             f"{'budget':>6} {'selection':>{width}} {'latency':>8} {'FLOPs':>6} {'kept |g|':>9} {'acc pruned':>10} "
             f"{'acc fine-tuned':>16} {'min share':>9}  conv widths"]
    for row in rows:
        for s in selections:
            r = row[s]
            lines.append(f"{row['budget']:>6g} {s:>{width}} {r['latency_fraction']:>8.3f} {r['flops_fraction']:>6.3f} "
                         f"{r['importance']:>9.2f} {r['acc_pruned']:>10.4f} "
                         f"{r['acc_finetuned_mean']:>8.4f} +- {r['acc_finetuned_std']:.4f} {min(r['layer_shares']):>9.3f}  "
                         f"{r['conv_widths']}")
    text = "\n".join(lines)
    print(text)
    with open(os.path.splitext(args.out)[0] + ".txt", "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
