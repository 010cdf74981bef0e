"""Why a slimmed model does not realise its FLOPs cut: a measured roofline, layer by layer.

For each model, the dense network with drawn gammas (as latency.py builds it) and a copy pruned at
--ratio are deployed (slimcore.deploy, the latency table's form) and run with a forward hook pair
on every leaf module: per call, the wall time (median over --rounds rounds that alternate between
dense and slim), the FLOPs (2 x MACs of convs and linears; one per output element otherwise) and
the bytes the op must move at least (its tensor inputs, its output, its weights and buffers). From
those:

    achieved GFLOP/s, GB/s      per layer, dense and slim
    peak compute, peak bandwidth   the best achieved over the model's layers (this machine, these ops)
    roofline time               max(FLOPs / peak compute, bytes / peak bandwidth) per layer
    realised fraction           (dense time / slim time) / (dense FLOPs / slim FLOPs), measured and
                                of the roofline times: the latter is the most a kernel that ran
                                every layer at the machine's best measured rates could realise

Layers are grouped by their position in the model (same name in dense and slim), so each row
compares a dense layer with its slimmed self.

    python benchmarks/roofline.py --models vgg19,resnet50 --ratio 0.5 --batch-size 64 --threads 1
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

import slimcore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, start_cpu_run, write_json  # noqa: E402
from latency import build  # noqa: E402


COMPUTE_LAYERS = ("Conv2d", "Conv2dAdd", "CompensatedConv2d", "Linear")


def _nbytes(t):
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _flops(module, inputs, output):
    if isinstance(module, nn.modules.conv._ConvNd):
        k = 1
        for s in module.kernel_size:
            k *= s
        return 2 * output.numel() * (module.in_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return 2 * output.numel() * module.in_features
    return output.numel() if isinstance(output, torch.Tensor) else 0


class LayerClock:
    """Forward hooks on every leaf module of ``model``: per call (in call order) name, seconds,
    FLOPs and bytes of the last forward."""

    def __init__(self, model):
        self.calls = []
        self.handles = []
        for name, m in model.named_modules():
            if next(m.children(), None) is None and name:
                self.handles.append(m.register_forward_pre_hook(self._pre))
                self.handles.append(m.register_forward_hook(self._post(name)))
        self._t0 = None

    def _pre(self, module, inputs):
        self._t0 = time.perf_counter()

    def _post(self, name):
        def hook(module, inputs, output):
            seconds = time.perf_counter() - self._t0
            moved = sum(_nbytes(t) for t in inputs) + _nbytes(output)
            moved += sum(_nbytes(t) for t in module.parameters(recurse=False))
            moved += sum(_nbytes(t) for t in module.buffers(recurse=False))
            # an in-place op's output is its input: counted once read, once written
            self.calls.append((name, type(module).__name__, seconds, _flops(module, inputs, output), moved))

        return hook

    def forward(self, model, x):
        self.calls = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(x)
            total = time.perf_counter() - t0
        return total, self.calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vgg19,resnet50")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round-to", default="8", help="as latency.py's --round-to (an integer)")
    parser.add_argument("--top", type=int, default=12, help="layers printed per model (by dense time)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    env = start_cpu_run(args.threads)
    results = []
    for name in args.models.split(","):
        dense, shape = build(name)
        example = torch.randn(1, *shape)
        slim = copy.deepcopy(dense)
        slimcore.prune(slim, example, ratio=args.ratio, round_to=int(args.round_to))
        x = torch.randn(args.batch_size, *shape)
        deployed = {k: slimcore.deploy(m, x) for k, m in (("dense", dense), ("slim", slim))}
        clocks = {k: LayerClock(m) for k, m in deployed.items()}
        for k, m in deployed.items():  # warm-up
            clocks[k].forward(m, x)
        totals = {k: [] for k in deployed}
        per_call = {k: None for k in deployed}
        for _ in range(args.rounds):
            for k, m in deployed.items():
                total, calls = clocks[k].forward(m, x)
                totals[k].append(total)
                if per_call[k] is None:
                    per_call[k] = [(n, t, [s], f, b) for n, t, s, f, b in calls]
                else:
                    for row, (_, _, s, _, _) in zip(per_call[k], calls):
                        row[2].append(s)
        layers = {}
        for k, rows in per_call.items():
            seen = {}
            for n, t, s, f, b in rows:
                i = seen[n] = seen.get(n, -1) + 1
                layers.setdefault((n, i), {"name": n if i == 0 else f"{n}#{i}", "type": t})[k] = dict(
                    ms=statistics.median(s) * 1e3, flops=f, bytes=b)
        rows = [v for v in layers.values() if "dense" in v and "slim" in v]
        peak_flops = max(r[k]["flops"] / (r[k]["ms"] / 1e3) for r in rows for k in ("dense", "slim") if r[k]["ms"] > 0)
        peak_bw = max(r[k]["bytes"] / (r[k]["ms"] / 1e3) for r in rows for k in ("dense", "slim") if r[k]["ms"] > 0)
        for r in rows:
            for k in ("dense", "slim"):
                d = r[k]
                d["roofline_ms"] = 1e3 * max(d["flops"] / peak_flops, d["bytes"] / peak_bw)
                d["bound"] = "compute" if d["flops"] / peak_flops >= d["bytes"] / peak_bw else "memory"
                d["gflops"] = d["flops"] / d["ms"] / 1e6 if d["ms"] else 0.0
                d["gbs"] = d["bytes"] / d["ms"] / 1e6 if d["ms"] else 0.0
        summary = {}
        for k in ("dense", "slim"):
            compute = [r for r in rows if r["type"] in COMPUTE_LAYERS]
            summary[k] = dict(
                total_ms=statistics.median(totals[k]) * 1e3,
                layers_ms=sum(r[k]["ms"] for r in rows),
                compute_ms=sum(r[k]["ms"] for r in compute),
                flops=sum(r[k]["flops"] for r in compute),
                roofline_ms=sum(r[k]["roofline_ms"] for r in rows),
                bytes=sum(r[k]["bytes"] for r in rows),
                memory_bound_ms=sum(r[k]["ms"] for r in rows if r[k]["bound"] == "memory"),
            )
        for v in summary.values():
            v["compute_gflops"] = v["flops"] / v["compute_ms"] / 1e6
            v["other_ms"] = v["total_ms"] - v["compute_ms"]  # non-conv layers, functional ops, Python
        # the slimmed model if its convs and linears ran at the dense ones' FLOP rate
        at_dense_rate_ms = summary["slim"]["flops"] / summary["dense"]["compute_gflops"] / 1e6 + summary["slim"]["other_ms"]
        flops_x = summary["dense"]["flops"] / summary["slim"]["flops"]
        measured_x = summary["dense"]["total_ms"] / summary["slim"]["total_ms"]
        roof_x = summary["dense"]["roofline_ms"] / summary["slim"]["roofline_ms"]
        bytes_x = summary["dense"]["bytes"] / summary["slim"]["bytes"]
        print(f"\n{name}, ratio {args.ratio}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
              f"memory formats {[m.deploy_report['memory_format'] for m in deployed.values()]}; medians of "
              f"{args.rounds} interleaved rounds")
        print(f"peak measured: {peak_flops / 1e9:.0f} GFLOP/s, {peak_bw / 1e9:.1f} GB/s (ridge at "
              f"{peak_flops / peak_bw:.0f} FLOP/byte)")
        print(f"{'layer':<28} {'type':<12} {'dense ms':>9} {'slim ms':>8} {'x':>5} {'FLOPs x':>7} {'bytes x':>7} "
              f"{'FLOP/B d/s':>11} {'GFLOP/s d/s':>12} {'GB/s d/s':>10} {'bound d/s':>9} {'roof x':>6}")
        for r in sorted(rows, key=lambda r: -r["dense"]["ms"])[: args.top]:
            d, s = r["dense"], r["slim"]
            print(f"{r['name'][:28]:<28} {r['type'][:12]:<12} {d['ms']:>9.2f} {s['ms']:>8.2f} "
                  f"{d['ms'] / max(s['ms'], 1e-9):>5.2f} {d['flops'] / max(s['flops'], 1):>7.2f} "
                  f"{d['bytes'] / max(s['bytes'], 1):>7.2f} "
                  f"{d['flops'] / d['bytes']:>5.0f}/{s['flops'] / s['bytes']:<5.0f} "
                  f"{d['gflops']:>5.0f}/{s['gflops']:<6.0f} {d['gbs']:>4.0f}/{s['gbs']:<5.0f} "
                  f"{d['bound'][:3]}/{s['bound'][:3]:<5} {d['roofline_ms'] / max(s['roofline_ms'], 1e-9):>6.2f}")
        print(f"whole model: measured {summary['dense']['total_ms']:.1f} -> {summary['slim']['total_ms']:.1f} ms "
              f"({measured_x:.2f}x; FLOPs {flops_x:.2f}x, realised {measured_x / flops_x:.2f}); bytes moved "
              f"{bytes_x:.2f}x less; roofline {summary['dense']['roofline_ms']:.1f} -> "
              f"{summary['slim']['roofline_ms']:.1f} ms ({roof_x:.2f}x, realised {roof_x / flops_x:.2f}); "
              f"memory-bound layers {summary['dense']['memory_bound_ms']:.1f} / {summary['slim']['memory_bound_ms']:.1f} ms")
        d, s_ = summary["dense"], summary["slim"]
        print(f"convs + linears: {d['compute_ms']:.1f} -> {s_['compute_ms']:.1f} ms at {d['compute_gflops']:.0f} -> "
              f"{s_['compute_gflops']:.0f} GFLOP/s; the rest {d['other_ms']:.1f} -> {s_['other_ms']:.1f} ms; slimmed convs at "
              f"the dense FLOP rate: {at_dense_rate_ms:.1f} ms ({d['total_ms'] / at_dense_rate_ms:.2f}x, realised "
              f"{d['total_ms'] / at_dense_rate_ms / flops_x:.2f})")
        results.append(dict(model=name, ratio=args.ratio, batch_size=args.batch_size, round_to=int(args.round_to),
                            memory_formats={k: m.deploy_report["memory_format"] for k, m in deployed.items()},
                            peak_gflops=peak_flops / 1e9, peak_gbs=peak_bw / 1e9, summary=summary,
                            speedup=measured_x, flops_speedup=flops_x, realised_fraction=measured_x / flops_x,
                            roofline_speedup=roof_x, roofline_realised_fraction=roof_x / flops_x,
                            slim_ms_at_dense_flop_rate=at_dense_rate_ms, layers=rows))
        for c in clocks.values():
            for h in c.handles:
                h.remove()
    out = args.out or os.path.join(RESULTS, "roofline-cpu.json")
    write_json(out, dict(benchmark="roofline", **env, rounds=args.rounds, results=results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
