"""Times slimcore's channel gather (the pruning copy) against the index_select chain it replaces.

For typical conv and Linear weight shapes, keeping a random 50% of the output and of the input
channels (fp32):

  index_select x2   weight.index_select(0, o).index_select(1, i): the way pruners copy a weight
                    today (Torch-Pruning, the reference repo); builds an intermediate tensor
  channel_gather    slimcore.ops.channel_gather(weight, o, i): one pass, no intermediate
  channel_gather_   slimcore.ops.channel_gather_(weight, o, i): in place (the kept values move to the
                    front of the weight's own storage, which is then resized)

What is timed: for the two out-of-place candidates, back-to-back calls on the same weight (each
allocates its output, as in pruning). For the in-place op, each call needs a fresh full-size weight,
so before every call the working tensor is resized back and refilled from a pristine copy; that
reset runs outside the timed region and only the channel_gather_ call itself is timed (one timer
per call, synchronised on CUDA). All candidates are checked against each other first. Times are
the median (and interquartile range) of interleaved rounds, so machine drift hits every
candidate alike; speed-ups are ratios of medians from this one run. GB/s counts the bytes a gather
must move, the kept elements read once and written once (2 x output bytes), for every candidate
alike; the chain really moves more (its intermediate is written and read again).

Target: channel_gather >= 1.5x faster than the two chained index_selects on CPU.
Results go to benchmarks/results/gather-<device>.json (or --out).

    python benchmarks/gather.py                 # CPU (and CUDA if visible), all shapes
    python benchmarks/gather.py --device cpu --shapes 512x512x3x3 --threads 1

--busy times every shape twice, idle and with a CPU-burning process on each other core; results
(with busy / idle per candidate) go to gather-<device>-busy.json.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (RESULTS, device_name, environment, idle_and_busy, interleaved, selected_devices,  # noqa: E402
                     warn_if_reference, write_json)

from slimcore import ops  # noqa: E402

DEFAULT_SHAPES = "64x64x3x3,256x256x3x3,512x512x3x3,2048x512x1x1,4096x25088"
KEEP = 0.5


def kept_indices(size, keep, generator, device):
    """A random sorted subset of round(keep * size) channels."""
    count = max(1, round(keep * size))
    return torch.randperm(size, generator=generator)[:count].sort().values.to(device)


def candidates(weight, o, i):
    work = weight.clone()

    def reset():
        work.resize_(weight.shape)
        work.copy_(weight)

    return {
        "index_select x2": (lambda: weight.index_select(0, o).index_select(1, i), None),
        "channel_gather": (lambda: ops.channel_gather(weight, o, i), None),
        "channel_gather_": (lambda: ops.channel_gather_(work, o, i), reset),
    }


def check_agreement(weight, o, i):
    want = weight.index_select(0, o).index_select(1, i)
    assert torch.equal(ops.channel_gather(weight, o, i), want), "channel_gather disagrees with index_select"
    work = weight.clone()
    assert torch.equal(ops.channel_gather_(work, o, i), want), "channel_gather_ disagrees with index_select"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all = CPU, plus CUDA when a GPU is visible (default)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated weight shapes, e.g. 512x512x3x3")
    parser.add_argument("--keep", type=float, default=KEEP, help="fraction of channels kept in both dimensions")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=11, help="interleaved timing rounds")
    parser.add_argument("--round-seconds", type=float, default=0.05, help="time per candidate per round")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gather-<device>.json)")
    parser.add_argument("--busy", action="store_true",
                        help="CPU: also time every shape with a CPU-burning process on each other core")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = selected_devices(args.device, "gather.py")
    warn_if_reference()

    names = ("index_select x2", "channel_gather", "channel_gather_")
    for dev in devices:
        device = torch.device(dev)
        records = []
        print(f"\n{device_name(device)} ({dev}), torch {torch.__version__}, threads {torch.get_num_threads()}; "
              f"fp32, keeping {args.keep:.0%} of both channel dimensions; median us per call (IQR), GB/s")
        print(f"{'shape':<14} {'MB in':>7} " + " ".join(f"{n:>24}" for n in names)
              + f" {'x chain':>8} {'x chain (in place)':>19}")
        for spec in args.shapes.split(","):
            shape = tuple(int(s) for s in spec.split("x"))
            g = torch.Generator().manual_seed(0)
            weight = torch.randn(shape, generator=g).to(device)
            o = kept_indices(shape[0], args.keep, g, device)
            i = kept_indices(shape[1], args.keep, g, device)
            check_agreement(weight, o, i)
            cands = candidates(weight, o, i)
            times, busy = idle_and_busy(
                lambda: interleaved(cands, device, args.repeats, args.round_seconds, warmup_calls=3, min_calls=1),
                args.busy and dev == "cpu")
            out_bytes = o.numel() * i.numel() * weight[0, 0].numel() * weight.element_size()
            moved = 2 * out_bytes
            gbps = {k: moved / (v[0] * 1e-6) / 1e9 for k, v in times.items()}
            speedup = times["index_select x2"][0] / times["channel_gather"][0]
            speedup_in_place = times["index_select x2"][0] / times["channel_gather_"][0]
            cells = " ".join(f"{times[n][0]:>9.1f} ({times[n][1]:>6.1f}) {gbps[n]:>5.1f}" for n in names)
            print(f"{spec:<14} {weight.numel() * weight.element_size() / 1e6:>7.1f} {cells} "
                  f"{speedup:>7.2f}x {speedup_in_place:>18.2f}x")
            record = dict(
                shape=list(shape), keep=args.keep, dtype="float32", out_shape=[o.numel(), i.numel(), *shape[2:]],
                bytes_moved=moved, median_us={k: v[0] for k, v in times.items()},
                iqr_us={k: v[1] for k, v in times.items()}, gb_per_s=gbps,
                speedup_vs_index_select=speedup, speedup_in_place_vs_index_select=speedup_in_place,
            )
            if busy is not None:
                record["busy"] = dict(median_us={k: v[0] for k, v in busy.items()},
                                      iqr_us={k: v[1] for k, v in busy.items()},
                                      busy_over_idle={k: busy[k][0] / times[k][0] for k in times},
                                      speedup_vs_index_select=busy["index_select x2"][0] / busy["channel_gather"][0])
                cells = " ".join(f"{busy[n][0]:>9.1f} ({busy[n][1]:>6.1f}) {'':>5}" for n in names)
                print(f"{'  busy':<14} {'':>7} {cells} {record['busy']['speedup_vs_index_select']:>7.2f}x   busy/idle: "
                      + ", ".join(f"{n} {record['busy']['busy_over_idle'][n]:.2f}x" for n in names))
            records.append(record)
            del cands, weight
        suffix = "-busy" if args.busy and dev == "cpu" else ""
        out = args.out if args.out and len(devices) == 1 else os.path.join(RESULTS, f"gather-{dev}{suffix}.json")
        write_json(out, dict(
            benchmark="gather", **environment(device), busy=bool(suffix), repeats=args.repeats, keep=args.keep,
            min_task_us=os.environ.get("SLIMCORE_CPU_MIN_TASK_US", "default"),
            target="channel_gather >= 1.5x index_select x2 on CPU",
            records=records,
        ))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
