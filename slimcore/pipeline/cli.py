"""``slimcore`` command line: train -> prune -> fine-tune, on a run directory.

    slimcore train    --model vgg19 --dataset fashion-mnist --lam 1e-4 --epochs 160 --out RUN
    slimcore prune    --run RUN --ratio 0.5,0.7            (from RUN/train; writes RUN/prune-<r>)
    slimcore finetune --run RUN --ratio 0.5                (from RUN/prune-0.5; writes RUN/finetune-0.5)
    slimcore run      --model vgg19 ... --ratio 0.5 --passes 3 --out RUN   (the whole pipeline)
    slimcore report   --run RUN                            (RUN/report.md and PNG figures)
    slimcore report   --sweep RUN_A RUN_B RUN_C --out DIR  (compare runs, e.g. three lambdas)
    slimcore yolo     --model yolov8n.yaml --data data.yaml --lam 1e-3 --ratio 0.5 --epochs E --out DIR
                      (an ultralytics YOLO through ultralytics' own trainer: train, prune, fine-tune,
                      report; --data synthetic writes a synthetic set into DIR/data)

A run directory:

    config.json                 model, data and training settings (written by train / run)
    train/                      sparsity training: checkpoint.pt, metrics.jsonl, model.pt
    prune-<ratio>/              model.pt (pruned) and report.json (accuracy, params, FLOPs, size)
    finetune-<ratio>/           checkpoint.pt, metrics.jsonl, model.pt
    pass<k>/...                 the same per pass, with --passes > 1 (pass k+1 starts from pass k's
                                fine-tuned model and trains it with sparsity again)
    report.md, *.png            slimcore report

Distributed: ``torchrun --nproc_per_node=N -m slimcore train ...`` (gloo on CPU, NCCL on GPU).
"""

import argparse
import math
import os
import sys
import time


from .. import models
from .._io import CheckpointError
from ..pruning.criteria import CRITERIA
from ..pruning.latency_select import IMPORTANCES, SELECTIONS
from ..pruning.options import SCOPES
from ..sparsity.penalties import NAMES as PENALTY_NAMES
from . import data as data_mod
from .stages import CLIError, finetune_stage, prune_stage, ratio_name, read_config, train_stage, write_json
from .train import Settings, distributed, load_model


# ---------------------------------------------------------------------------------------- arguments


def _add_training_args(p, finetune=False):
    p.add_argument("--epochs", type=_positive_int, default=None if finetune else 160)
    p.add_argument("--batch-size", type=_positive_int, default=None if finetune else 64)
    p.add_argument("--lr", type=_positive_float, default=None if finetune else 0.1)
    p.add_argument("--momentum", type=_unit_float, default=None if finetune else 0.9, help="SGD momentum, in [0, 1)")
    p.add_argument("--weight-decay", type=_nonnegative_float, default=None if finetune else 1e-4)
    p.add_argument("--accumulate", type=_positive_int, default=None if finetune else 1,
                   help="micro-batches per step (the batch is split; same global batch)")
    p.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 + GradScaler on CUDA)")
    p.add_argument("--channels-last", action="store_true",
                   help="train conv layers in NHWC (CPU: ~1.3x faster for VGG-11; models are saved NCHW)")
    p.add_argument("--seed", type=int, default=None if finetune else 0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--resume", action="store_true", help="continue the stage from its checkpoint.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def _add_model_args(p):
    p.add_argument("--model", required=True, choices=models.NAMES)
    p.add_argument("--dataset", default="fashion-mnist", choices=data_mod.DATASETS)
    p.add_argument("--data-dir", default=None, help="where the data set's files are (never downloaded)")
    p.add_argument("--val-split", type=_unit_float, default=0.0, help="hold out this share of the training set")
    p.add_argument("--width", type=_positive_float, default=1.0, help="channel width multiplier")
    p.add_argument("--augment", default="auto", choices=data_mod.AUGMENTATIONS,
                   help="training augmentation (auto: the data set's default; crop pads 2 on 28x28 images)")
    p.add_argument("--penalty", default="l1", choices=PENALTY_NAMES)
    p.add_argument("--lam", type=_nonnegative_float, default=1e-4, help="sparsity strength (0: plain training)")
    p.add_argument("--p", type=_finite_float, default=0.5, help="exponent of lp / lpnorm, in (0, 1)")
    p.add_argument("--a", type=_finite_float, default=None,
                   help="tl1 a > 0 (default 1); scad a > 2 (default 3.7); mcp gamma > 1 (default 3)")
    p.add_argument("--theta", type=_positive_float, default=None,
                   help="scad / mcp: strength/shape form, slope --lam at 0 and flat beyond a*theta "
                        "(default: native form, --lam is their lambda and knee)")
    p.add_argument("--mode", default="subgradient", choices=("subgradient", "proximal"))
    p.add_argument("--bn", default="stock", choices=("stock", "fused"),
                   help="stock: nn.BatchNorm + sparse_bn_step; fused: slimcore.convert_bn kernels")


def _add_prune_args(p):
    p.add_argument("--ratio", default=None, help="one or more comma-separated prune ratios (default 0.5)")
    p.add_argument("--criterion", default="bn_scale", choices=CRITERIA)
    p.add_argument("--scope", default="global", choices=SCOPES)
    p.add_argument("--round-to", type=_round_to, default=1,
                   help="keep channel counts multiples of N, or 'auto': snap up to measured faster widths")
    p.add_argument("--latency-batch", type=_positive_int, default=64, help="batch size --round-to auto times layers at")
    p.add_argument("--min-channels", type=_positive_int, default=1)
    p.add_argument("--max-layer-ratio", type=_max_layer_ratio, default=1.0, help="no layer loses more than this share")
    p.add_argument("--no-compensate", dest="compensate", action="store_false",
                   help="drop removed channels' constant outputs instead of folding them into the next biases")


def _int_at_least(text, low, expected):
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def _positive_int(text, expected="an integer >= 1"):
    return _int_at_least(text, 1, expected)


def _round_to(text):
    return text if text == "auto" else _positive_int(text, "an integer >= 1 or 'auto'")


def _float_in(text, expected, ok):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def _finite_float(text):
    return _float_in(text, "a finite number", lambda v: True)


def _positive_float(text):
    return _float_in(text, "a finite number > 0", lambda v: v > 0)


def _nonnegative_float(text):
    return _float_in(text, "a finite number >= 0", lambda v: v >= 0)


def _unit_float(text):
    return _float_in(text, "a number in [0, 1)", lambda v: 0 <= v < 1)


def _max_layer_ratio(text):
    return _float_in(text, "a number in (0, 1]", lambda v: 0 < v <= 1)


def _prune_ratio(text):
    return _float_in(text, "a number in [0, 1)", lambda v: 0 <= v < 1)


def _nonnegative_int(text):
    return _int_at_least(text, 0, "an integer >= 0")


def _imgsz(text):
    return _int_at_least(text, 32, "an integer >= 32 (the largest YOLO stride)")


class _Parser(argparse.ArgumentParser):
    """argparse with one error line, ``slimcore <cmd>: error: ...`` (no usage block), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Flags whose value may be negative: argparse takes "-1e-4" for an option (it only recognises
# "-1" and "-0.5" as negative numbers), so main() joins such a pair into "--flag=-1e-4" and the
# flag's own check then names the accepted range.
def _join_negative_values(argv):
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--") and "=" not in tok and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            try:
                float(argv[i + 1])
            except ValueError:
                pass
            else:
                out.append(f"{tok}={argv[i + 1]}")
                i += 2
                continue
        out.append(tok)
        i += 1
    return out


def parser():
    top = _Parser(prog="slimcore", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="sparsity training")
    _add_model_args(p)
    _add_training_args(p)
    p.add_argument("--out", required=True, help="run directory")
    p = sub.add_parser("prune", help="prune a trained (or fine-tuned) model")
    p.add_argument("--run", required=True)
    p.add_argument("--source", default="train", help="stage to prune, relative to the run (default: train)")
    _add_prune_args(p)
    p.add_argument("--flops", default=None,
                   help="instead of --ratio: keep at most this fraction of the FLOPs (comma-separated: several); "
                        "the ratio is found per criterion by dry runs. Stages: prune-<criterion>-flops<f>")
    p.add_argument("--channels", default=None,
                   help="instead of --ratio: remove at least this share of the scored channels (comma-separated: "
                        "several); with --max-layer-ratio, --min-channels or --round-to putting channels back the "
                        "ratio that does is larger, found by dry runs. Stages: prune-<criterion>-channels<s>")
    p.add_argument("--latency", default=None,
                   help="instead of --ratio: run in at most this fraction of the dense model's latency, measured "
                        "on --device at --latency-batch in slimcore.deploy's form (comma-separated: several); "
                        "found by timing pruned copies. Stages: prune-<criterion>-latency<f>")
    p.add_argument("--selection", default="threshold", choices=SELECTIONS,
                   help="with --latency: which channels go. threshold: the global threshold at the ratio that "
                        "meets the budget; latency: by importance per unit of measured per-layer latency "
                        "(slimcore.prune_for_latency). Stages: prune-<criterion>-latency<f>-aware")
    p.add_argument("--importance", default=None, choices=IMPORTANCES,
                   help="with --selection latency: what the selection keeps per unit of time. log_share "
                        "(default): the sum over layers of the log of each layer's kept share of its score (no "
                        "layer starved); sum: the kept channels' scores. Stages: prune-<criterion>-latency<f>-aware, "
                        "-aware-sum with sum")
    p.add_argument("--name", default=None,
                   help="stage directory name (default prune-<ratio>, which `finetune --ratio` reads, or "
                        "prune-<criterion>-flops<f>, -channels<s> or -latency<f>; one ratio only). `finetune --stage NAME` fine-tunes it")
    p.add_argument("--device", default="auto")
    p = sub.add_parser("finetune", help="fine-tune a pruned model (no penalty)")
    p.add_argument("--run", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--ratio", help="which prune-<ratio> to fine-tune (comma-separated: several)")
    group.add_argument("--stage", help="which prune stage(s) to fine-tune by directory name, e.g. prune-l1_filter-flops0.5 "
                                       "(comma-separated); writes finetune-<name without 'prune-'>")
    _add_training_args(p, finetune=True)
    p = sub.add_parser("run", help="train -> prune -> fine-tune, optionally repeated (--passes)")
    _add_model_args(p)
    _add_training_args(p)
    _add_prune_args(p)
    p.add_argument("--passes", type=_positive_int, default=1)
    p.add_argument("--finetune-epochs", type=_positive_int, default=None, help="default: --epochs")
    p.add_argument("--out", required=True)
    p = sub.add_parser("report", help="markdown summary and figures of a run (or a sweep of runs)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--run")
    group.add_argument("--sweep", nargs="+", metavar="RUN", help="compare several runs (e.g. lambdas)")
    p.add_argument("--out", default=None, help="output directory (default: the run, or required with --sweep)")
    p = sub.add_parser("yolo", help="network slimming of an ultralytics YOLO through ultralytics' trainer")
    p.add_argument("--model", required=True, help="a model yaml (yolov8n.yaml, yolo11n.yaml) or a .pt checkpoint")
    p.add_argument("--data", required=True,
                   help="a YOLO data.yaml, or 'synthetic': coloured shapes on noise written into OUT/data")
    p.add_argument("--lam", type=_nonnegative_float, default=1e-3, help="sparsity strength")
    p.add_argument("--penalty", default="l1", choices=PENALTY_NAMES, help="penalty (at its default parameters)")
    p.add_argument("--mode", default="subgradient", choices=("subgradient", "proximal"))
    p.add_argument("--ratio", type=_prune_ratio, default=0.5, help="share of the prunable channels to remove, in [0, 1)")
    p.add_argument("--max-layer-ratio", type=_max_layer_ratio, default=1.0,
                   help="no layer loses more than this share (below 1: no error for a ratio that empties a layer)")
    p.add_argument("--epochs", type=_nonnegative_int, default=10,
                   help="sparsity-training epochs (0: --model is sparsity-trained already, e.g. OUT/trained.pt)")
    p.add_argument("--finetune-epochs", type=_positive_int, default=None, help="default: --epochs")
    p.add_argument("--imgsz", type=_imgsz, default=640)
    p.add_argument("--batch", type=_positive_int, default=16)
    p.add_argument("--optimizer", default="SGD", help="ultralytics' optimizer (SGD: the penalty is not normalised away)")
    p.add_argument("--lr0", type=_positive_float, default=0.01)
    p.add_argument("--device", default=None, help="ultralytics' device (cpu, 0, ...; default: its choice)")
    p.add_argument("--workers", type=_nonnegative_int, default=None, help="data loader workers (default: ultralytics')")
    p.add_argument("--seed", type=_nonnegative_int, default=0)
    p.add_argument("--amp", action="store_true", help="mixed precision on CUDA (ultralytics' AMP check downloads a model)")
    p.add_argument("--plots", action="store_true", help="ultralytics' plots (may download a font)")
    p.add_argument("--latency-rounds", type=_positive_int, default=7, help="interleaved timing rounds (10 forwards each)")
    p.add_argument("--latency-threads", type=_positive_int, default=None, help="CPU threads for the timing (default 1)")
    p.add_argument("--synthetic-train", type=_positive_int, default=128, help="--data synthetic: training images")
    p.add_argument("--synthetic-val", type=_positive_int, default=32, help="--data synthetic: validation images")
    p.add_argument("--out", required=True, help="output directory")
    return top


def _numbers(text, flag, what, in_range, interval):
    """Comma-separated floats, each checked by in_range (described as interval)."""
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise CLIError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    for v in values:
        if not in_range(v):
            raise CLIError(f"{what} {v} is out of range: it must be in {interval}")
    return values


def _ratios(text):
    return _numbers(text, "--ratio", "prune ratio", lambda r: 0.0 <= r < 1.0, "[0, 1)")


def _fractions(text, flag):
    return _numbers(text, flag, flag, lambda v: 0.0 < v <= 1.0, "(0, 1]")


def _may_be_prune_stage(name):
    """A plain directory name inside the run that is not the training or a fine-tuning stage."""
    return not (os.sep in name or name.startswith(".") or name == "train" or name.startswith("finetune-"))


# ---------------------------------------------------------------------------------------- run dirs


def _out_dir(path, flag="--out"):
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{flag} {path} is an existing file; give a directory (new or a run directory)")
    return path


def settings_from_args(args, lam=None, **overrides):
    s = Settings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                 weight_decay=args.weight_decay, accumulate=args.accumulate, amp=args.amp, seed=args.seed,
                 channels_last=args.channels_last, quiet=args.quiet)
    if hasattr(args, "penalty"):
        s.penalty, s.p, s.a, s.theta, s.mode, s.bn = args.penalty, args.p, args.a, args.theta, args.mode, args.bn
        if s.theta is not None and s.penalty not in ("scad", "mcp"):
            raise CLIError(f"--theta is a scad / mcp parameter, not one of {s.penalty}")
        s.lam = args.lam if lam is None else lam
        _check_penalty_args(s)
        if s.bn == "fused" and s.mode != "subgradient":
            raise CLIError("--bn fused adds the penalty's subgradient inside the BatchNorm backward; "
                           "--mode proximal needs --bn stock")
    for k, v in overrides.items():
        if v is not None:
            setattr(s, k, v)
    if s.batch_size % s.accumulate:
        raise CLIError(f"--batch-size {s.batch_size} must be a multiple of --accumulate {s.accumulate}")
    return s


# What --a means per penalty and the range it needs (checked here, never replaced silently).
_A_RANGE = {"tl1": ("TL1's a", lambda a: a > 0, "> 0"), "scad": ("SCAD's a", lambda a: a > 2, "> 2"),
            "mcp": ("MCP's gamma", lambda a: a > 1, "> 1")}


def _check_penalty_args(s):
    if s.a is not None:
        if s.penalty not in _A_RANGE:
            raise CLIError(f"--a is a parameter of tl1, scad and mcp, not of {s.penalty}")
        what, ok, bound = _A_RANGE[s.penalty]
        if not ok(s.a):
            raise CLIError(f"--a ({what}) must be {bound} for --penalty {s.penalty}, got {s.a:g}")
    if s.penalty in ("lp", "lpnorm") and not 0 < s.p < 1:
        raise CLIError(f"--p must be in (0, 1) for --penalty {s.penalty}, got {s.p:g}")


def _config_from_args(args, spec):
    kwargs = {"num_classes": spec.num_classes, "in_channels": spec.in_channels, "width": args.width}
    if args.model in ("lenet5", "mlp"):
        kwargs["input_size"] = spec.size
    return {"model": args.model, "model_kwargs": kwargs, "dataset": args.dataset, "data_dir": args.data_dir,
            "val_split": args.val_split, "augment": args.augment, "input_shape": [spec.in_channels, spec.size, spec.size],
            "train": vars(args) | {"command": args.command}, "created": time.strftime("%Y-%m-%d %H:%M:%S")}


# ---------------------------------------------------------------------------------------- commands


def cmd_train(args, crash_after_epoch=None):
    rank, _ = distributed()
    _out_dir(args.out)
    s = settings_from_args(args, extra={"device": args.device})
    spec = data_mod.datasets(args.dataset, args.data_dir, 0.0)[3]
    config = _config_from_args(args, spec)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        if args.resume and os.path.exists(os.path.join(args.out, "config.json")):
            config = read_config(args.out) | {"resumed": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_json(os.path.join(args.out, "config.json"), config)
    return train_stage(config, s, os.path.join(args.out, "train"), resume=args.resume,
                       crash_after_epoch=crash_after_epoch)


def _print_prune_table(results):
    print(f"{'ratio':>5} {'removed':>7} {'acc before':>10} {'acc after':>10} {'params':>22} {'MFLOPs':>17} {'size MB':>15}")
    for r in results:
        print(f"{r['ratio']:>5g} {100 * r['channels_removed_share']:>6.1f}% {r['acc_before']:>10.4f} {r['acc_after']:>10.4f} "
              f"{r['params_before']:>10,} -> {r['params_after']:>9,} "
              f"{r['flops_before'] / 1e6:>7.1f} -> {r['flops_after'] / 1e6:>7.1f} "
              f"{r['size_before'] / 1e6:>6.2f} -> {r['size_after'] / 1e6:>5.2f}")


def cmd_prune(args):
    run = args.run
    read_config(run)
    given = [flag for flag, v in (("--ratio", args.ratio), ("--flops", args.flops), ("--channels", args.channels),
                                  ("--latency", args.latency)) if v is not None]
    if len(given) > 1:
        raise CLIError(f"give one of --ratio, --flops, --channels and --latency, not {' and '.join(given)}")
    if args.selection != "threshold" and args.latency is None:
        raise CLIError(f"--selection {args.selection} chooses channels for a latency budget: give --latency with it")
    if args.importance is not None and args.selection != "latency":
        raise CLIError(f"--importance {args.importance} is for --selection latency")
    searches = {"flops": None, "channels": None, "latency": None}
    for key in searches:
        if getattr(args, key) is not None:
            searches[key] = _fractions(getattr(args, key), f"--{key}")
            ratios = [None] * len(searches[key])
    if not given or given == ["--ratio"]:
        ratios = _ratios(args.ratio if args.ratio is not None else "0.5")
    for key in searches:
        searches[key] = searches[key] or [None] * len(ratios)
    if args.name and len(ratios) > 1:
        raise CLIError("--name names one stage: give one --ratio (or --flops, --channels, --latency) with it")
    if args.name and (os.path.normpath(args.name) == os.path.normpath(args.source)
                      or not _may_be_prune_stage(args.name)):
        raise CLIError(f"--name {args.name!r} would overwrite another stage: choose a new directory name")
    results = [prune_stage(run, os.path.join(run, args.source), r, args.criterion, args.scope, args.round_to,
                           args.min_channels, args.device, os.path.join(run, args.name) if args.name else None,
                           args.compensate, args.max_layer_ratio, args.latency_batch, flops=f, channels=c, latency=t,
                           selection=args.selection, importance=args.importance)
               for r, f, c, t in zip(ratios, searches["flops"], searches["channels"], searches["latency"])]
    _print_prune_table(results)
    return results


def _finetune_settings(args, config):
    trained = config.get("train")
    if not isinstance(trained, dict):
        raise CLIError(f"{args.run}/config.json has no training settings (\"train\"); was it written by slimcore train?")

    def pick(name, key, default=None):
        value = getattr(args, name)
        return value if value is not None else trained.get(key, default)

    s = Settings(
        epochs=pick("epochs", "epochs"), batch_size=pick("batch_size", "batch_size"), lr=pick("lr", "lr"),
        momentum=pick("momentum", "momentum"), weight_decay=pick("weight_decay", "weight_decay"),
        accumulate=pick("accumulate", "accumulate", 1), amp=args.amp, channels_last=args.channels_last, lam=0.0,
        seed=pick("seed", "seed", 0), quiet=args.quiet, extra={"device": args.device})
    if s.batch_size % s.accumulate:
        raise CLIError(f"--batch-size {s.batch_size} must be a multiple of --accumulate {s.accumulate}")
    return s


def cmd_finetune(args):
    config = read_config(args.run)
    s = _finetune_settings(args, config)
    if args.stage is not None:
        names = [n.strip() for n in args.stage.split(",") if n.strip()]
        for n in names:
            if not _may_be_prune_stage(n):
                raise CLIError(f"--stage {n!r} is not a prune stage of the run")
    else:
        names = [f"prune-{ratio_name(r)}" for r in _ratios(args.ratio)]
    return [finetune_stage(args.run, os.path.join(args.run, n), os.path.join(args.run, _finetune_name(n)), s,
                           resume=args.resume) for n in names]


def _finetune_name(prune_name):
    """finetune-<x> for prune-<x> (what slimcore report pairs), finetune-<name> otherwise."""
    return "finetune-" + (prune_name[len("prune-"):] if prune_name.startswith("prune-") else prune_name)


def cmd_run(args):
    rank, _ = distributed()
    ratios = _ratios(args.ratio if args.ratio is not None else "0.5")
    _out_dir(args.out)
    if args.passes > 1 and len(ratios) > 1:
        raise CLIError("multi-pass runs prune one ratio per pass: give a single --ratio")
    spec = data_mod.datasets(args.dataset, args.data_dir, 0.0)[3]
    config = _config_from_args(args, spec)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "config.json"), config)
    train_s = settings_from_args(args, extra={"device": args.device})
    tune_s = settings_from_args(args, lam=0.0, epochs=args.finetune_epochs, extra={"device": args.device})
    init = None
    summary = []
    for k in range(1, args.passes + 1):
        base = args.out if args.passes == 1 else os.path.join(args.out, f"pass{k}")
        trained = train_stage(config, train_s, os.path.join(base, "train"), init_model=init, resume=args.resume)
        for r in ratios:
            pruned = prune_stage(args.out, os.path.join(base, "train"), r, args.criterion, args.scope, args.round_to,
                                 args.min_channels, args.device, out_dir=os.path.join(base, f"prune-{ratio_name(r)}"),
                                 compensate=args.compensate, max_layer_ratio=args.max_layer_ratio,
                                 latency_batch=args.latency_batch)
            tuned = finetune_stage(args.out, os.path.join(base, f"prune-{ratio_name(r)}"),
                                   os.path.join(base, f"finetune-{ratio_name(r)}"), tune_s, resume=args.resume)
            summary.append({"pass": k, "ratio": r, "trained_acc": trained["test_acc"], **pruned,
                            "finetuned_acc": tuned["test_acc"]})
        if rank == 0:
            _print_prune_table([s for s in summary if s["pass"] == k])
        init = load_model(os.path.join(base, f"finetune-{ratio_name(ratios[0])}", "model.pt"))[0]
    if rank == 0:
        write_json(os.path.join(args.out, "summary.json"), summary)
    return summary


def cmd_report(args):
    from .plots import report_run, report_sweep

    if args.out:
        _out_dir(args.out)
    if args.run:
        read_config(args.run)
        path = report_run(args.run, args.out or args.run)
    else:
        if not args.out:
            raise CLIError("report --sweep needs --out DIR")
        for r in args.sweep:
            read_config(r)
        path = report_sweep(args.sweep, args.out)
    print(f"wrote {path}")
    return path


def cmd_yolo(args):
    try:
        from ..integrations import ultralytics as yolo
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    try:
        import ultralytics  # noqa: F401
    except ImportError:
        raise CLIError("slimcore yolo needs ultralytics: pip install 'slimcore[yolo]'") from None
    _out_dir(args.out)
    data = args.data
    try:
        if data == "synthetic":
            data = yolo.make_synthetic_detection(os.path.join(args.out, "data"), n_train=args.synthetic_train,
                                                 n_val=args.synthetic_val, imgsz=args.imgsz, seed=args.seed)
        else:
            yolo.check_data_yaml(data)
        command = "slimcore " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["yolo"] else None
        result = yolo.run_recipe(args.model, data, args.out, lam=args.lam, ratio=args.ratio, epochs=args.epochs,
                                 finetune_epochs=args.finetune_epochs, imgsz=args.imgsz, batch=args.batch,
                                 penalty=args.penalty, mode=args.mode, optimizer=args.optimizer, lr0=args.lr0,
                                 device=args.device, seed=args.seed, workers=args.workers, amp=args.amp,
                                 plots=args.plots, latency_rounds=args.latency_rounds,
                                 latency_threads=args.latency_threads, command=command,
                                 prune_kwargs={"max_layer_ratio": args.max_layer_ratio})
    except yolo.InputError as exc:  # the user's model, data or ratio (CheckpointError is caught in main)
        raise CLIError(str(exc)) from None
    print(yolo.recipe_markdown(result))
    print(f"wrote {os.path.join(args.out, 'report.md')}")
    return result


COMMANDS = {"train": cmd_train, "prune": cmd_prune, "finetune": cmd_finetune, "run": cmd_run, "report": cmd_report,
            "yolo": cmd_yolo}


def main(argv=None):
    """Runs one command; returns the exit code: 0, or 2 for a user mistake (one ``slimcore <cmd>:
    error: ...`` line on stderr, no traceback)."""
    argv = _join_negative_values([str(a) for a in (sys.argv[1:] if argv is None else argv)])
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a bad argument (2, its one line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        COMMANDS[args.command](args)
    except (CLIError, data_mod.DataError, FileNotFoundError, CheckpointError) as exc:
        print(f"slimcore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
