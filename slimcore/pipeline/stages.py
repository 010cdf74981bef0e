"""The pipeline's stages on a run directory (see slimcore/pipeline/cli.py for its layout): sparsity
training, pruning at a ratio or to a FLOPs / channel / latency target, fine-tuning. The CLI parses
arguments and calls these; each returns what it wrote.
"""

import json
import os

import torch

from .. import models
from .._io import atomic_write_text
from ..inference.deploy import deploy_fn
from ..pruning.checkpoint import save_pruned
from ..pruning.profile import profile
from ..pruning.prune import prune
from ..pruning.latency_select import prune_for_latency
from ..pruning.search import ratio_for_channels, ratio_for_flops, ratio_for_latency
from ..pruning.widths import LatencyTable
from . import data as data_mod
from .train import (FILTER_HISTORY, Settings, distributed, evaluate, example_input, file_size, fit, load_model,
                    model_meta, resolve_device)


class CLIError(RuntimeError):
    pass


def ratio_name(r):
    return f"{r:g}"


def read_config(run):
    path = os.path.join(run, "config.json")
    if not os.path.exists(path):
        raise CLIError(f"{run} is not a slimcore run directory (no config.json): create it with `slimcore train`")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CLIError(f"{path} is not valid JSON (truncated or edited by hand? {exc}); restore it or "
                       "start the run again") from None
    if not isinstance(config, dict) or not {"model", "model_kwargs", "dataset"} <= config.keys():
        raise CLIError(f"{path} is not a slimcore run config (it needs model, model_kwargs and dataset)")
    return config


def write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2))


def loaders(config, settings, device, rank=0, world=1, batch_size=None):
    from torch.utils.data import DistributedSampler

    train, val, test, spec = data_mod.datasets(config["dataset"], config.get("data_dir"), config.get("val_split", 0.0),
                                               seed=settings.seed, augment=config.get("augment", "auto"))
    bs = batch_size or settings.batch_size
    if bs % world:
        raise CLIError(f"batch size {bs} must be divisible by the {world} processes")
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=settings.seed)
    train_loader = data_mod.Loader(train, spec, bs // world, train=True, sampler=sampler, seed=settings.seed,
                                   device=device)
    eval_bs = max(bs, 256)
    val_loader = data_mod.Loader(val, spec, eval_bs, device=device) if val is not None else None
    test_loader = data_mod.Loader(test, spec, eval_bs, device=device)
    return train_loader, val_loader, test_loader, spec


def train_stage(config, settings, stage_dir, init_model=None, resume=False, stage="train", crash_after_epoch=None):
    rank, world = distributed()
    device = resolve_device(settings.extra.get("device", "auto"))
    torch.manual_seed(settings.seed)
    train_loader, val_loader, test_loader, spec = loaders(config, settings, device, rank, world)
    meta = model_meta(config["model"], config["model_kwargs"], config["dataset"], config["input_shape"])
    model = init_model if init_model is not None else models.build(config["model"], **config["model_kwargs"])
    return fit(model, train_loader, val_loader, test_loader, settings, stage_dir, meta, device, resume=resume,
               stage=stage, crash_after_epoch=crash_after_epoch)


def filter_history(model, source_dir):
    from .._io import safe_load
    from ..pruning.criteria import FilterHistory

    path = os.path.join(source_dir, FILTER_HISTORY)
    if not os.path.exists(path):
        raise CLIError(f"criterion hbfp needs the filter history of the stage's training ({path}), which "
                       "`slimcore train` and `finetune` write; this stage has none (trained by an older slimcore?)")
    history = FilterHistory(model)
    history.load_state_dict(safe_load(path))
    return history


def prune_stage(run, source_dir, ratio, criterion="bn_scale", scope="global", round_to=1, min_channels=1,
                device="auto", out_dir=None, compensate=True, max_layer_ratio=1.0, latency_batch=64,
                flops=None, channels=None, latency=None, selection="threshold", importance=None):
    """Prunes source_dir/model.pt at one ratio (or, with ``flops``, at the ratio that keeps that
    fraction of the FLOPs; with ``channels``, at the ratio that removes that share of the scored
    channels; with ``latency``, at the ratio whose BN-folded model runs in that fraction of the
    dense one's measured time) into out_dir (default run/prune-<ratio>, or
    run/prune-<criterion>-{flops,channels,latency}<f>); returns its report. With ``latency`` and
    ``selection="latency"``, slimcore.prune_for_latency chooses the channels instead of the
    threshold (stage prune-<criterion>-latency<f>-aware with the default importance "log_share",
    -aware-sum with "sum"; its "ratio" is the share of channels removed). Under torchrun, rank 0
    prunes and the others read its report."""
    rank, world = distributed()
    if flops is not None:
        default_name = f"prune-{criterion}-flops{flops:g}"
    elif channels is not None:
        default_name = f"prune-{criterion}-channels{channels:g}"
    elif latency is not None:
        default_name = f"prune-{criterion}-latency{latency:g}" + ("-aware" if selection == "latency" else "") \
            + (f"-{importance}" if selection == "latency" and importance not in (None, "log_share") else "")
    else:
        default_name = f"prune-{ratio_name(ratio)}"
    out_dir = out_dir or os.path.join(run, default_name)
    if rank != 0:
        torch.distributed.barrier()
        with open(os.path.join(out_dir, "report.json")) as f:
            return json.load(f)
    config = read_config(run)
    source = os.path.join(source_dir, "model.pt")
    if not os.path.exists(source):
        raise CLIError(f"no trained model at {source}: run `slimcore train` (or the stage) first")
    dev = resolve_device(device)
    model, meta = load_model(source)
    model.to(dev)
    s = Settings(seed=0)
    _, _, test_loader, _ = loaders(config, s, dev, batch_size=256)
    acc_before, _ = evaluate(model, test_loader, dev)
    x = example_input(meta, dev)
    flops_before, params_before = profile(model, x)
    table = LatencyTable(dev, batch=latency_batch) if round_to == "auto" else None
    options = dict(criterion=criterion, scope=scope, round_to=round_to, min_channels=min_channels,
                   compensate=compensate, max_layer_ratio=max_layer_ratio, latency_table=table,
                   history=filter_history(model, source_dir) if criterion == "hbfp" else None)
    model.eval()
    aware = latency is not None and selection == "latency"
    try:
        if aware:  # prunes in place, at the selection that meets the measured budget
            search = {k: v for k, v in options.items() if k != "latency_table"}
            report = prune_for_latency(model, x, latency, importance=importance,
                                       latency_table=table or LatencyTable(dev, batch=latency_batch),
                                       deploy=deploy_fn(x, memory_format="contiguous"), **search)
            ratio = report.channels_removed_share  # no threshold ratio: the share it removed, where plots read one
        elif flops is not None:
            ratio = ratio_for_flops(model, x, flops, **options)
        elif channels is not None:
            ratio = ratio_for_channels(model, x, channels, **options)
        elif latency is not None:
            search = {k: v for k, v in options.items() if k != "latency_table"}
            ratio = ratio_for_latency(model, x, latency, latency_table=table or LatencyTable(dev, batch=latency_batch),
                                      deploy=deploy_fn(x, memory_format="contiguous"), **search)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    # At a searched ratio the whole-model latency check (round_to="auto") stays off, as in the
    # search: a uniform round_to it might choose would put channels back and miss the target.
    searched = flops is not None or channels is not None or latency is not None
    if not aware:
        report = prune(model, x, ratio=ratio, check_latency=not searched, **options)
    acc_after, _ = evaluate(model, test_loader, dev)
    os.makedirs(out_dir, exist_ok=True)
    save_pruned(model, os.path.join(out_dir, "model.pt"), meta=meta | {"pruned_from": source, "ratio": ratio})
    result = {"ratio": ratio, "flops_target": flops, "channels_target": channels, "latency_target": latency,
              "criterion": criterion, "scope": scope, "round_to": round_to,
              "source": source,
              "acc_before": acc_before, "acc_after": acc_after, "params_before": params_before,
              "params_after": report.params_after, "flops_before": flops_before, "flops_after": report.flops_after,
              "size_before": file_size(source), "size_after": file_size(os.path.join(out_dir, "model.pt")),
              "channels_removed": report.channels_removed,
              "channels_removed_share": report.channels_removed_share, "threshold": report.threshold,
              "channels": {k: list(v) for k, v in report.channels.items()}, "notes": report.notes,
              "seconds": report.seconds, "compensate": compensate, "compensated_layers": len(report.compensated),
              "compensation_max_error": report.compensation_max_error, "max_layer_ratio": max_layer_ratio,
              "collapsed": report.collapsed, "widths": report.widths, "latency_check": report.latency_check,
              "selection": report.selection if latency is not None else None, "latency": report.latency}
    write_json(os.path.join(out_dir, "report.json"), result)
    if world > 1:
        torch.distributed.barrier()
    return result


def finetune_stage(run, prune_dir, out_dir, settings, resume=False, crash_after_epoch=None):
    config = read_config(run)
    source = os.path.join(prune_dir, "model.pt")
    if not os.path.exists(source):
        raise CLIError(f"no pruned model at {source}: run `slimcore prune` first")
    model, _ = load_model(source)
    return train_stage(config, settings, out_dir, init_model=model, resume=resume, stage="finetune",
                       crash_after_epoch=crash_after_epoch)
