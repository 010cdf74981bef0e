"""slimcore: C++/CUDA-accelerated network slimming for PyTorch.

The public API, re-exported; see README.md for the architecture.
"""

__version__ = "0.1.0"

from . import models, nn, penalties, reference
from ._ext import build_info
from ._io import CheckpointError
from .criteria import FilterHistory, magnitude_prune
from .deploy import deploy
from .fold import fold_bn
from .graph import TraceFailure
from .nn import SlimBatchNorm1d, SlimBatchNorm2d, convert_bn, revert_bn, set_penalty_scale
from .penalties import L1, L2, MCP, SCAD, TL1, Lp, LpNorm
from .profile import profile
from .prune import PruneReport, load_pruned, prune, ratio_for_channels, ratio_for_flops, ratio_for_latency, save_pruned
from .step import SparseBNStep, bn_weights, sparse_bn_step, sparsity_loss
from .widths import LatencyTable

__all__ = [
    "__version__",
    "build_info",
    "models",
    "nn",
    "penalties",
    "reference",
    "L1",
    "L2",
    "Lp",
    "LpNorm",
    "TL1",
    "SCAD",
    "MCP",
    "SparseBNStep",
    "bn_weights",
    "sparse_bn_step",
    "sparsity_loss",
    "prune",
    "ratio_for_channels",
    "ratio_for_flops",
    "ratio_for_latency",
    "LatencyTable",
    "PruneReport",
    "save_pruned",
    "load_pruned",
    "CheckpointError",
    "profile",
    "magnitude_prune",
    "FilterHistory",
    "TraceFailure",
    "fold_bn",
    "deploy",
    "SlimBatchNorm1d",
    "SlimBatchNorm2d",
    "convert_bn",
    "revert_bn",
    "set_penalty_scale",
]
