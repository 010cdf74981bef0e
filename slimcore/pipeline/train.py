"""Training loops for sparsity training and fine-tuning: schedule, penalty, AMP, gradient
accumulation, DDP, per-epoch metrics and atomic, resumable checkpoints.

One stage (sparsity training, or fine-tuning after a prune) writes into its own directory:

    checkpoint.pt       after every epoch (atomic): model, optimizer, scheduler, scaler, RNG, epoch
    metrics.jsonl       one line per finished epoch
    filter_history.pt   every conv/linear filter's L1 norm per epoch (criterion "hbfp" reads it)
    model.pt            the final model (slimcore.save_pruned format, rebuildable from its metadata)

``fit(..., resume=True)`` continues from checkpoint.pt exactly: the data order and augmentation
are functions of (seed, epoch), the RNG state is restored, and metrics.jsonl is cut back to the
checkpoint's epoch. An interrupted run loses at most the epoch in progress.

The penalty (sparsity training only): with ``bn="stock"`` slimcore.SparseBNStep after backward
(subgradient: before optimizer.step, after GradScaler.unscale_; proximal: after the step, skipped
when GradScaler skipped it, with t = lr/(1 - momentum) so both modes have the same strength);
with ``bn="fused"`` the BN layers are converted with slimcore.convert_bn and the penalty rides in
their backward, scaled by 1/accumulate. Under DDP every rank applies the same penalty to the
already all-reduced gradients, so gamma stays identical across ranks. BatchNorm statistics are
per rank (SyncBatchNorm needs a GPU); the single-process equivalent of N ranks with batch b is
one process with batch N*b and ``accumulate=N``: micro-batch r takes samples r, r+N, ... of the
global batch, exactly what DistributedSampler hands to rank r.
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._io import CheckpointError, atomic_save, atomic_write_text, safe_load
from .._modules import eval_mode
from ..pruning.checkpoint import channel_config, load_pruned, save_pruned
from ..pruning.criteria import FilterHistory
from ..sparsity import penalties
from ..sparsity.step import SparseBNStep, bn_weights

CHECKPOINT_FORMAT = "slimcore.checkpoint/1"
FILTER_HISTORY = "filter_history.pt"  # a stage's per-epoch filter L1 norms (slimcore.FilterHistory state)


@dataclass
class Settings:
    """Hyper-parameters of one stage; the defaults are the network-slimming paper's."""

    epochs: int = 160
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple = (0.5, 0.75)  # lr / 10 at these fractions of the epochs
    penalty: str = "l1"
    lam: float = 0.0  # 0: no sparsity penalty (fine-tuning)
    p: float = 0.5  # Lp / LpNorm exponent
    a: Optional[float] = None  # TL1 a, SCAD a, MCP gamma; None: their defaults (1.0, 3.7, 3.0)
    theta: Optional[float] = None  # SCAD/MCP: None = native form (lam is their lambda), else strength/shape form
    mode: str = "subgradient"
    bn: str = "stock"
    accumulate: int = 1
    amp: bool = False
    channels_last: bool = False  # train 4-D layers in NHWC (faster convolutions on CPU); saved NCHW
    seed: int = 0
    quiet: bool = False
    extra: dict = field(default_factory=dict)


def make_penalty(s: Settings):
    """The slimcore.penalties object a Settings names."""
    name = s.penalty.lower()
    if name in ("lp", "lpnorm"):
        return penalties.get(name, p=s.p)
    # An out-of-range a is an error (penalties check it), never replaced by the default.
    if name == "tl1":
        return penalties.TL1(a=1.0 if s.a is None else s.a)
    if name == "scad":
        return penalties.SCAD(a=3.7 if s.a is None else s.a, theta=s.theta)
    if name == "mcp":
        return penalties.MCP(gamma=3.0 if s.a is None else s.a, theta=s.theta)
    return penalties.get(name)


# ---------------------------------------------------------------------------------------- helpers


def distributed():
    """(rank, world size); initialises the process group under torchrun."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(device):
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(device)


def gamma_stats(model):
    """(share of BN gammas with |gamma| < 1e-2, share exactly zero, all |gamma| as a list)."""
    weights = [w.detach().float().abs().flatten().cpu() for _, w in bn_weights(model)]
    if not weights:
        return 0.0, 0.0, []
    g = torch.cat(weights)
    return float((g < 1e-2).float().mean()), float((g == 0).float().mean()), g.tolist()


@torch.no_grad()
def evaluate(model, loader, device):
    """(accuracy, mean loss) over a loader."""
    if loader is None:
        return None, None
    correct, total, loss = 0, 0, 0.0
    with eval_mode(model):
        for x, y in loader:
            out = model(x.to(device))
            loss += F.cross_entropy(out, y.to(device), reduction="sum").item()
            correct += (out.argmax(1) == y.to(device)).sum().item()
            total += len(y)
    return correct / max(total, 1), loss / max(total, 1)


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _autocast(device, enabled):
    if not enabled:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


# ---------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path, model, optimizer, scheduler, scaler, epoch, meta, settings, filter_history=None):
    state = {
        "format": CHECKPOINT_FORMAT, "epoch": epoch, "meta": meta, "settings": asdict(settings),
        "model": {"config": channel_config(model), "state_dict": model.state_dict()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "filter_history": filter_history.state_dict() if filter_history is not None else None,
    }
    atomic_save(state, path)


def load_checkpoint(path):
    try:
        ckpt = safe_load(path)
    except CheckpointError as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated and cannot be loaded ({exc}). "
            "Delete it to start the stage over, or restore it from a backup."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a slimcore training checkpoint")
    return ckpt


def _read_metrics(path, before_epoch):
    lines = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    if rec["epoch"] < before_epoch:
                        lines.append(rec)
    return lines


def _write_metrics(path, records):
    atomic_write_text(path, "".join(json.dumps(rec) + "\n" for rec in records))


# ---------------------------------------------------------------------------------------- the loop


def fit(model, train_loader, val_loader, test_loader, settings: Settings, stage_dir, meta, device,
        resume=False, stage="train", crash_after_epoch=None):
    """Trains ``model`` in place for one stage and returns the final metrics record.

    ``crash_after_epoch`` (tests only) raises after that epoch's checkpoint, as a kill would.
    """
    rank, world = distributed()
    main = rank == 0
    s = settings
    if not (isinstance(s.epochs, int) and s.epochs >= 1):
        raise ValueError(f"epochs must be an integer >= 1, got {s.epochs!r}")
    if not (isinstance(s.batch_size, int) and s.batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {s.batch_size!r}")
    if not (math.isfinite(s.lr) and s.lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {s.lr!r}")
    if not (math.isfinite(s.lam) and s.lam >= 0):  # nan > 0 is False: a NaN lam would train with no penalty
        raise ValueError(f"lam must be a finite number >= 0, got {s.lam!r}")
    if s.accumulate < 1 or s.batch_size % s.accumulate:
        raise ValueError(f"batch size {s.batch_size} must be a multiple of accumulate={s.accumulate}")
    if s.bn not in ("stock", "fused"):
        raise ValueError(f"bn must be 'stock' or 'fused', got {s.bn!r}")
    if main:
        os.makedirs(stage_dir, exist_ok=True)
    sparsity = s.lam > 0
    pen = make_penalty(s) if sparsity else None
    fused = sparsity and s.bn == "fused"
    if fused and s.mode != "subgradient":
        raise ValueError("bn='fused' adds the penalty's subgradient inside the BatchNorm backward; "
                         "proximal mode needs bn='stock' (nn.BatchNorm + sparse_bn_step)")
    if fused:
        from ..sparsity.batchnorm import convert_bn, is_slim_batchnorm, revert_bn, set_penalty_scale

        convert_bn(model, penalty=pen, lam=s.lam, penalty_scale=1.0 / s.accumulate)
        left = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                and m.weight is not None and not is_slim_batchnorm(m)]
        if left:  # they would train without any penalty
            revert_bn(model)
            raise ValueError(f"bn='fused' converts BatchNorm1d/2d only; {', '.join(left[:5])} "
                             f"({type(model.get_submodule(left[0])).__name__}) would get no penalty: use bn='stock'")
    model.to(device)
    if s.channels_last:  # before the optimizer, so its momentum buffers take the same layout
        if any(p.dim() == 5 for p in model.parameters()):
            raise ValueError("channels_last is for 2-D convolutions; this model has 5-D (Conv3d) weights")
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    milestones = sorted({max(1, int(round(f * s.epochs))) for f in s.milestones})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    scaler = torch.amp.GradScaler("cuda") if s.amp and device.type == "cuda" else None
    step = None
    if sparsity and not fused:
        step = SparseBNStep(model, lam=s.lam, penalty=pen, mode=s.mode,
                            momentum=s.momentum if s.mode == "proximal" else 0.0)

    ckpt_path = os.path.join(stage_dir, "checkpoint.pt")
    metrics_path = os.path.join(stage_dir, "metrics.jsonl")
    start_epoch = 0
    if resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"]["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        start_epoch = ckpt["epoch"] + 1
    # L1 norm of every filter per epoch, for the hbfp criterion (written as filter_history.pt)
    filter_history = FilterHistory(model)
    if resume and start_epoch > 0 and ckpt.get("filter_history"):
        filter_history.load_state_dict(ckpt["filter_history"])
    history = _read_metrics(metrics_path, start_epoch) if main else []
    if main:
        _write_metrics(metrics_path, history)

    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    show = main and not s.quiet and sys.stderr.isatty()
    record = history[-1] if history else None
    loss_scale = None  # the GradScaler scale the fused penalty was last set for
    for epoch in range(start_epoch, s.epochs):
        t0 = time.perf_counter()
        train_loader.set_epoch(epoch)
        net.train()
        seen, correct, loss_sum, batches = 0, 0, 0.0, 0
        lr = optimizer.param_groups[0]["lr"]
        bar = _progress(train_loader, len(train_loader), f"{stage} {epoch + 1}/{s.epochs}", show)
        for x, y in bar:
            optimizer.zero_grad(set_to_none=True)
            k = s.accumulate
            if fused and scaler is not None and scaler.get_scale() != loss_scale:
                # the penalty joins the scaled gradient, which unscale_ divides by the loss scale
                loss_scale = scaler.get_scale()
                set_penalty_scale(model, loss_scale / k)
            for j in range(k):
                xm, ym = x[j::k], y[j::k]
                sync = nullcontext() if (world == 1 or j == k - 1) else net.no_sync()
                with sync, _autocast(device, s.amp):
                    out = net(xm)
                    loss = F.cross_entropy(out, ym) / k
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.item() * k * len(ym)
                correct += (out.argmax(1) == ym).sum().item()
                seen += len(ym)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if step is not None and s.mode == "subgradient":
                step()
            if scaler is not None:
                scale_before = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                stepped = scaler.get_scale() >= scale_before
            else:
                optimizer.step()
                stepped = True
            if step is not None and s.mode == "proximal" and stepped:
                step(lr=lr)
            batches += 1
            if show and hasattr(bar, "set_postfix") and batches % 10 == 1:
                postfix = {"loss": f"{loss_sum / seen:.3f}", "acc": f"{correct / seen:.3f}"}
                if sparsity:
                    postfix["|g|<.01"] = f"{gamma_stats(model)[0]:.2f}"
                bar.set_postfix(postfix)
        scheduler.step()
        if not main:
            continue
        val_acc, val_loss = evaluate(model, val_loader, device)
        test_acc, test_loss = evaluate(model, test_loader, device)
        below, zero, _ = gamma_stats(model)
        record = {"stage": stage, "epoch": epoch, "lr": lr, "train_loss": loss_sum / max(seen, 1),
                  "train_acc": correct / max(seen, 1), "val_acc": val_acc, "val_loss": val_loss, "test_acc": test_acc,
                  "test_loss": test_loss, "gamma_below_1e-2": below, "gamma_zero": zero,
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        _write_metrics(metrics_path, history)
        filter_history.record()
        save_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, epoch, meta, s, filter_history)
        if not s.quiet:
            val = f" val {val_acc:.4f}" if val_acc is not None else ""
            print(f"{stage} epoch {epoch + 1}/{s.epochs}: loss {record['train_loss']:.4f} train {record['train_acc']:.4f}"
                  f"{val} test {test_acc:.4f} |gamma|<1e-2 {below:.3f} ({record['seconds']:.1f}s)", flush=True)
        if crash_after_epoch is not None and epoch == crash_after_epoch:
            raise RuntimeError(f"simulated crash after epoch {epoch}")
    if fused:
        from ..sparsity.batchnorm import revert_bn

        revert_bn(model)
    if s.channels_last:  # hand back (and save) the model NCHW: the pruner's gather reads contiguous weights
        model.to(memory_format=torch.contiguous_format)
    if main:
        save_pruned(model, os.path.join(stage_dir, "model.pt"), meta=meta)
        atomic_save(filter_history.state_dict(), os.path.join(stage_dir, FILTER_HISTORY))
    if world > 1:
        dist.barrier()
    return record


def load_model(path):
    """A model saved by a stage (model.pt), rebuilt from its metadata, and that metadata."""
    return load_pruned(path), safe_load(path).get("meta") or {}


def model_meta(name, kwargs, dataset, input_shape):
    return {"model": name, "model_kwargs": dict(kwargs), "dataset": dataset, "input_shape": list(input_shape)}


def example_input(meta, device="cpu"):
    return torch.zeros(1, *meta["input_shape"], device=device)


def file_size(path):
    return os.path.getsize(path) if os.path.exists(path) else math.nan
