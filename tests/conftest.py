"""Shared test setup.

* Refuses to run against the reference fallback: if the compiled extension is not loaded, every
  "kernel vs reference" test would compare the reference with itself and pass vacuously.
  (Run ``pytest`` after ``pip install .``; set SLIMCORE_ALLOW_FALLBACK=1 to test the fallback.)
* Sets SLIMCORE_CPU_MIN_TASK_US small (before slimcore is imported), so the CPU kernels split
  even the tests' small tensors over threads.
* Sets YOLO_OFFLINE=1 before any test imports ultralytics.
* ``helpers.devices()`` parametrises tests over CPU and CUDA; CUDA cases carry the ``cuda`` marker and are
  skipped with a reason when no GPU is visible, so a CPU-only run never claims GPU results.
"""

import os

# The CPU kernels keep work under ~50 us per task on one thread (csrc/cpu/cost_model.h); the
# tests' tensors are small, so shrink the task size to still run the multi-thread paths.
os.environ.setdefault("SLIMCORE_CPU_MIN_TASK_US", "0.01")
# ultralytics decides at import whether it is online (a DNS lookup, then update checks and
# telemetry): the tests never use the network.
os.environ.setdefault("YOLO_OFFLINE", "1")

import pytest
import torch

import slimcore

def pytest_configure(config):
    info = slimcore.build_info()
    if not info["extension_loaded"] and os.environ.get("SLIMCORE_ALLOW_FALLBACK") != "1":
        raise pytest.UsageError(
            f"slimcore's compiled ops are not loaded ({info['load_error']}); the tests would compare the "
            "reference with itself. Install slimcore (pip install .) and run `pytest` (not `python -m pytest` "
            "from the source tree, which imports the unbuilt sources), or set SLIMCORE_ALLOW_FALLBACK=1."
        )


def pytest_report_header(config):
    info = slimcore.build_info()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible (CUDA tests skip)"
    return [f"slimcore build: {info}", f"GPU: {gpu}"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
