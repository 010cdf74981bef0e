"""Residual adds and activations fused into the convolution before them (slimcore.deploy).

A residual network's adds run on its full-width residual stream, which network slimming keeps (it
prunes inside the blocks): they do not shrink with the FLOPs, and each is a memory pass of its own
(read two tensors, write one). oneDNN convolutions take a binary post-op: ``conv(x) + other``
(and an activation after it) computed while the conv's output tile is still in cache, one op and
one write instead of two ops and three passes. PyTorch exposes it on the CPU as
``torch.ops.mkldnn._convolution_pointwise.binary`` (the op inductor's CPU fusions emit).

``Conv2dAdd`` is an ``nn.Conv2d`` whose forward takes the other operand too; ``fuse_conv_adds``
rewrites a torch.fx graph: an add of a conv's output that nothing else reads, with a tensor of the
same shape and dtype, becomes one call of that conv (and the ReLU that alone reads the sum); where
nothing reads the other operand afterwards, the conv writes the sum into it (no new tensor).

``Conv2dAct`` is the same for a conv and the activation that alone reads it (``fuse_conv_activations``),
with the activation as a oneDNN unary post-op, for channels_last input: there a separate ReLU/ReLU6
is one more pass over the conv's output, and ATen sends a 1x1 conv at small batch on one thread to
its im2col path, which converts the layout and copies the bias in first (a slimmed mobilenet_v2 at
batch 4 spends about a third of its time in that path, its copies and the clamps).
"""

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .. import reference
from ..pruning.modules import CompensatedConv2d
from .modules import ChannelAffine

__all__ = ["Conv2dAct", "Conv2dAdd", "fuse_conv_activations", "fuse_conv_adds"]

# activation name -> oneDNN unary post-op after the add (torch 2.14's op takes relu alone there:
# "Unary Fusion behavior undefined" for hardtanh, hardswish, swish, gelu, ...)
_ONEDNN_ACTIVATIONS = {"none": None, "relu": "relu"}
# float32 alone: torch 2.14's op sends bfloat16 with add + relu to an add_relu kernel that lacks it
_ONEDNN_DTYPES = (torch.float32,)
# activation name (reference.ACTIVATIONS) -> oneDNN unary post-op of a conv and its scalars
_ONEDNN_UNARY = {"none": ("none", []), "relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0]),
                 "hardswish": ("hardswish", []), "silu": ("swish", [])}
# The same activations in place, for Conv2dAct's unfused path (the conv's output is a new tensor:
# an out-of-place activation would add an allocation the unfused model does not make).
_IN_PLACE = {"none": lambda y: y, "relu": torch.relu_, "relu6": lambda y: F.hardtanh_(y, 0.0, 6.0),
             "hardswish": lambda y: F.hardswish(y, inplace=True), "silu": lambda y: F.silu(y, inplace=True)}


def _records_grad(conv, *inputs):
    """Whether autograd records this call: the fused oneDNN ops have no backward, so an input or a
    parameter that requires grad (a first conv's weight, with an input that does not) must take the
    plain ops, or its gradient would be silently missing."""
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*inputs, conv.weight, conv.bias))


def _onednn_available():
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class Conv2dAdd(nn.Conv2d):
    """``act(conv2d(input) + other)``: a Conv2d (same parameters, same state_dict keys) whose
    forward also takes the tensor its output is added to, and the activation after the sum
    ("none" or "relu").

    On the CPU in float32 it runs as one oneDNN convolution with an add post-op; elsewhere, with
    ``portable=True`` (plain ATen ops for ONNX export), under torch.compile / torch.export
    tracing, when autograd records the inputs' graph, or when ``other`` does not match the conv's
    output, as conv2d, add and activation. Both compute the same up to rounding.

    ``writes_into_other=True`` lets the fused op write its result into ``other`` (for an ``other``
    nothing reads afterwards, see fuse_conv_adds): no allocation, where a fresh multi-megabyte
    output page-faults on every call (glibc hands freed large blocks back to the system), which
    costs more than the add itself. The fused op has no backward: gradients for the weights need
    the model before deploy (or ``portable=True``).
    """

    def __init__(self, *args, activation="none", portable=False, writes_into_other=False, **kwargs):
        super().__init__(*args, **kwargs)
        if activation not in _ONEDNN_ACTIVATIONS:
            raise ValueError(f"Conv2dAdd: unknown activation {activation!r}; expected one of "
                             f"{', '.join(_ONEDNN_ACTIVATIONS)}")
        self.activation = activation
        self.portable = bool(portable)
        self.writes_into_other = bool(writes_into_other)
        # a CompensatedConv2d's border term (slimcore/pruning/modules.py): None for a plain conv
        self.register_buffer("compensation", None)

    @classmethod
    def from_conv(cls, conv, activation="none", portable=False, writes_into_other=False):
        """A Conv2dAdd sharing ``conv``'s weight and bias (the same Parameter objects) and, for a
        CompensatedConv2d, its compensation buffer."""
        if type(conv) not in (nn.Conv2d, CompensatedConv2d) or conv.padding_mode != "zeros":
            raise TypeError(f"Conv2dAdd.from_conv: expected an nn.Conv2d or CompensatedConv2d with zero padding, "
                            f"got {type(conv).__name__} (padding_mode={conv.padding_mode!r})")
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device="meta", activation=activation, portable=portable,
                    writes_into_other=writes_into_other)
        fused.weight = conv.weight
        fused.bias = conv.bias
        fused.compensation = getattr(conv, "compensation", None)
        fused.train(conv.training)
        return fused

    def uses_onednn(self, x, other):
        """Whether forward(x, other) runs as the one fused oneDNN op (else conv, add, activation)."""
        # torch.compile and torch.export trace plain ops: torch 2.14 has no fake kernel for the fused
        # op (inductor fuses conv + add itself after tracing).
        return (not self.portable and not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dim() == 4
                and x.dtype in _ONEDNN_DTYPES
                and other.dtype == x.dtype and other.device == x.device and self.weight.dtype == x.dtype
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and not _records_grad(self, x, other)
                and _onednn_available()
                and other.shape == self._output_shape(x))

    def _output_shape(self, x):
        size = [x.shape[0], self.out_channels]
        for i in range(2):
            span = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            size.append((x.shape[2 + i] + 2 * self.padding[i] - span) // self.stride[i] + 1)
        return torch.Size(size)

    def forward(self, input, other):
        if self.compensation is not None:
            # The border term (1, C, H', W') goes into the other operand: one pass instead of the
            # CompensatedConv2d's add of it to the conv output and the residual add after that.
            ones = torch.ones((1, 1) + input.shape[2:], dtype=input.dtype, device=input.device)
            other = other + F.conv2d(ones, self.compensation, None, self.stride, self.padding, self.dilation)
        if self.uses_onednn(input, other):
            args = (self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
                    "add", None, _ONEDNN_ACTIVATIONS[self.activation], [], None)
            if self.writes_into_other:  # no new tensor: a fresh one costs page faults on every call
                return torch.ops.mkldnn._convolution_pointwise_.binary(other, input, *args)
            return torch.ops.mkldnn._convolution_pointwise.binary(input, other, *args)
        return reference.ACTIVATIONS[self.activation](self._conv_forward(input, self.weight, self.bias) + other)

    def extra_repr(self):
        return super().extra_repr() + f", adds its second input, activation={self.activation}" + \
            (", writes into it" if self.writes_into_other else "") + (", portable" if self.portable else "")


class Conv2dAct(nn.Conv2d):
    """``act(conv2d(input))``: a Conv2d (same parameters, same state_dict keys) with the activation
    that reads its output ("none", "relu", "relu6", "hardswish", "silu").

    On the CPU in float32 with channels_last input it runs as one oneDNN convolution with the
    activation as a post-op. NCHW input (where oneDNN would reorder the data and ATen's own choice
    is faster), other devices and dtypes, ``portable=True``, torch.compile / torch.export tracing
    and inputs that autograd records run conv2d and the activation. Both compute the same up to
    rounding. The fused op has no backward.
    """

    def __init__(self, *args, activation="none", portable=False, **kwargs):
        super().__init__(*args, **kwargs)
        if activation not in _ONEDNN_UNARY:
            raise ValueError(f"Conv2dAct: unknown activation {activation!r}; expected one of "
                             f"{', '.join(_ONEDNN_UNARY)}")
        self.activation = activation
        self.portable = bool(portable)

    @classmethod
    def from_conv(cls, conv, activation="none", portable=False):
        """A Conv2dAct sharing ``conv``'s weight and bias (the same Parameter objects)."""
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise TypeError(f"Conv2dAct.from_conv: expected an nn.Conv2d with zero numeric padding, got "
                            f"{type(conv).__name__} (padding={conv.padding!r}, padding_mode={conv.padding_mode!r})")
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, device="meta",
                    activation=activation, portable=portable)
        fused.weight = conv.weight
        fused.bias = conv.bias
        fused.train(conv.training)
        return fused

    def uses_onednn(self, x):
        """Whether forward(x) runs as the one fused oneDNN op (else conv2d, then the activation)."""
        return (not self.portable and not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dim() == 4
                and x.dtype in _ONEDNN_DTYPES and self.weight.dtype == x.dtype
                and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
                and not _records_grad(self, x)
                and _onednn_available())

    def forward(self, input):
        if self.uses_onednn(input):
            attr, scalars = _ONEDNN_UNARY[self.activation]
            return torch.ops.mkldnn._convolution_pointwise(input, self.weight, self.bias, list(self.padding),
                                                           list(self.stride), list(self.dilation), self.groups,
                                                           attr, scalars, "")
        y = self._conv_forward(input, self.weight, self.bias)
        if self.portable or (torch.is_grad_enabled() and y.requires_grad):
            return reference.ACTIVATIONS[self.activation](y)
        return _IN_PLACE[self.activation](y)

    def extra_repr(self):
        return super().extra_repr() + f", activation={self.activation}" + (", portable" if self.portable else "")


def module_call_counts(gm):
    """{module name: how many call_module nodes of ``gm``'s graph call it} (a module called more
    than once is shared: it cannot be swapped for one of its calls alone)."""
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def sole_activation(node, modules, activation_of, fusable):
    """(activation name, its node) when the only reader of ``node``'s output is an activation
    ``activation_of(user, modules, node)`` names and ``fusable`` contains, else ("none", None)."""
    if len(node.users) != 1:
        return "none", None
    user = next(iter(node.users))
    act = activation_of(user, modules, node)
    return (act, user) if act in fusable and act != "none" else ("none", None)


def _add_operands(node):
    """(a, b, in_place) if ``node`` computes a + b of two fx nodes (no alpha), else None."""
    if len(node.args) != 2 or node.kwargs:
        return None
    if node.op == "call_function" and node.target in (operator.add, torch.add):
        in_place = False
    elif node.op == "call_function" and node.target is operator.iadd:
        in_place = True
    elif node.op == "call_method" and node.target in ("add", "add_"):
        in_place = node.target == "add_"
    else:
        return None
    a, b = node.args
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
        return None
    return a, b, in_place


def _tensor_meta(node):
    meta = node.meta.get("tensor_meta")
    return meta if hasattr(meta, "shape") else None  # tuples/lists of outputs have no single shape


# Modules whose output is a new tensor (no view or in-place result of an input): a tensor they
# produce may be overwritten once its last reader has run, and a tensor they read is not aliased
# by what they return.
_FRESH_OUTPUT = (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, ChannelAffine)


def _fresh_module_call(node, modules):
    return node.op == "call_module" and isinstance(modules.get(node.target), _FRESH_OUTPUT)


def _writable_after(other, reader, order, modules):
    """Whether ``reader`` may overwrite the tensor of node ``other``: a new tensor (from a module
    of _FRESH_OUTPUT or an out-of-place add) whose every other reader runs before ``reader`` and
    makes a new tensor of it (no view that a later node could read through)."""
    fresh = _fresh_module_call(other, modules) or (
        other.op == "call_function" and other.target in (operator.add, torch.add))
    if not fresh:
        return False
    return all(u is reader or (order[u] < order[reader] and _fresh_module_call(u, modules)) for u in other.users)


def fuse_conv_adds(gm, example_inputs, activation_of, portable=False, fuse_activations=True):
    """Rewrites ``gm`` (a torch.fx GraphModule, in place): each add of a Conv2d's output that
    nothing else reads, with another tensor of the conv output's shape and dtype (from running
    ``example_inputs`` through the graph), becomes one call of a :class:`Conv2dAdd` that replaces
    that conv; the activation that alone reads the sum is fused too when ``activation_of(user,
    modules, source)`` names it and it is a ReLU. Where the other operand is a new tensor nothing
    reads after the add (a residual stream's previous sum, a shortcut conv's output), the fused
    conv writes its result into it. Returns {conv name: activation} of the fused convs.

    Left as they are: convs called more than once, convs of other types (1-D/3-D, subclasses
    other than slimcore's CompensatedConv2d) or with another padding mode, conv outputs read by
    anything besides the add, in-place adds that write into the other operand (``other.add_(conv(x))``:
    later readers of ``other`` see the sum), broadcasting adds.
    """
    modules = dict(gm.named_modules())
    calls = module_call_counts(gm)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception:  # a graph that does not run on the example inputs is left unfused
        return {}
    fused = {}
    for node in list(gm.graph.nodes):
        operands = _add_operands(node)
        if operands is None:
            continue
        a, b, in_place = operands
        for conv_node, other in ((a, b), (b, a)):
            if in_place and conv_node is not a:
                continue  # the add writes into ``other``: an out-of-place fused op would not
            if conv_node.op != "call_module" or conv_node is other or len(conv_node.users) != 1 \
                    or len(conv_node.args) != 1 or conv_node.kwargs:
                continue
            conv = modules.get(conv_node.target)
            if type(conv) not in (nn.Conv2d, CompensatedConv2d) or calls[conv_node.target] != 1 \
                    or conv.padding_mode != "zeros":
                continue
            out_meta, other_meta, sum_meta = _tensor_meta(conv_node), _tensor_meta(other), _tensor_meta(node)
            if out_meta is None or other_meta is None or sum_meta is None or len(out_meta.shape) != 4:
                continue
            if out_meta.shape != other_meta.shape or out_meta.dtype != other_meta.dtype or sum_meta.shape != out_meta.shape:
                continue
            act, user = sole_activation(node, modules, activation_of, _ONEDNN_ACTIVATIONS) \
                if fuse_activations else ("none", None)
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            into_other = conv_node.args[0] is not other and _writable_after(other, node, order, modules)
            replacement = Conv2dAdd.from_conv(conv, act, portable, writes_into_other=into_other)
            gm.add_submodule(conv_node.target, replacement)
            modules[conv_node.target] = replacement
            with gm.graph.inserting_before(node):
                call = gm.graph.call_module(conv_node.target, (conv_node.args[0], other))
            call.meta = dict(node.meta)
            last = node
            if act != "none":
                last = user
            last.replace_all_uses_with(call)
            if last is not node:
                gm.graph.erase_node(last)
            gm.graph.erase_node(node)
            gm.graph.erase_node(conv_node)
            fused[conv_node.target] = act
            break
    gm.graph.lint()
    gm.recompile()
    return fused


def fuse_conv_activations(gm, activation_of, portable=False, fuse_activations=True, plain_convs=True):
    """Rewrites ``gm`` (a torch.fx GraphModule, in place): each nn.Conv2d called once, with zero
    numeric padding, becomes a :class:`Conv2dAct` together with the activation that alone reads its
    output (when ``activation_of(user, modules, conv_node)`` names one of its activations and
    ``fuse_activations``); with ``plain_convs`` the convs without such an activation become
    Conv2dAct("none") as well, so that channels_last input takes oneDNN there too. Run it after
    fuse_conv_adds (which takes the convs feeding an add). Returns {conv name: activation}.
    """
    modules = dict(gm.named_modules())
    calls = module_call_counts(gm)
    fused = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        conv = modules.get(node.target)
        if type(conv) is not nn.Conv2d or calls[node.target] != 1 or conv.padding_mode != "zeros" \
                or isinstance(conv.padding, str):
            continue
        act, user = sole_activation(node, modules, activation_of, _ONEDNN_UNARY) \
            if fuse_activations else ("none", None)
        if act == "none" and not plain_convs:
            continue
        replacement = Conv2dAct.from_conv(conv, act, portable)
        gm.add_submodule(node.target, replacement)
        modules[node.target] = replacement
        if act != "none":
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
        fused[node.target] = act
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()  # the activation modules fused away
    return fused
