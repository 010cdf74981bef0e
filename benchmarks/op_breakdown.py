"""Where the time of a deployed dense and slimmed model goes, op by op (torch.profiler, CPU).

For each model: the dense network with drawn gammas (as latency.py builds it) and copies pruned at
--ratios, each deployed (slimcore.deploy, the latency table's default form), profiled over
--calls forwards after a warm-up. Prints, per op type, self CPU ms per forward for dense and
each ratio and the share of the total, with the conv MACs next to them; writes a JSON file.

    python benchmarks/op_breakdown.py --models preresnet164 --ratios 0.5 --threads 1
"""

import argparse
import copy
import os
import sys
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import slimcore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, environment, write_json  # noqa: E402
from latency import build  # noqa: E402


def op_times(model, x, calls):
    """{op name: self CPU ms per forward}, the top-level ATen / slimcore ops only."""
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                model(x)
    out = {}
    for e in prof.key_averages():
        if e.self_cpu_time_total > 0:
            out[e.key] = out.get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / calls
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="preresnet164")
    parser.add_argument("--ratios", default="0.5")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    warnings.filterwarnings("ignore", category=UserWarning)
    ratios = [float(r) for r in args.ratios.split(",")]
    results = []
    for name in args.models.split(","):
        dense, shape = build(name)
        example = torch.randn(1, *shape)
        x = torch.randn(args.batch_size, *shape)
        variants = {"dense": dense}
        for r in ratios:
            slim = copy.deepcopy(dense)
            slimcore.prune(slim, example, ratio=r)
            variants[f"ratio {r}"] = slim
        rows = {}
        formats = {}
        for key, m in variants.items():
            deployed = slimcore.deploy(m, x)
            formats[key] = deployed.deploy_report["memory_format"]
            rows[key] = op_times(deployed, x, args.calls)
        ops = sorted(rows["dense"], key=rows["dense"].get, reverse=True)[: args.top]
        ops += sorted({op for r in rows.values() for op in r} - set(ops),
                      key=lambda op: -max(r.get(op, 0.0) for r in rows.values()))[:3]
        totals = {k: sum(r.values()) for k, r in rows.items()}
        print(f"\n{name}, batch {args.batch_size}, {torch.get_num_threads()} threads; self CPU ms per forward "
              f"(share of total); memory formats {formats}")
        print(f"{'op':<36}" + "".join(f"{k:>22}" for k in rows))
        for op in ops:
            print(f"{op[:36]:<36}" + "".join(f"{r.get(op, 0.0):>12.2f} ({100 * r.get(op, 0.0) / totals[k]:>5.1f}%)"
                                             for k, r in rows.items()))
        print(f"{'total':<36}" + "".join(f"{totals[k]:>12.2f}          " for k in rows))
        results.append(dict(model=name, batch_size=args.batch_size, memory_formats=formats, ms_per_forward=rows,
                            totals=totals))
    out = args.out or os.path.join(RESULTS, "op-breakdown-cpu.json")
    write_json(out, dict(benchmark="op_breakdown", **environment(torch.device("cpu")), calls=args.calls,
                         results=results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
