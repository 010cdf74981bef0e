"""Measured latency of slimmed vs dense models, next to what the FLOPs predict.

For each model, the dense network gets random BatchNorm gammas drawn so that a global |gamma|
threshold at ratio r removes a share r of every layer's channels (see draw_gammas), and
slimcore.prune slims a copy at each ratio.
Dense and slimmed models then run the same inputs under torch.inference_mode: after a warm-up,
rounds alternate between all variants (so machine drift hits them alike), and the table reports
the median and interquartile range of the per-forward latency. With --from-run RUN the model is a
run's sparsity-trained network (slimcore train), pruned by its own gammas.

    speed-up           = latency dense / latency slimmed          (measured)
    FLOPs speed-up     = FLOPs dense / FLOPs slimmed              (predicted; conv + linear MACs)
    realised fraction  = speed-up / FLOPs speed-up                (1.0: the FLOPs cut is all realised)

A slimmed model slower than its dense model is flagged in the table and the JSON.

Dense and slimmed models are always timed in the same form (--form, reported in every record):

    deploy       slimcore.deploy (default): BN folded where exact, the other BNs as one fused
                 gather-scale-shift-activation op, NCHW or channels_last by measurement
    as-pruned    the model prune returns; --fold-bn, --channels-last and --compile modify it
    compile      slimcore.deploy(..., compile=True) (torch.compile; slow to start)
    onnxruntime  slimcore.deploy(..., portable=True) exported to ONNX, run by ONNX Runtime's CPU
                 provider with --threads intra-op threads (needs onnx, onnxscript, onnxruntime)

Default (the README's first command): VGG-19, pre-activation ResNet-164 and DenseNet-40 at 32x32
(batch 32), torchvision resnet50 and mobilenet_v2 at 224x224 (batch 4), ratios 0.3/0.5/0.7, deploy
form: about two minutes on a 2-core CPU. The project's CPU targets are measured at batch 64:

    python benchmarks/latency.py --models vgg19,resnet50 --ratios 0.5 --batch-sizes 64 --round-to 8

--round-to takes several values (e.g. 1,8,32,auto): each ratio then gets one slimmed model per
value, all timed in the same interleaved rounds against the same dense model. "auto" is
slimcore.prune(..., round_to="auto"): layer widths snapped up only where a measured width is
faster (slimcore/pruning/widths.py), timed at the benchmark's batch, dtype, memory format and device,
and kept only if the whole pruned model (in the benchmark's form: deployed, or folded with
--fold-bn) beat round_to=1's in prune's own check (records: auto_latency_check).

Results: a JSON file (benchmarks/results/latency-<device>.json, or --out) whose records carry
model, ratio, batch_size, device, dtype, threads, form, params/flops dense and slim, latencies,
speed-ups and realised fraction (and, for deploy forms, the memory format deploy chose for each); and a PNG plot of speed-up vs prune ratio with the FLOPs prediction.
"""

import argparse
import contextlib
import copy
import io
import os
import sys
import time
import warnings

import numpy as np
import torch

import slimcore
import slimcore.pruning.graph
from slimcore import LatencyTable
import slimcore.models as seed_models

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, environment, interleaved, selected_devices, warn_if_reference, write_json  # noqa: E402

DEFAULT_MODELS = "vgg19,preresnet164,densenet40,resnet50,mobilenet_v2"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def draw_gammas(model, example, seed=0):
    """Random BN gammas such that a global threshold at ratio r removes a share r of every layer's
    channels (in expectation). Each class of coupled channels (slimcore.pruning.graph) draws one uniform
    value, and every BN channel that reads the class gets it: the pruner scores a class by the max
    of its BNs, so i.i.d. gammas would keep classes read by many BNs (residual streams) and cut the
    rest far harder than r."""
    graph = slimcore.pruning.graph.analyze(model, (example,))
    value = np.random.default_rng(seed).random(graph.n_atoms)[graph.classes()] + 0.01
    with torch.no_grad():
        for mc in graph.modules.values():
            if mc.kind in ("bn", "selection_bn") and mc.module.weight is not None:
                mc.module.weight.copy_(torch.from_numpy(value[mc.source_atoms]))


def build(name, seed=0):
    """(model with drawn BN gammas, input shape without the batch) for a seed or torchvision model."""
    torch.manual_seed(seed)
    if name in seed_models.NAMES:
        if name in ("lenet5", "mlp"):
            model, shape = seed_models.build(name, in_channels=1, input_size=28), (1, 28, 28)
        else:
            model, shape = seed_models.build(name), (3, 32, 32)
    else:
        import torchvision

        if not hasattr(torchvision.models, name):
            raise SystemExit(f"latency.py: unknown model {name!r} (slimcore.models: {', '.join(seed_models.NAMES)}, "
                             "or a torchvision.models name)")
        model, shape = getattr(torchvision.models, name)(), (3, 224, 224)
    model.eval()
    draw_gammas(model, torch.randn(1, *shape), seed)
    return model, shape


def from_run(path):
    """(name, model, input shape) of a run directory's sparsity-trained model (RUN/train/model.pt),
    a stage directory, or a model.pt file written by slimcore's pipeline."""
    from slimcore.pipeline.train import load_model

    for candidate in (os.path.join(path, "train", "model.pt"), os.path.join(path, "model.pt"), path):
        if os.path.isfile(candidate):
            model, meta = load_model(candidate)
            return f"{meta.get('model', 'model')} ({os.path.basename(os.path.normpath(path))})", model.eval(), \
                tuple(meta["input_shape"])
    raise SystemExit(f"latency.py: no model.pt in {path} (expected a run directory from `slimcore train`)")


FORMS = ("deploy", "as-pruned", "compile", "onnxruntime")


def prepare(model, x, args, device, dtype):
    """The form of a model that is timed (--form): (forward function, memory format or None)."""
    model = model.to(device)
    if args.form == "as-pruned":
        if args.fold_bn:
            slimcore.fold_bn(model, x)
        model = model.to(dtype=dtype)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if args.compile:
            model = torch.compile(model)
        return forward_fn(model, x), "channels_last" if args.channels_last else "contiguous"
    fmt = "channels_last" if args.channels_last else "auto"
    deployed = slimcore.deploy(model, x, device=device, dtype=dtype, memory_format=fmt,
                               compile=args.form == "compile", portable=args.form == "onnxruntime", timing_rounds=3,
                               fuse_adds=not args.no_fuse_adds)
    chosen = deployed.deploy_report["memory_format"]
    if args.form == "onnxruntime":  # ONNX Runtime picks its own layouts
        return onnxruntime_fn(deployed, x, args.threads), "onnx"
    return forward_fn(deployed, x), chosen


def onnxruntime_fn(model, x, threads):
    """model exported to ONNX (torch.onnx, dynamo exporter) and run by ONNX Runtime on the CPU."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x.cpu(),), path, dynamo=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.cpu().numpy()}
    return lambda: session.run(None, feed)


def folding(example):
    """prune's deploy hook for --fold-bn: its whole-model check then times the candidates with BN
    folded, as this benchmark runs them."""
    def deploy(model):
        slimcore.fold_bn(model, example)
        return model

    return deploy


def deploying(example, memory_format):
    """prune's deploy hook for the deploy forms: the whole-model check times deployed candidates
    (in the memory format of the layer timings)."""
    return lambda model: slimcore.deploy(model, example, memory_format=memory_format)


def forward_fn(model, x):
    def run():
        with torch.inference_mode():
            return model(x)

    return run


def plot(records, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    models = sorted({r["model"] for r in records})
    batches = sorted({r["batch_size"] for r in records})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    round_tos = list(dict.fromkeys(r.get("round_to", 1) for r in records))
    for ax, bs in zip(axes[0], batches):
        for i, name in enumerate(models):
            for j, rt in enumerate(round_tos):
                rs = sorted((r for r in records if r["model"] == name and r["batch_size"] == bs
                             and r.get("round_to", 1) == rt), key=lambda r: r["ratio"])
                if not rs:
                    continue
                color = f"C{(i * len(round_tos) + j) % 10}"
                label = name if len(round_tos) == 1 else f"{name} round_to={rt}"
                ratios = [0.0] + [r["ratio"] for r in rs]
                ax.plot(ratios, [1.0] + [r["speedup"] for r in rs], "o-", color=color, label=f"{label} measured")
                ax.plot(ratios, [1.0] + [r["flops_speedup"] for r in rs], "--", color=color, alpha=0.6,
                        label=f"{label} FLOPs")
        ax.set_title(f"batch {bs}, {records[0]['device']}, {records[0]['dtype']}, {records[0]['form']} form")
        ax.set_xlabel("prune ratio (share of channels removed)")
        ax.set_ylabel("speed-up over dense")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated slimcore.models or torchvision names")
    parser.add_argument("--from-run", default=None, metavar="RUN",
                        help="benchmark a run's sparsity-trained model (its own gammas) instead of --models")
    parser.add_argument("--ratios", default="0.3,0.5,0.7")
    parser.add_argument("--batch-sizes", default="auto",
                        help="comma-separated; auto = 32 for 28/32-pixel models, 4 for 224-pixel ones")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--form", choices=FORMS, default="deploy",
                        help="how dense and slimmed models are run (the same for both; see above)")
    parser.add_argument("--channels-last", action="store_true",
                        help="NHWC memory format (deploy forms: instead of picking it by measurement)")
    parser.add_argument("--compile", action="store_true", help="--form as-pruned: torch.compile every variant")
    parser.add_argument("--no-fuse-adds", action="store_true",
                        help="deploy forms: keep residual adds as their own ops (slimcore.deploy(fuse_adds=False))")
    parser.add_argument("--fold-bn", action="store_true",
                        help="--form as-pruned: fold BatchNorm into the preceding conv/linear")
    parser.add_argument("--round-to", default="1",
                        help="keep channel counts multiples of this, or 'auto' (measured widths, slimcore.pruning.widths); "
                             "comma-separated: one slimmed variant per value, all timed in the same rounds")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--round-seconds", type=float, default=0.15, help="time per variant per round")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/latency-<device>.json)")
    parser.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    args = parser.parse_args(argv)
    if args.form != "as-pruned" and (args.fold_bn or args.compile):
        parser.error(f"--fold-bn and --compile modify --form as-pruned; --form {args.form} "
                     "already folds BN (use --form compile for torch.compile)")
    if args.form == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as exc:
            parser.error(f"--form onnxruntime needs onnx, onnxscript and onnxruntime ({exc}): "
                         "pip install onnx onnxscript onnxruntime")
        if args.device != "cpu":
            parser.error("--form onnxruntime runs ONNX Runtime's CPU provider: use --device cpu")

    device = torch.device(selected_devices(args.device, "latency.py")[0])
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    dtype = DTYPES[args.dtype]
    ratios = [float(r) for r in args.ratios.split(",")]
    auto_batch = args.batch_sizes == "auto"
    batch_sizes = None if auto_batch else [int(b) for b in args.batch_sizes.split(",")]
    warn_if_reference()
    warnings.filterwarnings("ignore", category=UserWarning)
    env = environment(device)
    round_tos = [r if r == "auto" else int(r) for r in args.round_to.split(",")]
    options = dict(form=args.form, channels_last=args.channels_last, compile=args.compile, fold_bn=args.fold_bn,
                   fuse_adds=args.form != "as-pruned" and not args.no_fuse_adds)
    print(f"{env['device']} ({device.type}), torch {env['torch']}, threads {env['threads']}, {args.dtype}, "
          f"options {options}; latency: median ms per forward (IQR)")
    print(f"{'model':<14} {'ratio':>5} {'round':>5} {'batch':>5} {'params':>17} {'MFLOPs':>15}  {'dense ms':>15} {'slim ms':>15} "
          f"{'speed-up':>8} {'FLOPs x':>7} {'realised':>8}  form (memory format dense/slim)")
    records = []
    start = time.perf_counter()
    sources = [from_run(args.from_run)] if args.from_run else [(n, *build(n)) for n in args.models.split(",")]
    for name, dense, shape in sources:
        example = torch.randn(1, *shape)
        flops_dense, params_dense = slimcore.profile(dense, example)
        for bs in ([32 if shape[-1] <= 32 else 4] if auto_batch else batch_sizes):
            slims = {}  # (ratio, round_to) -> (model, flops, params, widened layers)
            checks = {}  # (ratio, round_to) -> prune's whole-model check of the auto widths (None: none made)
            # round_to="auto" times layers at this batch, dtype, memory format and device: one table per
            # batch size, so the ratios share its timings (prune ignores it for other round_to values).
            table = LatencyTable(device, dtype=dtype, batch=bs, channels_last=args.channels_last) \
                if "auto" in round_tos else None
            hook = None
            if args.form != "as-pruned":
                hook = deploying(example, "channels_last" if args.channels_last else "contiguous")
            elif args.fold_bn:
                hook = folding(example)
            for ratio in ratios:
                for round_to in round_tos:
                    slim = copy.deepcopy(dense)
                    report = slimcore.prune(slim, example, ratio=ratio, round_to=round_to, latency_table=table,
                                            deploy=hook)
                    widened = sum(w["chosen"] != w["asked"] for w in report.widths)
                    checks[ratio, round_to] = report.latency_check
                    slims[ratio, round_to] = (slim, *slimcore.profile(slim, example), widened)
            x = torch.randn(bs, *shape, device=device, dtype=dtype)
            if args.form == "as-pruned" and args.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            # deploy forms: the model is given NCHW input, as a user would; deploy picks its memory format
            # on the timed batch itself.
            variants, formats = {}, {}
            variants["dense"], formats["dense"] = prepare(copy.deepcopy(dense), x, args, device, dtype)
            for key, (slim, *_) in slims.items():
                variants[key], formats[key] = prepare(copy.deepcopy(slim), x, args, device, dtype)
            times = interleaved(variants, device, args.repeats, args.round_seconds, warmup_calls=3, min_calls=1)
            dense_ms, dense_iqr = (t / 1e3 for t in times["dense"])
            for (ratio, round_to), (slim, flops_slim, params_slim, widened) in slims.items():
                slim_ms, slim_iqr = (t / 1e3 for t in times[ratio, round_to])
                speedup = dense_ms / slim_ms
                flops_speedup = flops_dense / flops_slim
                rec = dict(
                    model=name, ratio=ratio, batch_size=bs, device=env["device"], device_type=device.type,
                    dtype=args.dtype, threads=env["threads"], params_dense=params_dense, params_slim=params_slim,
                    flops_dense=flops_dense, flops_slim=flops_slim, latency_dense_ms=dense_ms,
                    latency_slim_ms=slim_ms, latency_dense_iqr_ms=dense_iqr, latency_slim_iqr_ms=slim_iqr,
                    speedup=speedup, flops_speedup=flops_speedup, realised_fraction=speedup / flops_speedup,
                    slower_than_dense=slim_ms > dense_ms, **options, round_to=round_to,
                    auto_widened_layers=widened if round_to == "auto" else None,
                    auto_latency_check=checks[ratio, round_to],
                    memory_format_dense=formats["dense"], memory_format_slim=formats[ratio, round_to],
                )
                records.append(rec)
                flag = "  SLOWER THAN DENSE" if rec["slower_than_dense"] else ""
                print(f"{name:<14} {ratio:>5.2f} {str(round_to):>5} {bs:>5} {params_dense / 1e6:>7.2f}M->"
                      f"{params_slim / 1e6:>6.2f}M {flops_dense / 1e6:>7.0f}->{flops_slim / 1e6:>6.0f}  "
                      f"{dense_ms:>8.2f} ({dense_iqr:>4.2f}) {slim_ms:>8.2f} ({slim_iqr:>4.2f}) {speedup:>7.2f}x "
                      f"{flops_speedup:>6.2f}x {rec['realised_fraction']:>8.2f}  {args.form} "
                      f"({formats['dense']}/{formats[ratio, round_to]}){flag}", flush=True)
    out = args.out or os.path.join(RESULTS, f"latency-{device.type}.json")
    write_json(out, dict(benchmark="latency", **env, dtype=args.dtype, options=options, repeats=args.repeats,
                         seconds=time.perf_counter() - start, records=records))
    print(f"wrote {out} ({time.perf_counter() - start:.0f} s)")
    png = plot(records, args.plot or os.path.splitext(out)[0] + ".png")
    if png:
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
