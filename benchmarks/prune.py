"""Pruning wall time and pruned size: slimcore.prune vs Torch-Pruning, in one run.

For each model (torchvision; ``timm:NAME`` and ``yolo:NAME`` built from their configs; random BN
gammas, so |gamma| ranks channels), both libraries prune 50% of channels with a global BN-scale
criterion, each on a fresh copy, each library in a fresh process per model:

  slimcore        slimcore.prune(model, x, ratio)          (tracing, scoring, rebuilding)
  Torch-Pruning   BNScalePruner(model, x, BNScaleImportance(), global_pruning=True, ...).step()

"first" is the first call in that fresh process (one-time costs included), "warm" the median of
the --repeats calls after it (each on a fresh copy; model construction is not timed). With
--rounds N each library gets N fresh processes per model, the two taking turns, and the table
reports the median first call and the median of all warm calls (on a shared machine a slow
minute then lands on both libraries). A library that raises, or takes longer than --timeout,
gets its error in the table.
The two libraries rank coupled channels differently (slimcore: max |gamma| of the group;
Torch-Pruning: mean, normalised), so their pruned sizes differ. To check the rebuilt models
themselves, slimcore's own choice of channels is then handed to Torch-Pruning's dependency graph
(``same channels``): both must end with identical params and FLOPs. Models where slimcore uses
selection BNs (DenseNet) have no Torch-Pruning equivalent for that check.

Target: slimcore takes <= 1/3 of Torch-Pruning's time on every model.

    python benchmarks/prune.py [--models resnet18,timm:cspdarknet53,yolo:yolov8n] [--size 224] [--repeats 3] [--rounds 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torchvision
from torch import nn

import slimcore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, device_name, environment, write_json  # noqa: E402

MODELS = ["resnet18", "resnet50", "vgg16_bn", "densenet121", "mobilenet_v2", "mobilenet_v3_small",
          "efficientnet_b0", "regnet_y_400mf", "resnext50_32x4d",
          "timm:resnet50d", "timm:efficientnet_b0", "timm:regnety_008", "timm:cspdarknet53", "timm:ghostnet_100",
          "timm:dpn68", "timm:mobilenetv3_large_100", "yolo:yolov8n", "yolo:yolo11n", "yolo:yolov8n-seg"]


def _construct(name):
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False)
    if name.startswith("yolo:"):
        from ultralytics.nn import tasks

        kind = name[5:].split("-")[1] if "-" in name else "det"
        cls = {"det": tasks.DetectionModel, "seg": tasks.SegmentationModel, "pose": tasks.PoseModel,
               "cls": tasks.ClassificationModel}[kind]
        return cls(f"{name[5:]}.yaml", verbose=False)
    return getattr(torchvision.models, name)()


def build(name, seed=0):
    torch.manual_seed(seed)
    model = _construct(name).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.01)
    return model


def output_layers(model):
    """What Torch-Pruning must leave alone: the classifier, or a YOLO's Detect/Segment/Pose head."""
    if type(model).__module__.startswith("ultralytics"):
        return [model.model[-1]]
    return [[m for m in model.modules() if isinstance(m, nn.Linear)][-1]]


def prune_slimcore(model, x, ratio):
    return slimcore.prune(model, x, ratio=ratio)


def prune_torch_pruning(model, x, ratio):
    import torch_pruning as tp

    pruner = tp.pruner.BNScalePruner(model, x, importance=tp.importance.BNScaleImportance(), pruning_ratio=ratio,
                                     global_pruning=True, ignored_layers=output_layers(model))
    pruner.step()


def torch_pruning_same_channels(model, x, removed):
    """Prunes, with Torch-Pruning's dependency graph, exactly the output channels slimcore removed
    from each conv and linear (coupled layers follow through Torch-Pruning's groups)."""
    import torch_pruning as tp

    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    out_handlers = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
    done = set()  # modules whose output channels a group already pruned
    for name, idx in removed.items():
        m = model.get_submodule(name)
        if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1:
            continue  # depthwise: follows its producer
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or id(m) in done:
            continue
        handler = tp.prune_conv_out_channels if isinstance(m, nn.Conv2d) else tp.prune_linear_out_channels
        group = dg.get_pruning_group(m, handler, idxs=list(idx))
        done.update(id(dep.target.module) for dep, _ in group if dep.handler in out_handlers)
        group.prune()


class _Timeout(Exception):
    pass


def child(lib, name, size, ratio, repeats, threads):
    """One library on one model in this (fresh) process: first call, then warm repeats."""
    import signal

    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    x = torch.randn(1, 3, size, size)
    fn = prune_slimcore if lib == "slimcore" else prune_torch_pruning
    times, model = [], None
    for _ in range(1 + repeats):
        model = build(name)
        t0 = time.perf_counter()
        fn(model, x, ratio)
        times.append(time.perf_counter() - t0)
    flops, params = slimcore.profile(model, x)
    return dict(first=times[0], warm=statistics.median(times[1:]), warm_all=times[1:], params=params, flops=flops)


def run_child(lib, name, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", lib, "--models", name, "--size", str(args.size),
           "--ratio", str(args.ratio), "--repeats", str(args.repeats)] + (
        ["--threads", str(args.threads)] if args.threads else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"did not finish in {args.timeout:.0f} s")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        err = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        return dict(error=err[-1][:160] if err else f"exit code {done.returncode}")
    return json.loads(lines[-1])


def run_rounds(name, args, have_tp):
    """Both libraries, --rounds times each, taking turns (and swapping who goes first), so a slower
    minute of a shared machine lands on both: the median first call and the median of all warm
    calls per library. A library's error ends its rounds."""
    runs = {"slimcore": [], "torch-pruning": []}
    errors = {} if have_tp else {"torch-pruning": dict(error="not installed")}
    for r in range(args.rounds):
        order = ["slimcore", "torch-pruning"][:: 1 if r % 2 == 0 else -1]
        for lib in order:
            if lib in errors:
                continue
            result = run_child(lib, name, args)
            if "error" in result:
                errors[lib] = result
            else:
                runs[lib].append(result)

    def summary(lib):
        if lib in errors:
            return errors[lib]
        done = runs[lib]
        return dict(done[0], first=statistics.median(d["first"] for d in done),
                    warm=statistics.median(w for d in done for w in d["warm_all"]), rounds=len(done))

    return summary("slimcore"), summary("torch-pruning")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=224, help="input resolution of the example input")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per library and model, the libraries taking turns (medians reported)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per library and model")
    parser.add_argument("--out", default=os.path.join(RESULTS, "prune-cpu.json"))
    parser.add_argument("--child", choices=["slimcore", "torch-pruning"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.models, args.size, args.ratio, args.repeats, args.threads)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import torch_pruning  # noqa: F401
        have_tp = True
    except ImportError:
        have_tp = False
        print("torch-pruning is not installed (pip install torch-pruning): timing slimcore only")
    warnings.filterwarnings("ignore")
    x = torch.randn(1, 3, args.size, args.size)
    print(f"{device_name(torch.device('cpu'))}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"input {tuple(x.shape)}, ratio {args.ratio}; seconds: first call in a fresh process / warm median")
    print(f"{'model':<24} {'slimcore s':>13} {'TP s':>13} {'TP/slim warm':>12}   {'params dense':>12} {'slim':>11} "
          f"{'TP':>11}   {'MFLOPs dense':>12} {'slim':>7} {'TP':>7}   same channels")
    records = []
    for name in args.models.split(","):
        dense_flops, dense_params = slimcore.profile(build(name), x)
        slim, tp = run_rounds(name, args, have_tp)
        rec = dict(model=name, ratio=args.ratio, input=list(x.shape), params_dense=dense_params,
                   flops_dense=dense_flops, slimcore=slim, torch_pruning=tp)
        same = "-"
        if have_tp and ":" not in name and "error" not in slim:
            report = slimcore.prune(build(name), x, ratio=args.ratio, dry_run=True)
            if any(type(m) in slimcore.pruning.modules.PLAIN_BATCHNORM for m in build(name).modules()) or \
                    "densenet" in name:
                same = "n/a (selection BNs)"
            else:
                same_model = build(name)
                torch_pruning_same_channels(same_model, x, report.removed)
                same_flops, same_params = slimcore.profile(same_model, x)
                same_ok = (same_flops, same_params) == (report.flops_after, report.params_after)
                same = "identical" if same_ok else f"DIFFER: TP {same_params:,}/{same_flops:,}"
                rec.update(same_channels_identical=same_ok)
        if "error" not in slim and "error" not in tp:
            rec["time_ratio_warm"] = tp["warm"] / slim["warm"]
            rec["time_ratio_first"] = tp["first"] / slim["first"]

        def cell(r, key, fmt):
            return format(r[key], fmt) if key in r else "-"

        def secs(r):
            return f"{r['first']:.3f}/{r['warm']:.3f}" if "error" not in r else "error"

        ratio = f"{rec['time_ratio_warm']:.1f}x" if "time_ratio_warm" in rec else "-"
        print(f"{name:<24} {secs(slim):>13} {secs(tp):>13} {ratio:>12}   {dense_params:>12,} "
              f"{cell(slim, 'params', ','):>11} {cell(tp, 'params', ','):>11}   {dense_flops / 1e6:>12.0f} "
              f"{slim.get('flops', 0) / 1e6:>7.0f} {tp.get('flops', 0) / 1e6:>7.0f}   {same}")
        for lib, r in (("slimcore", slim), ("Torch-Pruning", tp)):
            if "error" in r:
                print(f"    {lib}: {r['error']}")
        records.append(rec)
    write_json(args.out, dict(benchmark="prune", **environment(torch.device("cpu")), records=records))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
