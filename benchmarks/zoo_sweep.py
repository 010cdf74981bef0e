"""Does slimcore.prune work on models no test names? A sweep over timm and torchvision.

Run from the repository root (CPU, one thread; the whole list takes about 10 minutes)::

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/zoo_sweep.py            # all models
    python benchmarks/zoo_sweep.py --only ghostnet_050 tv:resnet18          # a few, by name
    python benchmarks/zoo_sweep.py --list                                   # the chosen models only

Which models: for timm, ``timm.list_models()`` grouped by family (timm's module and the name's
leading letters, so ``efficientnet:mixnet`` and ``efficientnet:tinynet`` are apart), and from each
family the smallest by parameter count (counted on the meta device, cached in
results/zoo-sweep-param-counts.json) of three likely-small names (tiny, nano, small, ...) that
tests/test_zoo.py does not already name, up to ``--max-params`` (60M). For torchvision: classification,
segmentation and detection models not covered elsewhere (``tv:``, ``tvseg:``, ``tvdet:``
prefixes; ``tvdetbb:`` prunes a detector's backbone and FPN alone). All are built from
config (no weights are downloaded).

Each model gets tests/test_zoo.py's ``check_zoo_model`` checks, measured instead of asserted: BN
gammas randomised, ``slimcore.prune(ratio=0.4, compensate=False)`` with ``bn_scale`` when the model
has BN (``l1_filter`` otherwise), the pruned output against the dense one with the removed channels
zeroed, the share of parameters cut, and the share of BN-normalised channels left prunable outside
the classifier. Inputs are 64x64 (``img_size=64`` for timm models with a fixed input size); a model
that does not build or run at that size is retried at its own default size.

Each model runs in a worker process with a time limit (``--limit``, seconds); a worker that runs
over it is killed and the model recorded as ``too_slow``. Per model the result is one of:
``ok``, ``inexact`` (max relative error), ``error`` (phase, exception type and first line),
``low_share`` (the share), ``low_cut`` (the cut), ``too_slow``, ``skipped`` (does not build or run
dense: not the pruner's failure). Results go to benchmarks/results/zoo-sweep-cpu.json and a
markdown summary beside it (zoo-sweep-cpu.md). ``--resume`` keeps the results already in the
JSON file and runs only the models missing from it.
"""

import argparse
import collections
import copy
import json
import os
import re
import select
import subprocess
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, ROOT)  # this checkout's slimcore, not an installed one
SIZE = 64
RATIO = 0.4
MIN_CUT = 0.2  # tests/test_zoo.py's thresholds
MIN_SHARE = 0.9
REL_TOL = 1e-4

BIG_NAME = re.compile(r"large|huge|giant|gigantic|enormous|base|xlarge|_\d+b(_|$)|so\d+m|_l\d|_xl|_xxl|_m\d\d|_b\d\d|_l$"
                      r"|_m$|_b$|_h$|_g$|\d{3}d?_|(^|_)[bfmlh]\d+_\d+|_448|_512|_384|_336")
SMALL_NAME = re.compile(r"pico|femto|atto|nano|xxs|tiny|xs|mini|small|_s\d?(_|$)|_t(_|$)|_050|_035|_002|_s0|_m0|b0|18")
CANDIDATES_PER_FAMILY = 3

# torchvision models not covered by tests (vit_b_16 is in test_zoo.py). name -> (builder, kwargs, kind)
TORCHVISION = {
    "alexnet": {}, "vgg11_bn": {}, "resnet18": {}, "resnext50_32x4d": {}, "densenet121": {},
    "googlenet": {"aux_logits": False, "init_weights": True}, "inception_v3": {"aux_logits": False, "init_weights": True},
    "mobilenet_v2": {}, "mobilenet_v3_small": {}, "mnasnet0_5": {}, "shufflenet_v2_x0_5": {}, "squeezenet1_1": {},
    "efficientnet_b0": {}, "efficientnet_v2_s": {}, "regnet_x_400mf": {}, "regnet_y_400mf": {},
    "convnext_tiny": {}, "swin_t": {}, "swin_v2_t": {}, "maxvit_t": {},
}
TORCHVISION_SEGMENTATION = {
    "lraspp_mobilenet_v3_large": {}, "deeplabv3_mobilenet_v3_large": {}, "fcn_resnet50": {}, "deeplabv3_resnet50": {},
}
_DETECTION_SIZE = {"min_size": 128, "max_size": 128}
TORCHVISION_DETECTION = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": _DETECTION_SIZE, "fasterrcnn_resnet50_fpn": _DETECTION_SIZE,
    "retinanet_resnet50_fpn": _DETECTION_SIZE, "fcos_resnet50_fpn": _DETECTION_SIZE,
    "maskrcnn_resnet50_fpn": _DETECTION_SIZE, "ssdlite320_mobilenet_v3_large": {}, "ssd300_vgg16": {},
}


# ------------------------------------------------------------------------------------ choosing models


def timm_family(name):
    """timm's module plus the name's leading letters (tf_/legacy_/... ports stay with their family)."""
    from timm.models import _registry

    stem = re.sub(r"^(tf_|legacy_|gluon_|ig_|ssl_|swsl_)", "", name)
    return _registry._model_to_module[name] + ":" + re.match(r"[a-z]+", stem).group(0)


def parameter_counts(names, cache):
    """{name: parameters} from meta-device builds (no memory, no init), cached in a JSON file."""
    import timm
    import torch

    counts = json.load(open(cache)) if os.path.exists(cache) else {}
    for i, name in enumerate(names):
        if name in counts:
            continue
        if i % 20 == 0:
            with open(cache, "w") as f:
                json.dump(counts, f)
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                counts[name] = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
        except Exception as e:  # unbuildable on meta: leave it out of the choice
            counts[name] = f"{type(e).__name__}: {first_line(e)}"
    with open(cache, "w") as f:
        json.dump(counts, f)
    return counts


def tested_timm_names():
    with open(os.path.join(ROOT, "tests", "test_zoo.py")) as f:
        text = f.read()
    return set(re.findall(r'\("([\w.]+)", "(?:bn_scale|l1_filter)"\)', text)) | {"vit_tiny_patch16_224",
                                                                                  "deit_tiny_patch16_224"}


def chosen_models(max_params, cache):
    import timm

    tested = tested_timm_names()
    families = collections.defaultdict(list)
    for name in timm.list_models():
        if not name.startswith("test_") and name not in tested:
            families[timm_family(name)].append(name)
    # Only a few likely-small names per family are counted (each build, even on meta, takes a second).
    names = []
    for members in families.values():
        small = [n for n in members if not BIG_NAME.search(n)] or members
        names += sorted(small, key=lambda n: (not SMALL_NAME.search(n), len(n), n))[:CANDIDATES_PER_FAMILY]
    counts = parameter_counts(names, cache)
    families = collections.defaultdict(list)
    for name in names:
        if isinstance(counts.get(name), int) and counts[name] <= max_params:
            families[timm_family(name)].append(name)
    covered = {timm_family(n) for n in tested}
    # families no test covers first: a run cut short has looked at the least-known models
    chosen = [min(members, key=lambda n: (counts[n], n))
              for _, members in sorted(families.items(), key=lambda item: (item[0] in covered, item[0]))]
    chosen += [f"tv:{n}" for n in TORCHVISION] + [f"tvseg:{n}" for n in TORCHVISION_SEGMENTATION]
    chosen += [f"tvdet:{n}" for n in TORCHVISION_DETECTION] + [f"tvdetbb:{n}" for n in TORCHVISION_DETECTION]
    return chosen


# ------------------------------------------------------------------------------------ one model


def first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def build(name, size):
    """(model, example input, classifier name or None). ``size=None``: the model's own default size."""
    import torch
    import torchvision

    if name.startswith(("tvdet:", "tvdetbb:")):
        short = name.split(":", 1)[1]
        model = getattr(torchvision.models.detection, short)(weights=None, weights_backbone=None,
                                                             **TORCHVISION_DETECTION[short])
        side = size or 320  # SSD300's VGG backbone needs more than 64
        if name.startswith("tvdetbb:"):  # the backbone (with its FPN) alone, as one prunes it for a detector
            return model.backbone, torch.randn(2, 3, side, side), None
        return model, ([torch.randn(3, side, side), torch.randn(3, side, side)],), None
    if name.startswith("tvseg:"):
        short = name.split(":", 1)[1]
        model = getattr(torchvision.models.segmentation, short)(weights=None, weights_backbone=None)
        return model, torch.randn(2, 3, size or 224, size or 224), None
    if name.startswith("tv:"):
        short = name.split(":", 1)[1]
        model = getattr(torchvision.models, short)(weights=None, **TORCHVISION[short])
        return model, torch.randn(2, 3, size or 224, size or 224), None
    import timm

    cfg = timm.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    kwargs = {}
    if size is not None and cfg.get("fixed_input_size"):
        kwargs["img_size"] = size
    model = timm.create_model(name, pretrained=False, **kwargs)
    side = size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    classifier = model.pretrained_cfg.get("classifier") or "head"
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0]
    return model, torch.randn(2, 3, side, side), classifier.split(".")[0]


DETECTION_PROBES = ("backbone", "head", "rpn.head")


def probe_outputs(model, args):
    """The outputs of a detector's DETECTION_PROBES submodules on one forward."""
    import torch
    from helpers import flat_outputs  # tests/helpers.py (check puts tests/ on the path)

    outs, handles = [], []
    for probe in DETECTION_PROBES:
        try:
            module = model.get_submodule(probe)
        except AttributeError:
            continue
        handles.append(module.register_forward_hook(lambda m, a, out: outs.extend(flat_outputs(out))))
    with torch.no_grad():
        model(*args)
    for h in handles:
        h.remove()
    return outs


def check(name):
    """One model's measurements (the checks of tests/test_zoo.py's check_zoo_model)."""
    import torch
    from torch import nn

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import flat_outputs, randomize_batchnorms, zero_removed

    import slimcore

    result = {"model": name}
    phase = "build"
    try:
        t0 = time.perf_counter()
        model = x = None
        for size in (SIZE, None):  # 64x64 first, then the model's own size
            try:
                torch.manual_seed(0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model, x, head = build(name, size)
                    model = randomize_batchnorms(model).eval()
                    with torch.no_grad():
                        want = flat_outputs(model(*(x if isinstance(x, tuple) else (x,))))
                break
            except Exception as e:
                if size is None:
                    return dict(result, status="skipped", phase=phase, error=f"{type(e).__name__}: {first_line(e)}")
        result["input"] = list(x[0][0].shape if isinstance(x, tuple) else x.shape)
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        criterion = "bn_scale" if has_bn else "l1_filter"
        result["criterion"] = criterion
        result["params"] = sum(p.numel() for p in model.parameters())
        dense = copy.deepcopy(model)
        phase = "prune"
        t1 = time.perf_counter()
        report = slimcore.prune(model, x, ratio=RATIO, criterion=criterion, compensate=False)
        result["prune_s"] = round(time.perf_counter() - t1, 2)
        phase = "compare"
        zero_removed(dense, report.removed)
        args = x if isinstance(x, tuple) else (x,)
        with torch.no_grad():
            got, want = flat_outputs(model(*args)), flat_outputs(dense(*args))
        if name.startswith("tvdet:"):
            # Random-init detectors score boxes nearly alike, so the kept detections turn on float
            # ties: compare what the dense layers compute (backbone and FPN, dense heads) instead.
            result["detections_match"] = len(got) == len(want) and all(
                g.shape == w.shape and torch.allclose(g.float(), w.float(), rtol=1e-4, atol=1e-4) for g, w in zip(got, want))
            got, want = probe_outputs(model, args), probe_outputs(dense, args)
            # a feature map that lost channels cannot be lined up (the pruned channels are not the
            # only all-zero ones after a ReLU): only those that kept their widths are compared
            same = [(g, w) for g, w in zip(got, want) if g.shape == w.shape]
            result["probes_compared"] = f"{len(same)} of {len(want)}"
            got, want = [g for g, _ in same], [w for _, w in same]
        err = 0.0
        if len(got) != len(want) or not got:
            err = float("inf")
            result["mismatch"] = f"{len(got)} outputs vs {len(want)}"
        for g, w in zip(got, want):
            if g.shape != w.shape:
                err = float("inf")
                result["mismatch"] = f"output shape {list(g.shape)} vs {list(w.shape)}"
                break
            if w.is_floating_point() and w.numel():  # a detector may detect nothing
                scale = max(float(w.abs().max()), 1e-12)
                err = max(err, float((g - w).abs().max()) / scale)
        result["max_rel_error"] = err
        cut = 1 - report.params_after / report.params_before
        result["cut"] = round(cut, 4)
        result["removed_share"] = round(report.channels_removed_share, 4)
        normalised = [(p, t) for n, (p, t, bn) in report.prunable.items()
                      if bn and not (head and (n == head or n.startswith(head + ".")))]
        total = sum(t for _, t in normalised)
        result["bn_share"] = round(sum(p for p, _ in normalised) / total, 4) if total else None
        result["prunable_share"] = round(report.prunable_share, 4)
        result["notes"] = list(report.notes)[:12]
        result["seconds"] = round(time.perf_counter() - t0, 2)
        if err > REL_TOL:
            result["status"] = "inexact"
        elif criterion == "bn_scale" and result["bn_share"] is not None and result["bn_share"] < MIN_SHARE:
            result["status"] = "low_share"
        elif cut < MIN_CUT:
            result["status"] = "low_cut"
        else:
            result["status"] = "ok"
        return result
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{os.path.relpath(f.filename, ROOT)}:{f.lineno}" for f in reversed(tb)
                      if "slimcore" in f.filename), None)
        return dict(result, status="error", phase=phase, error=f"{type(e).__name__}: {first_line(e)}", where=where)


def worker():
    """Reads model names from stdin, prints START and RESULT lines (JSON) for the parent."""
    import torch

    torch.set_num_threads(1)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        print("START " + name, flush=True)
        print("RESULT " + json.dumps(check(name)), flush=True)


# ------------------------------------------------------------------------------------ the sweep


def run_all(names, limit, on_result):
    """Runs the names through worker processes; one that runs past ``limit`` on a model is killed."""
    pending = list(names)
    while pending:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", YOLO_OFFLINE="1")
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], cwd=ROOT, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        proc.stdin.write("\n".join(pending) + "\n")
        proc.stdin.close()
        current, started = None, None
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                if not line:  # the worker ended (done, or crashed on `current`)
                    proc.wait()
                    if current is not None:
                        on_result({"model": current, "status": "error", "phase": "crash",
                                   "error": f"worker exited with {proc.returncode}"})
                        pending.remove(current)
                    else:
                        pending = []
                    break
                if line.startswith("START "):
                    current, started = line[6:].strip(), time.monotonic()
                elif line.startswith("RESULT "):
                    result = json.loads(line[7:])
                    on_result(result)
                    pending.remove(result["model"])
                    current = None
                    if not pending:
                        proc.wait()
                        break
            if current is not None and time.monotonic() - started > limit:
                proc.kill()
                proc.wait()
                on_result({"model": current, "status": "too_slow", "error": f"over {limit} s"})
                pending.remove(current)
                break


def summary(results):
    by_status = collections.Counter(r["status"] for r in results.values())
    lines = ["# Zoo sweep (CPU, one thread)", "",
             f"`benchmarks/zoo_sweep.py`: slimcore.prune(ratio={RATIO}, compensate=False) on {len(results)} models "
             f"(one per timm family, plus torchvision), {SIZE}x{SIZE} inputs where the model runs at that size.", "",
             "| status | models |", "|---|---|"]
    lines += [f"| {s} | {n} |" for s, n in by_status.most_common()]
    lines += ["", "| model | status | criterion | cut | BN share | detail |", "|---|---|---|---|---|---|"]
    for name in sorted(results, key=lambda n: (results[n]["status"] == "ok", results[n]["status"], n)):
        r = results[name]
        detail = r.get("error") or r.get("mismatch") or ""
        if r["status"] == "inexact" and not r.get("mismatch"):
            detail = f"max rel error {r['max_rel_error']:.2e}"
        if r.get("where"):
            detail += f" ({r['where']})"
        detail = detail.replace("|", "\\|")
        cut = f"{r['cut']:.0%}" if "cut" in r else ""
        share = f"{r['bn_share']:.0%}" if r.get("bn_share") is not None else ""
        lines.append(f"| {name} | {r['status']} | {r.get('criterion', '')} | {cut} | {share} | {detail} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names (timm names; tv:, tvseg:, tvdet: for torchvision)")
    parser.add_argument("--limit", type=float, default=120, help="seconds per model")
    parser.add_argument("--max-params", type=float, default=60e6)
    parser.add_argument("--out", default=os.path.join(RESULTS, "zoo-sweep-cpu.json"))
    parser.add_argument("--resume", action="store_true", help="keep the results in --out, run the missing models")
    parser.add_argument("--list", action="store_true", help="print the chosen models and exit")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker()
    names = args.only or chosen_models(args.max_params, os.path.join(RESULTS, "zoo-sweep-param-counts.json"))
    if args.list:
        print("\n".join(names))
        return
    results = {}
    if args.resume and os.path.exists(args.out):
        results = {r["model"]: r for r in json.load(open(args.out))["results"]}
        names = [n for n in names if n not in results]

    def on_result(result):
        results[result["model"]] = result
        print(f"{result['model']:45s} {result['status']:9s} {result.get('error') or result.get('max_rel_error', '')}",
              flush=True)
        import torch
        import timm
        import torchvision

        payload = {"command": "python benchmarks/zoo_sweep.py", "ratio": RATIO, "size": SIZE, "limit_s": args.limit,
                   "versions": {"torch": torch.__version__, "timm": timm.__version__,
                                "torchvision": torchvision.__version__},
                   "counts": dict(collections.Counter(r["status"] for r in results.values())),
                   "results": sorted(results.values(), key=lambda r: r["model"])}
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(summary(results))

    run_all(names, args.limit, on_result)


if __name__ == "__main__":
    main()
