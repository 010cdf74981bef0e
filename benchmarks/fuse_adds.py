"""What fusing residual adds into their conv (slimcore.deploy's fuse_adds) does to dense and slimmed
models, measured in one process: four variants per model and ratio (dense / slimmed, each
deployed with fuse_adds off and on, the memory format forced to the same value for all four so
that only the fusion differs), timed in interleaved rounds (benchmarks/_common.interleaved):
median ms per forward and IQR. The speed-ups compare dense and slimmed in the same form.

    python benchmarks/fuse_adds.py --models preresnet164,densenet40 --ratios 0.5 --threads 1
"""

import argparse
import copy
import os
import sys
import time

import torch

import slimcore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, interleaved, start_cpu_run, write_json  # noqa: E402
from latency import build  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="preresnet164,densenet40")
    parser.add_argument("--ratios", default="0.5")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 at 32x32, 4 at 224x224")
    parser.add_argument("--memory-format", choices=["contiguous", "channels_last"], default="channels_last")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--round-seconds", type=float, default=0.3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    env = start_cpu_run(args.threads)
    print(f"{env['device']}, torch {env['torch']}, threads {env['threads']}, {args.memory_format}; "
          "median ms per forward (IQR), interleaved")
    records = []
    start = time.perf_counter()
    for name in args.models.split(","):
        dense, shape = build(name)
        example = torch.randn(1, *shape)
        bs = args.batch_size or (32 if shape[-1] <= 32 else 4)
        x = torch.randn(bs, *shape)
        models = {"dense": dense}
        for r in (float(r) for r in args.ratios.split(",")):
            slim = copy.deepcopy(dense)
            slimcore.prune(slim, example, ratio=r)
            models[r] = slim
        variants, adds = {}, {}
        for key, m in models.items():
            for fuse in (False, True):
                d = slimcore.deploy(m, x, memory_format=args.memory_format, fuse_adds=fuse)
                adds[key, fuse] = len(d.deploy_report["conv_adds"])
                variants[key, fuse] = _runner(d, x)
        times = interleaved(variants, torch.device("cpu"), args.repeats, args.round_seconds, warmup_calls=2,
                            min_calls=1)
        ms = {k: (t[0] / 1e3, t[1] / 1e3) for k, t in times.items()}
        for key in models:
            if key == "dense":
                continue
            rec = dict(model=name, ratio=key, batch_size=bs, memory_format=args.memory_format,
                       fused_adds_dense=adds["dense", True], fused_adds_slim=adds[key, True])
            for fuse in (False, True):
                tag = "fused" if fuse else "unfused"
                rec[f"dense_{tag}_ms"], rec[f"dense_{tag}_iqr_ms"] = ms["dense", fuse]
                rec[f"slim_{tag}_ms"], rec[f"slim_{tag}_iqr_ms"] = ms[key, fuse]
                rec[f"speedup_{tag}"] = ms["dense", fuse][0] / ms[key, fuse][0]
            records.append(rec)
            print(f"{name:<14} ratio {key:.2f} batch {bs}: adds fused {rec['fused_adds_dense']}/{rec['fused_adds_slim']} "
                  f"(dense/slim)\n"
                  f"  unfused: dense {rec['dense_unfused_ms']:8.1f} ({rec['dense_unfused_iqr_ms']:.1f})  "
                  f"slim {rec['slim_unfused_ms']:8.1f} ({rec['slim_unfused_iqr_ms']:.1f})  "
                  f"speed-up {rec['speedup_unfused']:.2f}x\n"
                  f"  fused:   dense {rec['dense_fused_ms']:8.1f} ({rec['dense_fused_iqr_ms']:.1f})  "
                  f"slim {rec['slim_fused_ms']:8.1f} ({rec['slim_fused_iqr_ms']:.1f})  "
                  f"speed-up {rec['speedup_fused']:.2f}x", flush=True)
    out = args.out or os.path.join(RESULTS, "fuse-adds-cpu.json")
    write_json(out, dict(benchmark="fuse_adds", **env, repeats=args.repeats, seconds=time.perf_counter() - start,
                         records=records))
    print(f"wrote {out}")


def _runner(model, x):
    def run():
        with torch.inference_mode():
            return model(x)

    return run


if __name__ == "__main__":
    main()
