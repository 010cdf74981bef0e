"""Latency-aware channel counts: ``slimcore.prune(..., round_to="auto")``.

A conv's time does not fall smoothly with its width: GEMM and direct-conv kernels work in blocks
of 4/8/16/... channels, so 61 channels can cost as much as 64, or more. ``round_to=N`` snaps every
layer to a multiple of N whether it helps or not. ``round_to="auto"`` measures instead:

1. the criterion decides how many channels k each layer keeps (as with ``round_to=1``);
2. per layer, the candidate widths are k and k rounded up to multiples of 4, 8, 16, 32 and 64
   (never above the layer's size, never below k: accuracy is never traded, only channels the
   criterion would have removed are kept);
3. a candidate's cost is the measured time of every conv/linear that produces the layer's channels
   (its output width) or reads them (its input width), at the current widths of their other side;
4. coordinate descent over the layers (two sweeps) moves a layer to its fastest candidate when
   that beats the current choice by ``margin`` (5%: timing noise must not buy FLOPs);
5. the whole model is then checked (``prune(..., check_latency=True)``, the default): copies
   pruned at these per-layer widths and at uniform ``round_to`` 1, 8 and 16 (``MODEL_ROUND_TO``)
   are timed against each other, interleaved, and the fastest is used if it beats ``round_to=1``
   by ``MODEL_MARGIN``, else ``round_to=1``'s widths. Standalone layer timings miss what a whole
   forward adds (BatchNorm, activations, cache effects) and per-layer gains below the 5% margin
   that add up over many layers (measured: VGG-19 at batch 64, channels_last, where round_to=8
   was 7% faster than round_to=1 and the per-layer widths were not), so only this check makes
   "auto is never slower than round_to=1" hold as measured (``report.latency_check``).

Timings come from a :class:`LatencyTable`: the lower quartile of repeated forward calls of a
standalone layer of that shape, interleaved with the other candidates of the same layer, per device, dtype, batch, input size, memory format and thread count, cached
in memory and in a JSON file (``$SLIMCORE_CACHE_DIR`` or ``~/.cache/slimcore``), so a model is
measured once per device. What is not timed: BatchNorm, activations and other element-wise work,
which scale linearly with width (step 5 times them with the rest), and the benchmark
(benchmarks/latency.py --round-to auto) measures the whole model.
"""

import json
import os
import platform
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .._io import atomic_write_text
from .decide import round_up

STEPS = (4, 8, 16, 32, 64)
MODEL_ROUND_TO = (1, 8, 16)  # uniform roundings the whole-model check also times
MODEL_MARGIN = 0.02  # a candidate must make the whole model this much faster than round_to=1
_TIMED_KINDS = ("conv", "grouped_conv", "depthwise_conv", "linear")


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


class LatencyTable:
    """Measured forward time of standalone conv/linear layers, by shape, cached.

    Args:
        device: where to time (default: CPU).
        dtype: activation and weight dtype (default float32).
        batch: batch size to time at (default: the example inputs' batch, set by prune).
        channels_last: time 4-D inputs in NHWC.
        cache_dir: directory of the JSON cache (default ``$SLIMCORE_CACHE_DIR`` or
            ``~/.cache/slimcore``); None with ``persist=False`` keeps it in memory only.
        min_seconds, min_runs: each shape runs at least this often and, together, this long per shape.
    """

    def __init__(self, device="cpu", dtype=torch.float32, batch=None, channels_last=False, cache_dir=None,
                 persist=True, min_seconds=0.05, min_runs=5):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype, self.batch, self.channels_last = dtype, batch, channels_last
        self.min_seconds, self.min_runs = min_seconds, min_runs
        self.measured = 0  # timings taken (not from the cache) by this table
        self.entries = {}
        self.path = None
        if persist:
            cache_dir = cache_dir or os.environ.get("SLIMCORE_CACHE_DIR") or os.path.join(
                os.path.expanduser("~"), ".cache", "slimcore")
            tag = "".join(c if c.isalnum() else "-" for c in _device_name(self.device))[:80]
            self.path = os.path.join(cache_dir, f"latency-{self.device.type}-{tag}-torch{torch.__version__}.json")
            self._load()

    def _load(self):
        try:
            with open(self.path) as f:
                data = json.load(f)
            self.entries = {k: float(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError, TypeError):
            self.entries = {}  # no cache yet, or an unreadable one: measure again

    def save(self):
        if self.path is None:
            return
        try:  # atomic: concurrent writers never leave a half-written cache
            atomic_write_text(self.path, json.dumps(self.entries, indent=0, sort_keys=True))
        except OSError as exc:  # e.g. a read-only home: the timings stay in memory for this table
            warnings.warn(f"slimcore: cannot write the latency cache {self.path} ({exc}); set SLIMCORE_CACHE_DIR "
                          "to a writable directory to keep timings between runs")

    def key(self, layer, cin, cout, in_shape):
        spatial = "x".join(str(s) for s in in_shape[2:])
        return (f"{layer.describe()}|in={cin}|out={cout}|batch={self.batch}|spatial={spatial}|{self.dtype}"
                f"|cl={int(self.channels_last)}|threads={torch.get_num_threads()}")

    def time(self, layer, cin, cout, in_shape):
        """Seconds per forward of ``layer`` (a TimedLayer) at these widths; measured once. A layer
        with no input or output channel left (inside a collapsed block) costs nothing."""
        if cin == 0 or cout == 0:
            return 0.0
        k = self.key(layer, cin, cout, in_shape)
        if k not in self.entries:
            self.prefetch([(layer, cin, cout, in_shape)])
        return self.entries[k]

    def prefetch(self, requests):
        """Measures every (layer, cin, cout, in_shape) not in the table yet, interleaved: rounds
        run each shape in turn, so drift and neighbours' noise hit all candidates alike."""
        todo = {}
        for layer, cin, cout, in_shape in requests:
            if cin == 0 or cout == 0:
                continue
            k = self.key(layer, cin, cout, in_shape)
            if k not in self.entries and k not in todo:
                todo[k] = (layer, cin, cout, in_shape)
        if todo:
            for k, seconds in zip(todo, self.measure([r for r in todo.values()])):
                self.entries[k] = seconds
            self.measured += len(todo)

    def measure(self, requests):
        """Seconds per forward of each (layer, cin, cout, in_shape): the lower quartile over
        interleaved rounds."""
        runs, inputs = [], {}  # candidates reading the same input shape share one tensor (memory)
        for layer, cin, cout, in_shape in requests:
            shape = layer.input_shape(cin, in_shape, self.batch or in_shape[0])
            if shape not in inputs:
                x = torch.randn(shape, device=self.device, dtype=self.dtype)
                inputs[shape] = x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x
            runs.append((layer.instantiate(cin, cout, self.device, self.dtype, self.channels_last), inputs[shape]))
        return interleaved_seconds([lambda m=m, x=x: m(x) for m, x in runs], self.device, self.min_runs,
                                    self.min_seconds)

    def time_models(self, models, example_inputs, min_runs=10, min_seconds=0.2):
        """Seconds per forward of each whole model (eval mode, no grad), at this table's device,
        dtype, batch (example inputs repeated along dim 0) and memory format: the lower quartile
        of interleaved rounds. The models are moved there in place: pass copies."""
        def batched(x):
            if not torch.is_tensor(x):
                return x
            if self.batch and x.dim() > 0 and x.shape[0] != self.batch:
                x = x[torch.arange(self.batch, device=x.device) % x.shape[0]]
            x = x.to(self.device, dtype=self.dtype if x.is_floating_point() else None)
            return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

        inputs = tuple(batched(x) for x in example_inputs)
        fns = []
        for m in models:
            m.to(self.device, self.dtype).eval()
            if self.channels_last:
                m.to(memory_format=torch.channels_last)
            fns.append(lambda m=m: m(*inputs))
        return interleaved_seconds(fns, self.device, min_runs, min_seconds)


def interleaved_seconds(fns, device, min_runs, min_seconds, max_runs=200, percentile=25):
    """Seconds per call of each fn: a percentile (default the lower quartile: interference on a
    shared machine only adds time) over interleaved rounds (drift hits every candidate alike), at
    least ``min_runs`` rounds and ``min_seconds`` per fn, at most ``max_runs``."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = [[] for _ in fns]
    with torch.no_grad():
        for fn in fns:
            for _ in range(2):
                fn()
        sync()
        start = time.perf_counter()
        while len(times[0]) < min_runs or (time.perf_counter() - start < min_seconds * len(fns)
                                           and len(times[0]) < max_runs):
            for fn, ts in zip(fns, times):
                t0 = time.perf_counter()
                fn()
                sync()
                ts.append(time.perf_counter() - t0)
    return [float(np.percentile(ts, percentile)) for ts in times]


@dataclass
class TimedLayer:
    """A conv or linear of the model, as a shape to time at other widths."""

    name: str
    module: nn.Module
    kind: str
    out_classes: np.ndarray  # class of each output channel
    in_classes: np.ndarray  # class of each input channel (all groups)
    in_shape: tuple

    def conv_class(self):
        # The torch.nn conv of the module's dimension: a CompensatedConv (already pruned) or a user's
        # subclass times as the plain conv it computes, and shares its cache entries.
        return next(c for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(self.module, c))

    def describe(self):
        m = self.module
        if isinstance(m, nn.Linear):
            return f"linear|bias={m.bias is not None}"
        groups = "dw" if self.kind == "depthwise_conv" else m.groups
        return (f"{self.conv_class().__name__}|k={tuple(m.kernel_size)}|s={tuple(m.stride)}|p={m.padding}"
                f"|d={tuple(m.dilation)}|g={groups}|bias={m.bias is not None}|pm={m.padding_mode}")

    def widths(self, kept_class):
        return int(kept_class[self.in_classes].sum()), int(kept_class[self.out_classes].sum())

    def input_shape(self, cin, in_shape, batch):
        return (batch, cin) if isinstance(self.module, nn.Linear) else (batch, cin, *in_shape[2:])

    def instantiate(self, cin, cout, device, dtype, channels_last):
        m = self.module
        factory = dict(device=device, dtype=dtype)
        if isinstance(m, nn.Linear):
            return nn.Linear(cin, cout, bias=m.bias is not None, **factory).eval()
        groups = cin if self.kind == "depthwise_conv" else m.groups
        module = self.conv_class()(cin, cout, m.kernel_size, m.stride, m.padding, m.dilation, groups,
                                   m.bias is not None, m.padding_mode, **factory)
        if channels_last and len(m.kernel_size) == 2:
            module = module.to(memory_format=torch.channels_last)
        return module.eval()


@dataclass
class WidthChoice:
    """One layer's channel count: what the criterion asked, what was chosen, and the timings."""

    layer: str  # the producing modules' names
    asked: int
    chosen: int
    size: int
    seconds: dict = field(default_factory=dict)  # candidate width -> summed time of the layers it touches

    def as_dict(self):
        return {"layer": self.layer, "asked": self.asked, "chosen": self.chosen, "size": self.size,
                "ms": {str(w): round(s * 1e3, 4) for w, s in self.seconds.items()}}


def timed_layers(graph, classes):
    layers = []
    for mc in graph.modules.values():
        shape = graph.in_shapes.get(mc.name)
        if mc.kind not in _TIMED_KINDS or shape is None:
            continue
        if mc.kind == "linear" and len(shape) != 2:
            continue  # a Linear over a sequence: not timed (rare in CNNs)
        layers.append(TimedLayer(mc.name, mc.module, mc.kind, classes.of_atom[mc.out_atoms],
                                 classes.of_atom[mc.in_atoms], shape))
    return layers


def choose_widths(classes, removed, groups, allowed, table, margin=0.05, sweeps=2):
    """Widens layers of ``groups`` ({layer id: class ids}) in ``removed`` (in place) to their
    fastest measured candidate width; returns the list of WidthChoice."""

    layers = timed_layers(classes.graph, classes)
    touching = {}  # layer id -> timed layers whose input or output holds its classes
    for t in layers:
        for lid in set(classes.layer[t.out_classes].tolist()) | set(classes.layer[t.in_classes].tolist()):
            touching.setdefault(lid, []).append(t)
    plans = {}
    for lid, members in groups.items():
        if lid not in touching:
            continue
        m = int(classes.multiplicity[members[0]])
        n = len(members)
        kept = int((~removed[members]).sum())
        if kept == 0 or kept == n:
            continue
        spare = members[removed[members] & allowed[members]]
        spare = spare[np.argsort(-classes.score[spare], kind="stable")]  # best first, as _restore does
        candidates = sorted({kept} | {min(kept + len(spare), round_up(kept, m, s, n)) for s in STEPS})
        plans[lid] = (kept, n, spare, candidates)
    if not plans:
        return []
    start_removed = removed.copy()

    def requests(lid):
        kept_class = ~removed
        return [(t, *t.widths(kept_class), t.in_shape) for t in touching[lid]]

    def set_width(lid, width):
        kept, _, spare, _ = plans[lid]
        removed[spare] = start_removed[spare]
        removed[spare[: width - kept]] = False

    chosen = {lid: p[0] for lid, p in plans.items()}
    timings = {lid: {} for lid in plans}
    for _ in range(sweeps):
        changed = False
        for lid, (kept, n, spare, candidates) in plans.items():
            needed = {}
            for width in candidates:
                set_width(lid, width)
                needed[width] = requests(lid)
            table.prefetch([r for rs in needed.values() for r in rs])
            seconds = {w: sum(table.time(*r) for r in rs) for w, rs in needed.items()}
            timings[lid] = seconds
            best = min(candidates, key=lambda w: (seconds[w], w))
            current = chosen[lid]
            if best != current and seconds[best] < (1 - margin) * seconds[current]:
                chosen[lid], changed = best, True
            set_width(lid, chosen[lid])
        if not changed:
            break
    table.save()
    out = []
    for lid, (kept, n, _, _) in plans.items():
        names = [t.name for t in touching[lid] if (classes.layer[t.out_classes] == lid).any()]
        m = int(classes.multiplicity[groups[lid][0]])
        out.append(WidthChoice(",".join(names) or f"layer {lid}", kept * m, chosen[lid] * m, n * m,
                               {w * m: s for w, s in timings[lid].items()}))
    return out
