"""Times slimcore's penalty step against the ways people write it today.

For the BatchNorm layers of torchvision resnet50 and densenet121 and a ResNet-164-sized model:

  eager loop     the reference repo's updateBN: a Python loop over model.modules(), two ops per layer
  eager list     the same loop over a pre-collected list of BN weights (no module traversal)
  foreach        a torch._foreach_* composition over pre-collected lists
  slimcore       slimcore.SparseBNStep (BN weights collected once): one fused kernel per step
  slimcore fn    slimcore.sparse_bn_step(model, ...): collects the BN weights on every call

Every candidate's result is checked against slimcore's before timing. Times are the median (and
interquartile range) of interleaved repeats, so machine drift hits every candidate alike; the
speed-ups printed are ratios of medians measured in this one run. Results go to
benchmarks/results/kernels-<device>.json (or --out).

    python benchmarks/kernels.py                      # CPU (and CUDA if visible), all models
    python benchmarks/kernels.py --device cuda --modes subgradient

--bn times the fused BatchNorm instead (see bn_main): forward + backward + penalty of one
SlimBatchNorm2d against nn.BatchNorm2d (ATen / cuDNN) forward + backward followed by the separate
penalty step (SparseBNStep on that layer), for every BatchNorm input shape of VGG-19 and
ResNet-164 at CIFAR size (batch 64) and torchvision resnet50 at 224 (batch 32), NCHW and
channels_last, float32 and bfloat16. Results go to benchmarks/results/bn-<device>.json.

    python benchmarks/kernels.py --bn --device cpu
    python benchmarks/kernels.py --bn --device cuda --bn-models resnet50 --bn-dtypes bfloat16

--busy measures every row twice: idle, then with a CPU-burning process on each other core (what
data-loader workers do during training); the busy times, and busy / idle per candidate, go to
kernels-<device>-busy.json or bn-<device>-busy.json.

    python benchmarks/kernels.py --device cpu --threads 2 --busy
"""

import argparse
import collections
import os
import sys

import torch
from torch import nn

import slimcore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (RESULTS, device_name, environment, idle_and_busy, interleaved, selected_devices,  # noqa: E402
                     warn_if_reference, write_json)

LAM = 1e-4  # the paper's lambda for VGG
MU = 1e-3  # a proximal step: lr 0.1 * lam 1e-2
TL1_A = 1.0


# ------------------------------------------------------------------------------------------ models


def resnet164_sized():
    """The 163 BatchNorm layers of pre-activation ResNet-164 (CIFAR), each after a 1x1 conv, so
    module traversal costs what it costs in the real network."""
    sizes = []
    inplanes = 16
    for planes in (16, 32, 64):
        for block in range(18):
            sizes += [inplanes, planes, planes]  # bn1 (pre-activation input), bn2, bn3
            inplanes = planes * 4
    sizes.append(inplanes)  # final BN
    layers = []
    for c in sizes:
        layers += [nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)]
    return nn.Sequential(*layers)


def build_model(name):
    if name == "resnet164":
        return resnet164_sized()
    import torchvision

    return getattr(torchvision.models, name)()


# -------------------------------------------------------------------------------------- candidates


def candidates(model, mode, penalty):
    """{name: fn} doing the same penalty step on `model` in different ways."""
    bn_types = nn.modules.batchnorm._BatchNorm
    weights = [w for _, w in slimcore.bn_weights(model)]

    def grads():
        return [w.grad for w in weights]

    if mode == "subgradient" and penalty == "l1":

        def eager_loop():
            for m in model.modules():
                if isinstance(m, bn_types):
                    m.weight.grad.data.add_(LAM * torch.sign(m.weight.data))

        def eager_list():
            for w in weights:
                w.grad.add_(LAM * torch.sign(w.detach()))

        def foreach():
            torch._foreach_add_(grads(), torch._foreach_sign(weights), alpha=LAM)

    elif mode == "subgradient" and penalty == "tl1":
        a = TL1_A

        def tl1_grad(w):
            return (LAM * a * (a + 1)) * torch.sign(w) / (a + w.abs()) ** 2

        def eager_loop():
            for m in model.modules():
                if isinstance(m, bn_types):
                    m.weight.grad.data.add_(tl1_grad(m.weight.data))

        def eager_list():
            for w in weights:
                w.grad.add_(tl1_grad(w.detach()))

        def foreach():
            denom = torch._foreach_abs(weights)
            torch._foreach_add_(denom, a)
            torch._foreach_mul_(denom, denom)
            num = torch._foreach_sign(weights)
            torch._foreach_div_(num, denom)
            torch._foreach_add_(grads(), num, alpha=LAM * a * (a + 1))

    elif mode == "proximal" and penalty == "l1":

        def soft(w):
            return torch.sign(w) * (w.abs() - MU).clamp_(min=0)

        def eager_loop():
            for m in model.modules():
                if isinstance(m, bn_types):
                    m.weight.data.copy_(soft(m.weight.data))

        def eager_list():
            with torch.no_grad():
                for w in weights:
                    w.copy_(soft(w))

        def foreach():
            with torch.no_grad():
                shrunk = torch._foreach_abs(weights)
                torch._foreach_sub_(shrunk, MU)
                torch._foreach_clamp_min_(shrunk, 0.0)
                torch._foreach_mul_(shrunk, torch._foreach_sign(weights))
                torch._foreach_copy_(weights, shrunk)

    else:
        raise ValueError(f"no baseline for {mode} {penalty}")

    lam = MU if mode == "proximal" else LAM
    lr = 1.0 if mode == "proximal" else None  # proximal step mu = lr * lam = MU
    prepared = slimcore.SparseBNStep(model, lam=lam, penalty=penalty, mode=mode)
    return {
        "eager loop": eager_loop,
        "eager list": eager_list,
        "foreach": foreach,
        "slimcore": lambda: prepared(lr=lr),
        "slimcore fn": lambda: slimcore.sparse_bn_step(model, lam=lam, penalty=penalty, mode=mode, lr=lr),
    }


def reset_state(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, w in slimcore.bn_weights(model):
            w.copy_(torch.randn(w.shape, generator=g) * 0.01)  # many |gamma| near MU: both prox branches
            w.grad = torch.zeros_like(w)


def check_agreement(model, fns, mode):
    """Each candidate must compute what slimcore computes (one call from the same state)."""
    outputs = {}
    for name, fn in fns.items():
        reset_state(model)
        fn()
        tensors = [w.detach() if mode == "proximal" else w.grad for _, w in slimcore.bn_weights(model)]
        outputs[name] = torch.cat([t.flatten() for t in tensors]).cpu()
    want = outputs["slimcore"]
    for name, got in outputs.items():
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name} disagrees: {m}")
    reset_state(model)


# ------------------------------------------------------------------------------- fused BatchNorm

BN_MODELS = {  # name: (batch, input size)
    "vgg19": (64, 32),
    "resnet164": (64, 32),
    "resnet50": (32, 224),
}
BN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def bn_shapes(name):
    """Counter of the (N, C, H, W) inputs of the model's BatchNorm2d layers (one batch-1 forward)."""
    batch, size = BN_MODELS[name]
    if name == "vgg19":
        model = slimcore.models.build("vgg19")
    elif name == "resnet164":
        model = slimcore.models.build("preresnet164")
    else:
        import torchvision

        model = torchvision.models.resnet50()
    shapes = collections.Counter()

    def hook(module, args):
        shapes[(batch,) + tuple(args[0].shape[1:])] += 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    for h in handles:
        h.remove()
    return shapes


def bn_candidates(shape, fmt, dtype, device):
    """{name: fn}: one training step's BatchNorm work on `shape` (forward, backward, penalty).

    Activations have `dtype`; parameters and running statistics stay float32 (how bf16 training
    runs under autocast). Both modules start from the same state; both compute grad_input."""
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=memory_format)
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=memory_format)
    x.requires_grad_()
    plain = nn.BatchNorm2d(shape[1]).to(device)
    fused = slimcore.SlimBatchNorm2d(shape[1], penalty="l1", lam=LAM).to(device)
    fused.load_state_dict(plain.state_dict())
    step = slimcore.SparseBNStep([plain.weight], lam=LAM, penalty="l1")

    def run(module, after=None):
        def fn():
            x.grad = None
            module.weight.grad = None
            module.bias.grad = None
            module(x).backward(dy)
            if after is not None:
                after()
        return fn

    return {"nn + step": run(plain, step), "slimcore": run(fused)}, (x, dy, plain, fused, step)


def bn_check(state, device):
    """SlimBatchNorm2d's gradients equal nn.BatchNorm2d's followed by the penalty step."""
    x, dy, plain, fused, step = state
    grads = []
    for module, after in ((plain, step), (fused, None)):
        x.grad = module.weight.grad = module.bias.grad = None
        module(x).backward(dy)
        if after is not None:
            after()
        grads.append((x.grad.float(), module.weight.grad, module.bias.grad))
    tol = dict(rtol=1e-4, atol=1e-4) if x.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b, what in zip(grads[0], grads[1], ("grad_input", "grad_weight", "grad_bias")):
        scale = max(1.0, a.abs().max().item())
        torch.testing.assert_close(b / scale, a / scale, **tol, msg=lambda m: f"{what} disagrees: {m}")


def bn_main(args):
    devices = selected_devices(args.device, "kernels.py --bn")
    warn_if_reference()
    for dev in devices:
        device = torch.device(dev)
        records, totals = [], {}
        print(f"\n{device_name(device)} ({dev}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
              f"CPU capability {torch.backends.cpu.get_cpu_capability()}; forward+backward+penalty of one "
              "BatchNorm2d, median us (IQR); GB/s = 5 x activation bytes / time")
        print(f"{'model':<10} {'shape (x layers)':<24} {'format':<13} {'dtype':<8} {'nn + step':>17} "
              f"{'slimcore':>17} {'ratio':>6} {'GB/s nn':>8} {'GB/s slim':>9}")
        for model_name in args.bn_models.split(","):
            shapes = bn_shapes(model_name)
            for fmt in args.bn_formats.split(","):
                for dtype_name in args.bn_dtypes.split(","):
                    dtype = BN_DTYPES[dtype_name]
                    key = (model_name, fmt, dtype_name)
                    totals[key] = [0.0, 0.0, 0.0, 0.0]  # idle nn, slim; busy nn, slim
                    for shape, count in shapes.items():
                        fns, state = bn_candidates(shape, fmt, dtype, device)
                        bn_check(state, device)
                        big = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size() > 8 << 20
                        times, busy = idle_and_busy(
                            lambda: interleaved(fns, device, args.bn_repeats, args.round_seconds * (4 if big else 1),
                                                warmup_calls=3 if dev == "cpu" else 20, min_calls=2),
                            args.busy and dev == "cpu")
                        t_nn, t_slim = times["nn + step"][0], times["slimcore"][0]
                        nbytes = 5 * torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
                        totals[key][0] += count * t_nn
                        totals[key][1] += count * t_slim
                        label = "x".join(map(str, shape)) + f" (x{count})"
                        cells = " ".join(f"{m:>9.1f} ({q:>5.1f})" for m, q in times.values())
                        print(f"{model_name:<10} {label:<24} {fmt:<13} {dtype_name:<8} {cells} {t_slim / t_nn:>6.2f} "
                              f"{nbytes / t_nn / 1e3:>8.1f} {nbytes / t_slim / 1e3:>9.1f}", flush=True)
                        record = dict(
                            model=model_name, shape=list(shape), layers=count, format=fmt, dtype=dtype_name,
                            median_us={k: v[0] for k, v in times.items()}, iqr_us={k: v[1] for k, v in times.items()},
                            ratio=t_slim / t_nn, bytes=nbytes, gbps_nn=nbytes / t_nn / 1e3,
                            gbps_slimcore=nbytes / t_slim / 1e3,
                        )
                        if busy is not None:
                            b_nn, b_slim = busy["nn + step"][0], busy["slimcore"][0]
                            totals[key][2] += count * b_nn
                            totals[key][3] += count * b_slim
                            record["busy"] = dict(median_us={k: v[0] for k, v in busy.items()},
                                                  iqr_us={k: v[1] for k, v in busy.items()}, ratio=b_slim / b_nn,
                                                  busy_over_idle={k: busy[k][0] / times[k][0] for k in times})
                            print(f"{'':<10} {'busy':<24} {fmt:<13} {dtype_name:<8} "
                                  + " ".join(f"{m:>9.1f} ({q:>5.1f})" for m, q in busy.values())
                                  + f" {b_slim / b_nn:>6.2f}   busy/idle slimcore {b_slim / t_slim:.2f}x", flush=True)
                        records.append(record)
        print("\nper model, all BatchNorm layers (sum of count x median):")
        summary = []
        for (model_name, fmt, dtype_name), (t_nn, t_slim, b_nn, b_slim) in totals.items():
            busy_text = f"  busy: {b_nn / 1e3:9.2f} ms / {b_slim / 1e3:9.2f} ms" if b_slim else ""
            print(f"  {model_name:<10} {fmt:<13} {dtype_name:<8} nn + step {t_nn / 1e3:9.2f} ms  slimcore "
                  f"{t_slim / 1e3:9.2f} ms  ratio {t_slim / t_nn:.2f}{busy_text}")
            entry = dict(model=model_name, format=fmt, dtype=dtype_name, total_us_nn=t_nn,
                         total_us_slimcore=t_slim, ratio=t_slim / t_nn)
            if b_slim:
                entry["busy"] = dict(total_us_nn=b_nn, total_us_slimcore=b_slim, ratio=b_slim / b_nn,
                                     slimcore_busy_over_idle=b_slim / t_slim, nn_busy_over_idle=b_nn / t_nn)
            summary.append(entry)
        suffix = "-busy" if args.busy and dev == "cpu" else ""
        out = args.out if args.out and len(devices) == 1 else os.path.join(RESULTS, f"bn-{dev}{suffix}.json")
        write_json(out, dict(benchmark="bn", **environment(device), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                             busy=bool(suffix), min_task_us=os.environ.get("SLIMCORE_CPU_MIN_TASK_US", "default"),
                             repeats=args.bn_repeats, lam=LAM, records=records, summary=summary))
        print(f"wrote {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all = CPU, plus CUDA when a GPU is visible (default)")
    parser.add_argument("--models", default="resnet50,densenet121,resnet164")
    parser.add_argument("--modes", default="subgradient,proximal", help="subgradient and/or proximal")
    parser.add_argument("--penalties", default="l1", help="l1 and/or tl1 (subgradient only)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--round-seconds", type=float, default=0.02, help="time per candidate per round")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels-<device>.json)")
    parser.add_argument("--bn", action="store_true", help="time the fused BatchNorm instead of the penalty step")
    parser.add_argument("--bn-models", default="vgg19,resnet164,resnet50")
    parser.add_argument("--bn-formats", default="nchw,channels_last")
    parser.add_argument("--bn-dtypes", default="float32,bfloat16")
    parser.add_argument("--bn-repeats", type=int, default=5, help="interleaved timing rounds (--bn)")
    parser.add_argument("--busy", action="store_true",
                        help="CPU: also time every row with a CPU-burning process on each other core")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bn:
        bn_main(args)
        return
    devices = selected_devices(args.device, "kernels.py")
    warn_if_reference()

    for dev in devices:
        device = torch.device(dev)
        records = []
        header = f"{'model':<12} {'BN layers':>9} {'channels':>8}  {'step':<16} " + " ".join(
            f"{n:>15}" for n in ("eager loop", "eager list", "foreach", "slimcore", "slimcore fn")
        ) + f" {'x eager loop':>12} {'x foreach':>9}"
        print(f"\n{device_name(device)} ({dev}), torch {torch.__version__}, threads {torch.get_num_threads()}; "
              "median us per step (IQR)")
        print(header)
        for model_name in args.models.split(","):
            model = build_model(model_name).to(device)
            weights = [w for _, w in slimcore.bn_weights(model)]
            channels = sum(w.numel() for w in weights)
            for mode in args.modes.split(","):
                for penalty in args.penalties.split(","):
                    if mode == "proximal" and penalty != "l1":
                        continue
                    fns = candidates(model, mode, penalty)
                    check_agreement(model, fns, mode)
                    times, busy = idle_and_busy(lambda: interleaved(fns, device, args.repeats, args.round_seconds),
                                                args.busy and dev == "cpu")
                    for label, t in (("", times), ("busy", busy)):
                        if t is None:
                            continue
                        speedup_eager = t["eager loop"][0] / t["slimcore"][0]
                        speedup_foreach = t["foreach"][0] / t["slimcore"][0]
                        cells = " ".join(f"{m:>8.1f} ({q:>4.1f})" for m, q in t.values())
                        step = (penalty + " " + mode + (" busy" if label else ""))
                        print(f"{model_name:<12} {len(weights):>9} {channels:>8}  {step:<16} {cells} "
                              f"{speedup_eager:>11.1f}x {speedup_foreach:>8.1f}x")
                    record = dict(
                        model=model_name, bn_layers=len(weights), channels=channels, mode=mode, penalty=penalty,
                        median_us={k: v[0] for k, v in times.items()}, iqr_us={k: v[1] for k, v in times.items()},
                        speedup_vs_eager_loop=times["eager loop"][0] / times["slimcore"][0],
                        speedup_vs_foreach=times["foreach"][0] / times["slimcore"][0],
                    )
                    if busy is not None:
                        record["busy"] = dict(
                            median_us={k: v[0] for k, v in busy.items()}, iqr_us={k: v[1] for k, v in busy.items()},
                            busy_over_idle={k: busy[k][0] / times[k][0] for k in times},
                            speedup_vs_foreach=busy["foreach"][0] / busy["slimcore"][0])
                        print(f"{'':<12} busy / idle: slimcore {record['busy']['busy_over_idle']['slimcore']:.2f}x, "
                              f"foreach {record['busy']['busy_over_idle']['foreach']:.2f}x")
                    records.append(record)
        suffix = "-busy" if args.busy and dev == "cpu" else ""
        out = args.out if args.out and len(devices) == 1 else os.path.join(RESULTS, f"kernels-{dev}{suffix}.json")
        write_json(out, dict(benchmark="kernels", **environment(device), busy=bool(suffix), repeats=args.repeats,
                             min_task_us=os.environ.get("SLIMCORE_CPU_MIN_TASK_US", "default"), records=records))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
