"""The modules slimcore puts into models, in one namespace.

Training with the penalty: ``SlimBatchNorm1d/2d``, ``convert_bn``, ``revert_bn``,
``set_penalty_scale`` (slimcore/sparsity/batchnorm.py). Pruning artefacts: ``SelectedBatchNorm*``,
``CompensatedConv*``, ``ResidualConstant`` (slimcore/pruning/modules.py). Inference:
``ChannelAffine`` (slimcore/inference/modules.py), ``Conv2dAdd`` and ``Conv2dAct``
(slimcore/inference/deploy_fusion.py).
"""

from .inference.deploy_fusion import Conv2dAct, Conv2dAdd
from .inference.modules import ChannelAffine
from .pruning.modules import (
    CompensatedConv1d,
    CompensatedConv2d,
    CompensatedConv3d,
    ResidualConstant,
    SelectedBatchNorm1d,
    SelectedBatchNorm2d,
    SelectedBatchNorm3d,
    SelectedSlimBatchNorm1d,
    SelectedSlimBatchNorm2d,
    set_compensation,
    set_input_selection,
)
from .sparsity.batchnorm import SlimBatchNorm1d, SlimBatchNorm2d, convert_bn, revert_bn, set_penalty_scale

__all__ = ["SlimBatchNorm1d", "SlimBatchNorm2d", "convert_bn", "revert_bn", "set_penalty_scale",
           "SelectedBatchNorm1d", "SelectedBatchNorm2d", "SelectedBatchNorm3d", "SelectedSlimBatchNorm1d",
           "SelectedSlimBatchNorm2d", "CompensatedConv1d", "CompensatedConv2d", "CompensatedConv3d",
           "ResidualConstant", "set_input_selection", "set_compensation", "ChannelAffine", "Conv2dAdd",
           "Conv2dAct"]
