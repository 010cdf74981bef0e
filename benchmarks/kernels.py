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
"""

import argparse
import os
import sys

import torch
from torch import nn

import slimcore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, device_name, environment, interleaved, selected_devices, warn_if_reference, write_json  # noqa: E402

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
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
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
                    times = interleaved(fns, device, args.repeats, args.round_seconds)
                    speedup_eager = times["eager loop"][0] / times["slimcore"][0]
                    speedup_foreach = times["foreach"][0] / times["slimcore"][0]
                    cells = " ".join(f"{m:>8.1f} ({q:>4.1f})" for m, q in times.values())
                    print(f"{model_name:<12} {len(weights):>9} {channels:>8}  {penalty + ' ' + mode:<16} {cells} "
                          f"{speedup_eager:>11.1f}x {speedup_foreach:>8.1f}x")
                    records.append(dict(
                        model=model_name, bn_layers=len(weights), channels=channels, mode=mode, penalty=penalty,
                        median_us={k: v[0] for k, v in times.items()}, iqr_us={k: v[1] for k, v in times.items()},
                        speedup_vs_eager_loop=speedup_eager, speedup_vs_foreach=speedup_foreach,
                    ))
        out = args.out if args.out and len(devices) == 1 else os.path.join(RESULTS, f"kernels-{dev}.json")
        write_json(out, dict(benchmark="kernels", **environment(device), repeats=args.repeats, records=records))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
