"""Loads the compiled ops (``slimcore._C``) and reports how slimcore was built.

If the extension is missing or was built against another torch, slimcore says so once, names the
fix, and runs the pure-PyTorch reference ops instead (same results, slower). It never imports a
binary built for another torch: that can crash the interpreter instead of raising.
"""

import warnings

import torch

_OPS = (
    "penalty_subgradient_", "penalty_prox_", "penalty_value", "channel_gather", "channel_gather_",
    "batch_norm", "batch_norm_backward", "channel_affine",
)
_FIX = (
    "Falling back to slimcore's pure-PyTorch reference ops (same results, slower). "
    "Fix: rebuild slimcore against the installed torch, from its source directory: "
    "pip install --no-build-isolation ."
)

try:
    from ._build_config import BUILD_CONFIG
except ImportError:  # a source checkout that was never built
    BUILD_CONFIG = None


def _load():
    """Returns None on success, else why the compiled ops are unavailable."""
    if BUILD_CONFIG is None:
        return "slimcore's compiled extension was never built (no slimcore/_build_config.py)"
    if BUILD_CONFIG["torch_version"] != torch.__version__:
        return (
            f"slimcore._C was built against torch {BUILD_CONFIG['torch_version']} "
            f"but torch {torch.__version__} is installed"
        )
    try:
        from . import _C  # noqa: F401  (importing registers the ops)
    except (ImportError, OSError) as exc:
        return f"slimcore._C could not be loaded ({exc})"
    # a binary built from older sources (an editable install not rebuilt after a pull) lacks ops
    missing = [op for op in _OPS if not hasattr(torch.ops.slimcore, op)]
    if missing:
        return f"slimcore._C lacks the ops {', '.join(missing)} (it was built from older sources)"
    return None


LOAD_ERROR = _load()
LOADED = LOAD_ERROR is None
if not LOADED:
    warnings.warn(f"{LOAD_ERROR}. {_FIX}", RuntimeWarning, stacklevel=2)


def _has_kernels(dispatch_key):
    if not LOADED:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"slimcore::{op}", dispatch_key) for op in _OPS)


def build_info():
    """How slimcore was built and what is running.

    Keys: ``extension_loaded`` (the compiled ops are in use), ``load_error`` (why not, else None),
    ``cpu_kernels`` / ``cuda_kernels`` (every op has a registered CPU / CUDA kernel, read from the
    dispatcher), ``built_with_torch``, ``running_torch``, ``cuda_version`` (the CUDA the kernels
    were compiled for), ``cuda_arch_list``.
    """
    config = BUILD_CONFIG or {}
    return {
        "extension_loaded": LOADED,
        "load_error": LOAD_ERROR,
        "cpu_kernels": _has_kernels("CPU"),
        "cuda_kernels": _has_kernels("CUDA"),
        "built_with_torch": config.get("torch_version"),
        "running_torch": torch.__version__,
        "cuda_version": config.get("torch_cuda_version") if config.get("with_cuda") else None,
        "cuda_arch_list": config.get("cuda_arch_list"),
    }
