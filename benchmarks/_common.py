"""What the benchmark scripts share: interleaved timing, device selection, result files."""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch

import slimcore
from slimcore._io import atomic_write_text

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def timed(fn, calls, device, setup=None):
    """Seconds per call over `calls` calls of fn. With `setup`, it runs before every call, untimed.
    On CUDA: CUDA events around the calls (or a synchronize around each one, with setup)."""
    if setup is None and device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if setup is None:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls
    total = 0.0
    for _ in range(calls):
        setup()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        total += time.perf_counter() - t0
    return total / calls


def interleaved(candidates, device, repeats, round_seconds, warmup_calls=20, min_calls=5):
    """{name: (median_us, iqr_us)} of each candidate's time per call.

    candidates: {name: fn} or {name: (fn, setup)}. Each is warmed up, its round is sized to about
    round_seconds, then `repeats` rounds run in turn over all candidates, so machine drift hits
    every candidate alike.
    """
    cands = {n: c if isinstance(c, tuple) else (c, None) for n, c in candidates.items()}
    calls = {}
    for name, (fn, setup) in cands.items():
        timed(fn, warmup_calls, device, setup)
        per_call = timed(fn, warmup_calls, device, setup)
        calls[name] = max(min_calls, int(round_seconds / max(per_call, 1e-7)))
    samples = {name: [] for name in cands}
    for _ in range(repeats):
        for name, (fn, setup) in cands.items():
            samples[name].append(timed(fn, calls[name], device, setup) * 1e6)
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0], s[0], s[0]]
        out[name] = (statistics.median(s), q[2] - q[0])
    return out


def selected_devices(choice, script):
    """["cpu"] / ["cuda"] / both for "all" (CUDA only when a GPU is visible)."""
    if choice == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{script}: --device cuda but no CUDA GPU is visible")
    devices = ["cpu", "cuda"] if choice == "all" else [choice]
    return [d for d in devices if d == "cpu" or torch.cuda.is_available()]


def warn_if_reference():
    info = slimcore.build_info()
    if not info["extension_loaded"]:
        print(f"WARNING: slimcore's compiled ops are not loaded ({info['load_error']}); timing the reference")
    return info


def start_cpu_run(threads):
    """A CPU benchmark's start: ``threads`` (default: every core), UserWarnings off, a warning
    when the compiled ops are not loaded; returns the environment record for the results."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    warnings.filterwarnings("ignore", category=UserWarning)
    warn_if_reference()
    return environment(torch.device("cpu"))


def git_commit():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device):
    """The fields every result file carries."""
    return dict(device=device_name(device), device_type=device.type, torch=torch.__version__,
                threads=torch.get_num_threads(), commit=git_commit(), python=platform.python_version(),
                slimcore_build=slimcore.build_info())


def write_json(path, payload):
    atomic_write_text(path, json.dumps(payload, indent=2))


_HOG = "import time\nend = time.time() + {seconds}\nx = 0\nwhile time.time() < end:\n    x += 1\n"


class Hog:
    """``--busy``: CPU-burning processes on the other cores while timing, as data-loader workers
    keep every core busy during training. Bounded: each process stops by itself after
    ``max_seconds`` even if this one dies, and is killed when the block exits."""

    def __init__(self, processes=None, max_seconds=1800):
        self.n = processes if processes is not None else max(1, (os.cpu_count() or 2) - 1)
        self.max_seconds = max_seconds
        self.procs = []

    def __enter__(self):
        code = _HOG.format(seconds=self.max_seconds)
        self.procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.n)]
        time.sleep(0.3)  # let them start spinning
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []


def idle_and_busy(measure, busy, hog_processes=None):
    """(idle result, busy result or None): ``measure()`` run as is, then with a :class:`Hog`."""
    idle = measure()
    if not busy:
        return idle, None
    with Hog(hog_processes):
        return idle, measure()
