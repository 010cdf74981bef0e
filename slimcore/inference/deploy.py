"""The inference form of a (slimmed or dense) model: ``slimcore.deploy``.

Five rewrites of a copy of the model, each exact up to rounding:

1. Every BatchNorm that normalises a conv/linear output nothing else reads folds into that layer
   (slimcore.fold_bn): no pass of its own.
2. Every other eval-mode BatchNorm (a selection BN of a slimmed pre-activation ResNet or DenseNet,
   or a plain BN on a residual stream or a concatenation) becomes one ``ChannelAffine``: gather its
   input channels, scale, shift and, when the traced graph shows the BN's output is read by one
   activation and nothing else, that activation too, in one pass of ``slimcore::channel_affine``
   (a BN, an index_select and a ReLU are three passes). The activation is only fused where the
   model traces with torch.fx; otherwise the BNs are replaced module by module and the
   activations stay. Identity modules left by folding are dropped from the traced graph.
3. Every residual add of a conv's output that nothing else reads becomes one call of that conv
   with an add post-op (inference/deploy_fusion.py's Conv2dAdd, oneDNN on the CPU), with the ReLU
   that alone reads the sum: the adds run on the full-width residual stream slimming keeps, so
   unfused they do not shrink with the FLOPs (traced models only).
4. Every other conv becomes a Conv2dAct with the activation that alone reads its output (ReLU,
   ReLU6, Hardswish, SiLU): on channels_last input one oneDNN conv with the activation as a
   post-op, no separate pass, and no fallback to ATen's im2col path for 1x1 convs at small batch
   on one thread (traced models only).
5. The memory format (NCHW or channels_last) is the faster of the two, timed on the example
   inputs; optionally ``torch.compile``.

``portable=True`` makes the fused modules run plain ATen ops instead of slimcore's op, so that
ONNX exporters and runtimes that do not know slimcore's library take the model.
"""

import copy

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .. import reference
from .._modules import parent_module
from ..pruning.modules import LEAF_MODULES, SELECTED_BATCHNORM
from ..pruning.widths import interleaved_seconds
from .deploy_fusion import fuse_conv_activations, fuse_conv_adds, module_call_counts, sole_activation
from .fold import fold_bn
from .modules import ChannelAffine

__all__ = ["deploy"]

# BatchNorm types whose eval forward is the affine map alone (and their selecting twins).
_BATCHNORMS = tuple(SELECTED_BATCHNORM) + tuple(SELECTED_BATCHNORM.values())

# Activations the fused op computes, by how the traced graph calls them.
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.SiLU: "silu"}
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6",
                         F.hardswish: "hardswish", F.silu: "silu"}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu"}

_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


class _Tracer(torch.fx.Tracer):
    """Keeps BatchNorms (slimcore's selecting and slim ones too) and slimcore's pruning modules as
    single call_module nodes: the BNs are what deploy replaces."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, (*_BATCHNORMS, *LEAF_MODULES)) or super().is_leaf_module(m, qualname)


def _replaceable(m):
    """An eval-mode BN whose function is the affine map of its running statistics."""
    return type(m) in _BATCHNORMS and not m.training and m.running_mean is not None and m.running_var is not None


def _activation_of(node, modules, source):
    """The activation name if ``node`` computes one of the fused activations of ``source`` alone."""
    if not node.args or node.args[0] is not source or len(node.args) > 1 or set(node.kwargs) - {"inplace"}:
        return None
    if node.op == "call_module":
        return _ACTIVATION_MODULES.get(type(modules[node.target]))
    if node.op == "call_function":
        return _ACTIVATION_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _ACTIVATION_METHODS.get(node.target)
    return None


def _fuse_traced(model, graph, portable, fuse_activations):
    """The model as a torch.fx GraphModule of its traced ``graph``, with its BNs replaced by
    ChannelAffine (activations fused where the graph allows) and identities dropped."""
    gm = torch.fx.GraphModule(model, graph, model.__class__.__name__)
    modules = dict(gm.named_modules())
    calls = module_call_counts(gm)
    fused, activations, replaced = [], {}, {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = modules[node.target]
        if isinstance(m, nn.Identity):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            continue
        if not _replaceable(m):
            continue
        act, user = "none", None
        # A BN called more than once shares one module: fuse an activation only into a single call.
        if fuse_activations and calls[node.target] == 1:
            act, user = sole_activation(node, modules, _activation_of, reference.ACTIVATIONS)
        if node.target not in replaced:
            replaced[node.target] = ChannelAffine.from_batchnorm(m, act, portable)
            gm.add_submodule(node.target, replaced[node.target])
            fused.append(node.target)
        if act != "none":
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
            activations[node.target] = act
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm, fused, activations


def _fuse_modules(model, portable):
    """The fallback for models torch.fx cannot trace: every replaceable BN becomes a ChannelAffine
    in place (activations stay: without a graph nothing shows who reads the BN's output)."""
    fused = []
    for name, m in list(model.named_modules()):
        if name and _replaceable(m):
            parent, attr = parent_module(model, name)
            setattr(parent, attr, ChannelAffine.from_batchnorm(m, "none", portable))
            fused.append(name)
    return model, fused


@torch.no_grad()
def _compact_storage(model):
    """Pruned weights keep their dense storage (channel_gather_ compacts them in place), and deepcopy
    copies it whole: the inference form holds only the bytes it uses (torch.export.save also
    stores such views awkwardly)."""
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None and p.untyped_storage().nbytes() > p.numel() * p.element_size():
                p.data = p.data.clone()
        for name, b in mod._buffers.items():
            if b is not None and b.untyped_storage().nbytes() > b.numel() * b.element_size():
                mod._buffers[name] = b.clone()


def _run(model, inputs):
    with torch.inference_mode():
        return model(*inputs)


def _time_candidates(candidates, inputs, device, rounds):
    """{name: median seconds per call} over ``rounds`` interleaved rounds."""
    fns = [lambda m=m: _run(m, inputs) for m in candidates.values()]
    seconds = interleaved_seconds(fns, device, min_runs=rounds, min_seconds=0.0, max_runs=rounds, percentile=50)
    return dict(zip(candidates, seconds))


def deploy_fn(example_inputs, **options):
    """``model -> slimcore.deploy(model, example_inputs, **options)``: the ``deploy`` hook of
    ``ratio_for_latency`` and ``prune(round_to="auto")``, so that dense and pruned copies are timed
    in the form they will run in (pass ``memory_format`` to time every candidate in one format)."""
    def deploy_model(model):
        return deploy(model, example_inputs, **options)
    return deploy_model


def _model_device(model):
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def deploy(model, example_inputs, device=None, memory_format="auto", compile=False, *, portable=False,
           dtype=None, fuse_activations=True, fuse_adds=True, fuse_conv_acts=True, timing_rounds=5):
    """The inference form of ``model`` as a new module (``model`` itself is not changed).

    BatchNorms fold into the conv/linear before them where that is exact; every other eval-mode
    BatchNorm (selection BNs of slimmed pre-activation ResNets and DenseNets, BNs on residual
    streams or concatenations) becomes one :class:`slimcore.nn.ChannelAffine` running
    ``slimcore::channel_affine`` (gather, scale/shift and the activation that alone reads the BN, in
    one pass). The result computes what the eval-mode ``model`` computes, up to rounding.

    Args:
        example_inputs: a tensor or a tuple of the model's positional inputs, on any device; the
            memory format is timed on them, so give the batch size you will run.
        device: where the deployed model lives (default: ``model``'s device).
        memory_format: "auto" (time NCHW and channels_last once on the example inputs, keep the
            faster), "contiguous" or "channels_last" (4-D weights only; the model then produces
            channels_last activations from NCHW inputs).
        compile: ``torch.compile`` the result (after the memory format is chosen).
        portable: the fused modules use plain ATen ops (for ONNX export and runtimes without
            slimcore's library); slightly slower in eager mode.
        dtype: cast parameters and buffers (e.g. torch.bfloat16) before timing.
        fuse_activations: False keeps every activation as its own op.
        fuse_adds: fuse each residual add into the conv producing one of its operands
            (slimcore.inference.deploy_fusion.Conv2dAdd: a oneDNN conv with an add post-op on the
            CPU), and the ReLU that alone reads the sum; needs a model torch.fx traces.
        fuse_conv_acts: turn the other convs into Conv2dAct (slimcore.inference.deploy_fusion),
            each with the activation that alone reads it when ``fuse_activations``: one oneDNN
            conv with an activation post-op on channels_last float32 input on the CPU, conv2d
            and the activation elsewhere; needs a model torch.fx traces.
        timing_rounds: interleaved timing rounds per memory format for "auto".

    The returned module carries ``deploy_report`` (a dict): ``folded`` and ``fused`` BN names,
    ``activations`` (fused BN name -> activation), ``conv_adds`` (conv name -> activation fused
    after the add, for the convs that took their residual add), ``conv_activations`` (conv name ->
    activation fused after it, "none" for a Conv2dAct without one), ``traced`` (whether torch.fx traced the model;
    without it no activation is fused), ``memory_format`` and ``format_ms`` (the timings behind
    "auto"), ``compiled``.
    """
    if memory_format != "auto" and memory_format not in _MEMORY_FORMATS:
        raise ValueError(f"slimcore.deploy: memory_format must be 'auto', 'contiguous' or 'channels_last', "
                         f"got {memory_format!r}")
    if not isinstance(timing_rounds, int) or isinstance(timing_rounds, bool) or timing_rounds < 1:
        raise ValueError(f"slimcore.deploy: timing_rounds must be an integer >= 1, got {timing_rounds!r}")
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    device = torch.device(device) if device is not None else _model_device(model)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    def prepare(t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.to(device)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    inputs = tuple(prepare(t) for t in inputs)
    m = copy.deepcopy(model).eval().to(device)
    _compact_storage(m)
    if dtype is not None:
        m = m.to(dtype)
    folded = fold_bn(m, inputs)
    try:
        graph = _Tracer().trace(m)
    except Exception:  # torch.fx stops at Python control flow on values (TraceError, TypeError, ...)
        graph = None
    traced = graph is not None
    if traced:
        m, fused, activations = _fuse_traced(m, graph, portable, fuse_activations)
        conv_adds = fuse_conv_adds(m, inputs, _activation_of, portable, fuse_activations) if fuse_adds else {}
        conv_activations = fuse_conv_activations(m, _activation_of, portable, fuse_activations) \
            if fuse_conv_acts else {}
    else:  # replace module by module
        m, fused = _fuse_modules(m, portable)
        activations, conv_adds, conv_activations = {}, {}, {}

    has_4d = any(p.dim() == 4 for p in m.parameters()) and any(
        isinstance(t, torch.Tensor) and t.dim() == 4 for t in inputs)
    format_ms = None
    if memory_format == "auto":
        if has_4d:
            candidates = {"contiguous": m, "channels_last": copy.deepcopy(m).to(memory_format=torch.channels_last)}
            times = _time_candidates(candidates, inputs, device, timing_rounds)
            format_ms = {k: v * 1e3 for k, v in times.items()}
            memory_format = min(times, key=times.get)
            m = candidates[memory_format]
        else:
            memory_format = "contiguous"
    elif memory_format == "channels_last":
        m = m.to(memory_format=torch.channels_last)
    report = dict(folded=folded, fused=fused, activations=activations, conv_adds=conv_adds,
                  conv_activations=conv_activations, traced=traced,
                  memory_format=memory_format, format_ms=format_ms, compiled=bool(compile))
    if compile:
        m = torch.compile(m)
    m.deploy_report = report
    return m
