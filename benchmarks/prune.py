"""Pruning wall time and pruned size: slimcore.prune vs Torch-Pruning, in one run.

For each torchvision model (random BN gammas, so |gamma| ranks channels), both libraries prune
50% of channels with a global BN-scale criterion, each on a fresh copy:

  slimcore        slimcore.prune(model, x, ratio)          (tracing, scoring, rebuilding)
  Torch-Pruning   BNScalePruner(model, x, BNScaleImportance(), global_pruning=True, ...).step()

Times are the median of --repeats runs (each on a fresh copy; model construction is not timed).
The two libraries rank coupled channels differently (slimcore: max |gamma| of the group;
Torch-Pruning: mean, normalised), so their pruned sizes differ. To check the rebuilt models
themselves, slimcore's own choice of channels is then handed to Torch-Pruning's dependency graph
(``same channels``): both must end with identical params and FLOPs. Models where slimcore uses
selection BNs (DenseNet) have no Torch-Pruning equivalent for that check.

Target: slimcore takes <= 1/3 of Torch-Pruning's time on every model.

    python benchmarks/prune.py [--models resnet18,vgg16_bn] [--size 224] [--repeats 3]
"""

import argparse
import copy
import os
import statistics
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
          "efficientnet_b0", "regnet_y_400mf", "resnext50_32x4d"]


def build(name, seed=0):
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.01)
    return model


def classifier_of(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def prune_slimcore(model, x, ratio):
    return slimcore.prune(model, x, ratio=ratio)


def prune_torch_pruning(model, x, ratio):
    import torch_pruning as tp

    pruner = tp.pruner.BNScalePruner(model, x, importance=tp.importance.BNScaleImportance(), pruning_ratio=ratio,
                                     global_pruning=True, ignored_layers=[classifier_of(model)])
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


def timed(fn, model_name, x, ratio, repeats):
    times = []
    for _ in range(repeats):
        model = build(model_name)
        t0 = time.perf_counter()
        fn(model, x, ratio)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=224, help="input resolution of the example input")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(RESULTS, "prune-cpu.json"))
    args = parser.parse_args(argv)
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
          f"input {tuple(x.shape)}, ratio {args.ratio}")
    print(f"{'model':<20} {'slimcore s':>10} {'TP s':>8} {'TP/slim':>7}   {'params dense':>12} {'slim':>11} {'TP':>11}"
          f"   {'MFLOPs dense':>12} {'slim':>8} {'TP':>8}   same channels")
    records = []
    for name in args.models.split(","):
        dense_flops, dense_params = slimcore.profile(build(name), x)
        t_slim, slim_model = timed(prune_slimcore, name, x, args.ratio, args.repeats)
        slim_flops, slim_params = slimcore.profile(slim_model, x)
        rec = dict(model=name, ratio=args.ratio, input=list(x.shape), params_dense=dense_params,
                   flops_dense=dense_flops, slimcore_seconds=t_slim, params_slimcore=slim_params,
                   flops_slimcore=slim_flops)
        if have_tp:
            t_tp, tp_model = timed(prune_torch_pruning, name, x, args.ratio, args.repeats)
            tp_flops, tp_params = slimcore.profile(tp_model, x)
            rec.update(torch_pruning_seconds=t_tp, params_torch_pruning=tp_params, flops_torch_pruning=tp_flops,
                       time_ratio=t_tp / t_slim)
            report = slimcore.prune(build(name), x, ratio=args.ratio, dry_run=True)
            if any(type(m) in slimcore.nn.PLAIN_BATCHNORM for m in slim_model.modules()):
                same = "n/a (selection BNs)"
            else:
                same_model = build(name)
                torch_pruning_same_channels(same_model, x, report.removed)
                same_flops, same_params = slimcore.profile(same_model, x)
                same_ok = (same_flops, same_params) == (report.flops_after, report.params_after)
                same = "identical" if same_ok else f"DIFFER: TP {same_params:,}/{same_flops:,}"
                rec.update(same_channels_identical=same_ok, same_channels_params_torch_pruning=same_params,
                           same_channels_flops_torch_pruning=same_flops)
        else:
            t_tp, tp_params, tp_flops, same = float("nan"), 0, 0, "-"
        print(f"{name:<20} {t_slim:>10.3f} {t_tp:>8.3f} {t_tp / t_slim:>6.1f}x   {dense_params:>12,} {slim_params:>11,} "
              f"{tp_params:>11,}   {dense_flops / 1e6:>12.0f} {slim_flops / 1e6:>8.0f} {tp_flops / 1e6:>8.0f}   {same}")
        records.append(rec)
    write_json(args.out, dict(benchmark="prune", **environment(torch.device("cpu")), records=records))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
