"""slimcore: C++/CUDA-accelerated network slimming for PyTorch.

The public API, re-exported. The package follows the pipeline: sparsity/ (train with the
penalty), pruning/ (capture, decide, apply, report), inference/ (the deployed form), pipeline/
(data, training, the CLI); see docs/architecture.md.
"""

__version__ = "0.1.0"

import sys

from . import models, nn, reference
from ._ext import build_info
from ._io import CheckpointError
from .inference.deploy import deploy
from .inference.fold import fold_bn
from .nn import SlimBatchNorm1d, SlimBatchNorm2d, convert_bn, revert_bn, set_penalty_scale
from .pruning.capture import TraceFailure
from .pruning.checkpoint import load_pruned, save_pruned
from .pruning.criteria import FilterHistory, magnitude_prune
from .pruning.profile import profile
from .pruning.prune import prune
from .pruning.report import PruneReport
from .pruning.latency_select import prune_for_latency
from .pruning.search import ratio_for_channels, ratio_for_flops, ratio_for_latency
from .pruning.widths import LatencyTable
from .sparsity import penalties
from .sparsity.penalties import L1, L2, MCP, SCAD, TL1, Lp, LpNorm
from .sparsity.step import SparseBNStep, bn_weights, sparse_bn_step, sparsity_loss

# ``import slimcore.penalties`` keeps working (the module lives in slimcore/sparsity/ now).
sys.modules[__name__ + ".penalties"] = penalties

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
    "prune_for_latency",
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
