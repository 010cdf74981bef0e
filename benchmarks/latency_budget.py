"""Pruning to a latency budget: slimcore.ratio_for_latency, checked in a separate timing run.

For each model (gammas drawn as in latency.py, so a global threshold at ratio r removes a share r
of every layer) and each target fraction, ratio_for_latency searches the prune ratio whose
deployed model runs in that fraction of the deployed dense model's time (each candidate timed
against the dense model in one interleaved run). A copy is then pruned at the ratio found and,
in a fresh interleaved run with more rounds, dense and pruned are timed again, both deployed
(slimcore.deploy). The table reports what the search measured and what the second run measured:

    target      the latency fraction asked for
    ratio       the prune ratio found
    measured    pruned / dense latency at that ratio, measured afterwards in separate interleaved
                runs (median of --repeats)
    FLOPs       pruned / dense FLOPs at that ratio (what ratio_for_flops would aim at)

Target: measured <= target + 0.05 on every row. Results: benchmarks/results/latency-budget-<device>.json.

    python benchmarks/latency_budget.py                                  # vgg19, preresnet164 at 32x32
    python benchmarks/latency_budget.py --models resnet50 --batch 8 --targets 0.5
"""

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import torch

import slimcore
from slimcore.inference.deploy import deploy_fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, device_name, environment, write_json  # noqa: E402
from latency import build  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vgg19,preresnet164")
    parser.add_argument("--targets", default="0.7,0.5")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing runs of the check")
    parser.add_argument("--resolution", type=float, default=0.01)
    parser.add_argument("--out", default=os.path.join(RESULTS, "latency-budget-cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    targets = [float(t) for t in args.targets.split(",")]
    print(f"{device_name(torch.device('cpu'))}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, deploy form (slimcore.deploy, NCHW)")
    print(f"{'model':<14} {'target':>6} {'ratio':>7} {'measured':>9} {'FLOPs':>7} {'search s':>9}  ok")
    records = []
    for name in args.models.split(","):
        model, shape = build(name)
        x = torch.randn(1, *shape)
        batch_x = torch.randn(args.batch, *shape)
        deployed = deploy_fn(batch_x, memory_format="contiguous")  # one form for dense and pruned
        table = slimcore.LatencyTable("cpu", batch=args.batch, persist=False)
        dense = deployed(copy.deepcopy(model))
        for target in targets:
            t0 = time.perf_counter()
            ratio = slimcore.ratio_for_latency(model, x, target, resolution=args.resolution, latency_table=table,
                                               deploy=deployed)
            seconds = time.perf_counter() - t0
            pruned_model = copy.deepcopy(model)
            report = slimcore.prune(pruned_model, x, ratio=ratio)
            pruned = deployed(pruned_model.eval())
            check = slimcore.LatencyTable("cpu", batch=args.batch, persist=False)
            fractions = []
            for _ in range(args.repeats):
                dense_s, pruned_s = check.time_models([dense, pruned], (x,), min_runs=20, min_seconds=1.0)
                fractions.append(pruned_s / dense_s)
            measured = statistics.median(fractions)
            flops = report.flops_after / report.flops_before
            ok = measured <= target + 0.05
            print(f"{name:<14} {target:>6.2f} {ratio:>7.4f} {measured:>9.3f} {flops:>7.3f} "
                  f"{seconds:>9.1f}  {'yes' if ok else 'NO'}")
            records.append(dict(model=name, target=target, ratio=ratio, measured_fraction=measured, measured_runs=fractions, flops_fraction=flops,
                                params_fraction=report.params_after / report.params_before, search_seconds=seconds,
                                batch=args.batch, threads=torch.get_num_threads(), within_5_percent=ok))
            # after every row: a long search cut short by a time limit keeps what was measured
            write_json(args.out, dict(benchmark="latency_budget", **environment(torch.device("cpu")), records=records))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
