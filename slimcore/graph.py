"""Channel dependency analysis: which channels of which modules must be removed together.

The model is traced with ``torch.fx`` and run once on the example inputs (for shapes). Every
channel of every traced tensor is described by an *atom*:

* a conv / linear output channel is a fresh atom owned by that module (prunable);
* a BatchNorm whose input comes straight from a conv/linear that nothing else reads is *coupled*:
  its channels are its input's atoms. Any other BatchNorm (pre-activation ResNet's ``bn1`` on the
  residual stream, DenseNet's BN on a concatenation) is a *selection* BN: its output channels are
  fresh atoms that may be dropped on their own (the pruned BN then gathers its input channels, the
  reference repo's ``channel_selection``), and must be dropped when their input channel is;
* network inputs, parameters used as tensors and outputs of unknown ops are frozen atoms.

Ops that make channels inseparable merge atoms into one *class* (union-find): residual adds and
other element-wise ops between channel tensors, grouped convolutions (channel j of every group),
depthwise convolutions (output c is input c). ``torch.cat`` along channels concatenates atom
arrays; flatten/view repeats each channel's atom over its spatial block, so a Linear after it
loses that block of input features. Pooling, dropout and zero-preserving activations pass atoms
through.

Removing a class means: in the dense model, zero the class's channels at the output of every
conv, linear and BN that produces them. The pruned model must equal that masked dense model, so a
channel may only disappear from a tensor if its value there is exactly zero: it is *tainted* when
it passed an op with f(0) != 0 (sigmoid, adding a constant, ...), unless a later multiplication by
an untainted zero clears it (squeeze-and-excitation). A tainted channel that reaches a conv,
linear, BN or the output freezes its class. Classes that reach the model output, an ignored
module, or an op whose channel semantics are unknown (split, permute, matmul, hard-coded reshape
sizes, ...) are frozen too, and every such decision is recorded in ``ChannelGraph.notes``.
"""

import math
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ._shapes import infer_shapes
from .nn import LEAF_MODULES, PLAIN_BATCHNORM, SELECTED_BATCHNORM, ResidualConstant
from .profile import layer_macs

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)
# Selection (dropping a BN's output channels while its input stays) needs a SelectedBatchNorm class.
_SELECTABLE_BATCHNORMS = (*SELECTED_BATCHNORM, *PLAIN_BATCHNORM)  # incl. SlimBatchNorm1d/2d

# Element-wise modules with f(0) = 0: any layout, channels pass through.
_ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish,
    nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity,
)
# Per-channel spatial modules that map an all-zero channel to zeros (channels in dim 1).
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,  # only when affine=False (checked below)
)
# Channel-wise but f(0) != 0: the channel is still there, just not zero.
_TAINTING_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)

_ZERO_PRESERVING_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.hardswish, F.mish,
    F.hardtanh, F.tanhshrink, F.softsign, F.softshrink, F.hardshrink, torch.relu, torch.relu_, torch.tanh,
    torch.abs, torch.neg, operator.neg, torch.clone, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.feature_alpha_dropout,
    "relu", "relu_", "tanh", "abs", "neg", "clone", "contiguous", "float", "half", "double", "bfloat16",
    "to", "type_as", "detach",
}
_SPATIAL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
}
_TAINTING_FUNCTIONS = {
    torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, F.logsigmoid, torch.exp, torch.cos,
    "sigmoid", "sigmoid_", "exp", "exp_",
}
_ADD_LIKE = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, "add", "add_", "sub", "sub_"}
_MUL_LIKE = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV_LIKE = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_"}
_FLATTEN = {torch.flatten, "flatten"}
_RESHAPE = {"view", "reshape", torch.reshape}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_REDUCTIONS = {torch.mean, "mean", torch.sum, "sum", torch.amax, "amax"}
_SHAPE_QUERIES = {"size", "dim", "numel", getattr, operator.getitem}


_SHAPE_KEY = "slimcore_shape"


class TraceFailure(RuntimeError):
    """The model could not be traced with torch.fx."""


@dataclass
class ChannelInfo:
    """The channel dimension of one traced tensor: an atom and a taint flag per channel."""

    atoms: np.ndarray  # int64
    taint: np.ndarray  # bool
    dim: int  # which tensor dimension holds the channels (non-negative)


@dataclass
class ModuleChannels:
    """A module whose parameters or attributes depend on channel counts."""

    name: str
    module: nn.Module
    kind: str  # conv | grouped_conv | depthwise_conv | linear | bn | selection_bn | prelu | residual_constant
    in_atoms: np.ndarray
    out_atoms: np.ndarray
    source_atoms: np.ndarray = None  # BN: the input atom each output channel normalises
    producer: str = None  # coupled BN: the conv/linear whose output (read by nothing else) it normalises
    calls: int = 1  # how many times the traced forward calls the module


@dataclass
class ChannelGraph:
    """Atoms, their classes, and the modules reading and writing them (see the module docstring)."""

    modules: dict = field(default_factory=dict)  # name -> ModuleChannels, in execution order
    owner_names: list = field(default_factory=list)  # owner id -> module name
    selection_parent: dict = field(default_factory=dict)  # selection-BN atom -> its input atom
    notes: list = field(default_factory=list)  # why channels were frozen
    macs: dict = field(default_factory=dict)  # conv/linear module name -> MACs per sample (profile.py rules)
    in_shapes: dict = field(default_factory=dict)  # conv/linear module name -> its input's shape (first call)
    residual_blocks: list = field(default_factory=list)  # ResidualBlock: submodules computing x + branch(x)
    _owner: list = field(default_factory=list)  # per new_atoms call: (owner id, count)
    _owner_ids: dict = field(default_factory=dict)  # module name -> owner id
    _frozen: list = field(default_factory=list)  # arrays of frozen atoms
    _edges: list = field(default_factory=list)  # pairs of equal-length atom arrays to merge
    n_atoms: int = 0

    # -- atoms -----------------------------------------------------------------------------------
    def new_atoms(self, n, owner, frozen=False):
        """n new atoms owned by module ``owner`` (a name, or None for a source)."""
        owner_id = -1 if owner is None else self._owner_ids.setdefault(owner, len(self._owner_ids))
        if owner_id == len(self.owner_names):
            self.owner_names.append(owner)
        atoms = np.arange(self.n_atoms, self.n_atoms + n, dtype=np.int64)
        self.n_atoms += n
        self._owner.append((owner_id, n))
        if frozen:
            self._frozen.append(atoms)
        return atoms

    def union(self, a, b):
        """Atoms a[i] and b[i] must go together, for every i."""
        self._edges.append((np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))

    def freeze(self, atoms, reason):
        if len(atoms):
            self._frozen.append(np.asarray(atoms, dtype=np.int64))
            self.notes.append(f"{reason} ({len(atoms)} channels frozen)")

    @property
    def owner(self):
        """Owner id of every atom (-1: a source such as the model input); names in owner_names."""
        return np.repeat(np.array([o for o, _ in self._owner], dtype=np.int64),
                         np.array([n for _, n in self._owner], dtype=np.int64)) if self._owner else \
            np.zeros(0, dtype=np.int64)

    @property
    def frozen(self):
        mask = np.zeros(self.n_atoms, dtype=bool)
        for atoms in self._frozen:
            mask[atoms] = True
        return mask

    def classes(self):
        """Class id of every atom: the smallest atom it is connected to by union()."""
        return connected_components(self.n_atoms, self._edges)


def connected_components(n, edges):
    """Label of each of n nodes = smallest node in its component, for edges given as pairs of
    index arrays. Vectorised hooking and pointer jumping (Shiloach-Vishkin style)."""
    labels = np.arange(n, dtype=np.int64)
    if not edges:
        return labels
    a = np.concatenate([e[0] for e in edges])
    b = np.concatenate([e[1] for e in edges])
    while True:
        la, lb = labels[a], labels[b]
        if np.array_equal(la, lb):
            return labels
        low = np.minimum(la, lb)
        np.minimum.at(labels, la, low)  # hook each root onto the smaller one
        np.minimum.at(labels, lb, low)
        while True:  # pointer jumping until every node points at its root
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped


@dataclass
class ResidualBlock:
    """A submodule whose output is its input plus a branch computed inside it (an identity shortcut),
    as in pre-activation ResNets. If the branch's channels all go, the block is x + constant."""

    name: str
    stream_atoms: np.ndarray  # channels of the block's input and output
    last: str  # the module (conv, linear or its BN) producing the branch's output
    last_exact: bool  # that conv's response to constant inputs is a per-channel constant (no zero padding)


class _Tracer(torch.fx.Tracer):
    """Keeps user-declared leaf modules opaque and remembers which module was being traced."""

    def __init__(self, leaf_modules=()):
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_ids = {id(m) for m in leaf_modules if isinstance(m, nn.Module)}
        self.stack = []
        self.failed_in = None  # innermost submodule being traced when tracing failed

    def is_leaf_module(self, m, qualname):
        if type(m) in LEAF_MODULES or isinstance(m, self.leaf_types) or id(m) in self.leaf_ids:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def trace(model, example_inputs, leaf_modules=()):
    """(root module, fx Graph with each tensor's shape in node.meta). Raises TraceFailure naming
    the module that could not be traced."""
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; all mean the same thing to the user
        where = f" while tracing submodule '{tracer.failed_in}'" if tracer.failed_in else ""
        raise TraceFailure(
            f"slimcore could not trace {type(model).__name__} with torch.fx{where}: {type(exc).__name__}: {exc}\n"
            "Pass that submodule (or its class) in leaf_modules=[...] to treat it as an opaque leaf: its input "
            "and output channels are then left unpruned."
        ) from exc
    if infer_shapes(tracer.root, graph, example_inputs, _SHAPE_KEY):
        return tracer.root, graph
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _ShapeRecorder(tracer.root, graph).run(*example_inputs)
    except Exception as exc:
        raise TraceFailure(
            f"slimcore traced {type(model).__name__} but running the traced graph on example_inputs failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    return tracer.root, graph


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs the traced graph once and keeps only each tensor's shape (ShapeProp's full metadata
    costs more than the forward on small models). Interprets the Graph directly: no GraphModule
    code generation."""

    def __init__(self, root, graph):
        super().__init__(root, graph=graph)

    def run_node(self, node):
        result = super().run_node(node)
        if isinstance(result, torch.Tensor) and node.op != "output":
            node.meta[_SHAPE_KEY] = tuple(result.shape)
        return result


def _meta_shape(node):
    return node.meta.get(_SHAPE_KEY) if isinstance(node, torch.fx.Node) else None


def _norm_dim(dim, ndim):
    return dim + ndim if dim < 0 else dim


class _Analysis:
    def __init__(self, root, graph, ignore_names):
        self.fx_graph = graph
        self.modules = dict(root.named_modules())
        self.graph = ChannelGraph()
        self.info = {}  # node -> ChannelInfo
        self.ignore = ignore_names
        self.module_out = {}  # module name -> out atoms (a module called twice keeps its atoms)
        placeholders = [_meta_shape(n) for n in graph.nodes if n.op == "placeholder"]
        self.batch = placeholders[0][0] if placeholders and placeholders[0] else 1

    # -- helpers ------------------------------------------------------------------------------------
    def fresh(self, node, owner=None, frozen=True, dim=1):
        shape = _meta_shape(node)
        if shape is None or len(shape) < 2:
            return None
        dim = _norm_dim(dim, len(shape))
        atoms = self.graph.new_atoms(shape[dim], owner, frozen=frozen)
        return ChannelInfo(atoms, np.zeros(len(atoms), dtype=bool), dim)

    def tensor_inputs(self, node):
        return [a for a in node.all_input_nodes if a in self.info]

    def opaque(self, node, why):
        """Unknown channel semantics: every channel it reads is frozen; its output is a new frozen space."""
        for src in self.tensor_inputs(node):
            self.graph.freeze(self.info[src].atoms, f"{why}: '{node.name}' reads them")
        return self.fresh(node)

    def consume(self, info, who):
        """A module reads these channels: tainted ones cannot be dropped."""
        if info is not None and info.taint.any():
            self.graph.freeze(info.atoms[info.taint], f"{who} reads channels that are not zero when removed")

    # -- graph walk ---------------------------------------------------------------------------------
    def run(self):
        for node in self.fx_graph.nodes:
            if node.op == "placeholder":
                self.info[node] = self.fresh(node)  # frozen: the input's channels are given
            elif node.op == "get_attr":
                self.info[node] = None  # a parameter/buffer used as a tensor: opaque
            elif node.op == "call_module":
                self.info[node] = self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.info[node] = self.call_function(node)
            elif node.op == "output":
                for src in node.all_input_nodes:
                    if self.info.get(src) is not None:
                        self.graph.freeze(self.info[src].atoms, f"'{src.name}' is a model output")
            if node in self.info and self.info[node] is None:
                del self.info[node]
        self.find_residual_blocks()
        return self.graph

    def find_residual_blocks(self):
        """Additions that are a submodule's output, of the submodule's input and a branch inside it."""

        def stack(node):
            return list((node.meta.get("nn_module_stack") or {}).keys())

        for node in self.fx_graph.nodes:
            if node.op != "call_function" or node.target not in (operator.add, torch.add) or node not in self.info:
                continue
            path = stack(node)
            if not path:
                continue
            block = path[-1]
            operands = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
            inside = [a for a in operands if block in stack(a)]
            outside = [a for a in operands if block not in stack(a)]
            if len(inside) != 1 or len(outside) != 1 or any(block in stack(u) for u in node.users):
                continue
            # Everything inside the block must depend only on the shortcut input.
            members = [n for n in self.fx_graph.nodes if block in stack(n) and n is not node]
            if any(a not in members and a is not outside[0] and a.op != "get_attr"
                   for n in members for a in n.all_input_nodes):
                continue
            last = inside[0]
            while last.op != "call_module" and last.all_input_nodes and last.target in _ZERO_PRESERVING_FUNCTIONS:
                last = last.all_input_nodes[0]
            last_module = self.modules.get(last.target) if last.op == "call_module" else None
            if isinstance(last_module, _BATCHNORMS) and last.all_input_nodes:  # conv -> BN ends the branch
                producer = last.all_input_nodes[0]
                last_module = self.modules.get(producer.target) if producer.op == "call_module" else None
            if not isinstance(last_module, (*_CONVS, nn.Linear)):
                continue
            padding = getattr(last_module, "padding", (0,))
            padded = padding == "same" or (not isinstance(padding, str) and any(p > 0 for p in padding))
            exact = not (padded and getattr(last_module, "padding_mode", "zeros") == "zeros")
            self.graph.residual_blocks.append(ResidualBlock(block, self.info[node].atoms, last.target, exact))

    def call_module(self, node):
        name = node.target
        m = self.modules[name]
        shape = _meta_shape(node)
        if isinstance(m, (*_CONVS, nn.Linear)) and shape is not None:
            macs = layer_macs(m, math.prod(shape)) // self.batch
            self.graph.macs[name] = self.graph.macs.get(name, 0) + macs
        src = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        if isinstance(m, (*_CONVS, nn.Linear)) and _meta_shape(src) is not None:
            self.graph.in_shapes.setdefault(name, tuple(_meta_shape(src)))
        inp = self.info.get(src)
        if name in self.ignore or any(name.startswith(p + ".") for p in self.ignore):
            return self.opaque(node, f"module '{name}' is ignored")
        if isinstance(m, _CONVS):
            return self.conv(node, name, m, inp)
        if isinstance(m, nn.Linear):
            return self.linear(node, name, m, inp)
        if isinstance(m, _BATCHNORMS):
            return self.batchnorm(node, name, m, src, inp)
        if isinstance(m, ResidualConstant):  # x + c per channel: f(0) != 0 where c != 0
            if inp is None or inp.dim != 1:
                return self.opaque(node, f"'{name}' reads an untracked tensor")
            self.register(name, m, "residual_constant", inp.atoms, inp.atoms)
            return ChannelInfo(inp.atoms, inp.taint | (m.constant.detach().cpu().numpy() != 0), 1)
        if isinstance(m, nn.PReLU):
            if inp is None:
                return self.opaque(node, f"'{name}' reads an untracked tensor")
            if m.num_parameters > 1:
                self.register(name, m, "prelu", inp.atoms, inp.atoms)
            return inp
        if inp is not None:
            if isinstance(m, _ZERO_PRESERVING_MODULES):
                return self.same_channels(node, inp)
            if isinstance(m, nn.Hardtanh) and m.min_val <= 0 <= m.max_val:
                return self.same_channels(node, inp)
            if isinstance(m, _TAINTING_MODULES):
                return self.tainted(inp)
            if isinstance(m, _SPATIAL_MODULES) and inp.dim == 1 and not getattr(m, "affine", False):
                return self.same_channels(node, inp)
            if isinstance(m, nn.Flatten):
                return self.flatten(node, inp, m.start_dim, m.end_dim)
        return self.opaque(node, f"module '{name}' ({type(m).__name__}) has no known channel rule")

    def same_channels(self, node, inp):
        shape = _meta_shape(node)
        if shape is None or len(shape) <= inp.dim or shape[inp.dim] != len(inp.atoms):
            return self.opaque(node, f"'{node.name}' changes the channel dimension")
        return inp

    @staticmethod
    def tainted(inp):
        return ChannelInfo(inp.atoms, np.ones(len(inp.atoms), dtype=bool), inp.dim)

    def register(self, name, m, kind, in_atoms, out_atoms, source_atoms=None, producer=None):
        prev = self.graph.modules.get(name)
        if prev is not None:  # a module called again must see the same channels
            self.graph.union(prev.in_atoms, in_atoms)
            prev.calls += 1
            return prev.out_atoms
        self.graph.modules[name] = ModuleChannels(name, m, kind, in_atoms, out_atoms, source_atoms, producer)
        return out_atoms

    def conv(self, node, name, m, inp):
        if inp is None or inp.dim != 1 or len(inp.atoms) != m.in_channels:
            return self.opaque(node, f"conv '{name}' reads an untracked tensor")
        self.consume(inp, f"conv '{name}'")
        g = m.groups
        if g == 1:
            out = self.module_out.get(name)
            if out is None:
                out = self.graph.new_atoms(m.out_channels, name)
            self.register(name, m, "conv", inp.atoms, out)
        elif g == m.in_channels == m.out_channels:
            out = inp.atoms  # depthwise: output c is a function of input c only
            self.register(name, m, "depthwise_conv", inp.atoms, out)
        elif m.in_channels % g == 0 and m.out_channels % g == 0 and m.in_channels // g > 1:
            # Grouped: every group must keep the same local channels; couple local index j across groups.
            ci, co = m.in_channels // g, m.out_channels // g
            ins = inp.atoms.reshape(g, ci)
            for k in range(1, g):
                self.graph.union(ins[0], ins[k])
            out = self.module_out.get(name)
            if out is None:
                out = self.graph.new_atoms(m.out_channels, name)
                outs = out.reshape(g, co)
                for k in range(1, g):
                    self.graph.union(outs[0], outs[k])
            self.register(name, m, "grouped_conv", inp.atoms, out)
        else:  # depthwise with a channel multiplier
            return self.opaque(node, f"conv '{name}' has groups={g} with a channel multiplier")
        self.module_out[name] = out
        return ChannelInfo(out, np.zeros(len(out), dtype=bool), 1)

    def linear(self, node, name, m, inp):
        shape = _meta_shape(node)
        if inp is None or shape is None or inp.dim != len(shape) - 1 or len(inp.atoms) != m.in_features:
            return self.opaque(node, f"linear '{name}' reads an untracked tensor")
        self.consume(inp, f"linear '{name}'")
        out = self.module_out.get(name)
        if out is None:
            out = self.graph.new_atoms(m.out_features, name)
            self.module_out[name] = out
        self.register(name, m, "linear", inp.atoms, out)
        return ChannelInfo(out, np.zeros(len(out), dtype=bool), len(shape) - 1)

    def batchnorm(self, node, name, m, src, inp):
        selected = getattr(m, "selected_index", None)  # a SelectedBatchNorm from an earlier prune
        n_in = m.num_features if selected is None else None
        if inp is None or inp.dim != 1 or (n_in is not None and len(inp.atoms) != n_in):
            return self.opaque(node, f"BatchNorm '{name}' reads an untracked tensor")
        self.consume(inp, f"BatchNorm '{name}'")
        source = inp.atoms if selected is None else inp.atoms[selected.cpu().numpy()]
        producer = self.modules.get(src.target) if src.op == "call_module" else None
        coupled = isinstance(producer, (*_CONVS, nn.Linear)) and len(src.users) == 1 and selected is None
        if coupled or not m.affine or type(m) not in _SELECTABLE_BATCHNORMS:
            out = inp.atoms
            self.register(name, m, "bn", inp.atoms, out, source, producer=src.target if coupled else None)
        else:
            out = self.module_out.get(name)
            if out is None:
                out = self.graph.new_atoms(len(source), name)
                for s, p in zip(out.tolist(), source.tolist()):
                    self.graph.selection_parent[s] = p
                self.module_out[name] = out
            self.register(name, m, "selection_bn", inp.atoms, out, source)
        return ChannelInfo(out, np.zeros(len(out), dtype=bool), 1)

    # -- functions and methods ----------------------------------------------------------------------
    def call_function(self, node):
        target = node.target
        first = node.args[0] if node.args else None
        inp = self.info.get(first) if isinstance(first, torch.fx.Node) else None
        if _meta_shape(node) is None:  # not a tensor: sizes, tuples, ...
            if target in _SHAPE_QUERIES or not self.tensor_inputs(node):
                return None
            return self.opaque(node, f"'{node.name}' ({_name(target)}) turns channels into a non-tensor")
        if target in _ADD_LIKE or target in _MUL_LIKE or target in _DIV_LIKE:
            return self.elementwise(node, target)
        if target in _CAT:
            return self.cat(node)
        if getattr(target, "__name__", "") == "stochastic_depth":  # torchvision; identity in eval
            return inp
        if inp is None:
            return self.opaque(node, f"'{node.name}' ({_name(target)}) reads no tracked tensor first")
        if target in _FLATTEN:
            return self.flatten(node, inp, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if target in _RESHAPE:
            return self.reshape(node, inp)
        if target in _REDUCTIONS:
            return self.reduce(node, inp)
        if target in _ZERO_PRESERVING_FUNCTIONS:
            return self.same_channels(node, inp)
        if target is F.hardtanh:
            ok = _arg(node, 1, "min_val", -1.0) <= 0 <= _arg(node, 2, "max_val", 1.0)
            return self.same_channels(node, inp) if ok else self.tainted(inp)
        if target in ("clamp", "clamp_", "clamp_min", torch.clamp):
            low = _arg(node, 1, "min", None)
            return self.tainted(inp) if isinstance(low, (int, float)) and low > 0 else self.same_channels(node, inp)
        if target in _SPATIAL_FUNCTIONS and inp.dim == 1:
            return self.same_channels(node, inp)
        if target in _TAINTING_FUNCTIONS:
            return self.tainted(inp)
        return self.opaque(node, f"'{node.name}' ({_name(target)}) has no known channel rule")

    def elementwise(self, node, target):
        out_shape = _meta_shape(node)
        n = len(out_shape)
        cdim = None
        channel_inputs = []  # (info, is_denominator)
        zero_scalar_safe = True
        for pos, a in enumerate(node.args[:2]):
            if isinstance(a, torch.fx.Node):
                shape = _meta_shape(a)
                if shape is None:
                    continue  # a size or other non-tensor
                info = self.info.get(a)
                offset = n - len(shape)
                if info is None:
                    # Untracked tensor operand: fine only if it broadcasts over the channel dimension.
                    channel_inputs.append((None, shape, offset, pos))
                    continue
                d = info.dim + offset
                if shape[info.dim] == 1:
                    continue  # broadcast along channels: does not touch them
                if cdim not in (None, d):
                    return self.opaque(node, f"'{node.name}' combines tensors with different channel dims")
                cdim = d
                channel_inputs.append((info, shape, offset, pos))
            elif isinstance(a, (int, float)) and target in _ADD_LIKE and a != 0:
                zero_scalar_safe = False
        tracked = [ci for ci in channel_inputs if ci[0] is not None]
        if not tracked:
            return self.opaque(node, f"'{node.name}' ({_name(target)}) has no tracked channel input")
        for info, shape, offset, pos in channel_inputs:
            if info is None and len(shape) > cdim - offset >= 0 and shape[cdim - offset] != 1:
                return self.opaque(node, f"'{node.name}' combines channels with an untracked tensor")
        first = tracked[0][0]
        for info, *_ in tracked[1:]:
            if len(info.atoms) != len(first.atoms):
                return self.opaque(node, f"'{node.name}' combines tensors with different channel counts")
            self.graph.union(first.atoms, info.atoms)
        taints = [info.taint for info, *_ in tracked]
        if target in _MUL_LIKE:
            taint = np.logical_and.reduce(taints)  # an untainted zero factor zeroes the product
        elif target in _DIV_LIKE:
            if any(pos == 1 for *_, pos in tracked):
                taint = np.ones(len(first.atoms), dtype=bool)  # dividing by a removed channel: 0/0
            else:
                taint = taints[0]
        else:
            taint = np.logical_or.reduce(taints) | (not zero_scalar_safe)
        return ChannelInfo(first.atoms, taint, cdim)

    def cat(self, node):
        tensors = node.args[0]
        dim = _arg(node, 1, "dim", 0)
        out_shape = _meta_shape(node)
        infos = [self.info.get(t) for t in tensors]
        if any(i is None for i in infos):
            return self.opaque(node, f"'{node.name}' concatenates untracked tensors")
        dim = _norm_dim(dim, len(out_shape))
        if all(i.dim == dim for i in infos):
            return ChannelInfo(np.concatenate([i.atoms for i in infos]), np.concatenate([i.taint for i in infos]), dim)
        if all(i.dim == infos[0].dim for i in infos) and all(len(i.atoms) == len(infos[0].atoms) for i in infos):
            for i in infos[1:]:
                self.graph.union(infos[0].atoms, i.atoms)
            return ChannelInfo(infos[0].atoms, np.logical_or.reduce([i.taint for i in infos]), infos[0].dim)
        return self.opaque(node, f"'{node.name}' concatenates along a mixed dimension")

    def flatten(self, node, inp, start, end):
        in_shape = _meta_shape(node.args[0])
        out_shape = _meta_shape(node)
        nd = len(in_shape)
        start, end = _norm_dim(start, nd), _norm_dim(end, nd)
        if inp.dim < start or inp.dim > end:
            return ChannelInfo(inp.atoms, inp.taint, inp.dim if inp.dim < start else inp.dim - (end - start))
        if inp.dim != start:
            return self.opaque(node, f"'{node.name}' flattens channels into a preceding dimension")
        block = math.prod(in_shape[start + 1:end + 1])
        return ChannelInfo(np.repeat(inp.atoms, block), np.repeat(inp.taint, block), start)

    def reshape(self, node, inp):
        in_shape, out_shape = _meta_shape(node.args[0]), _meta_shape(node)
        if out_shape == in_shape:
            return inp
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        # x.view(x.size(0), -1) flattens; a literal feature size would break once channels are removed.
        is_flatten = inp.dim == 1 and len(out_shape) == 2 and out_shape[0] == in_shape[0] and len(sizes) == 2
        if is_flatten and (sizes[1] == -1 or isinstance(sizes[1], torch.fx.Node)):
            return self.flatten(node, inp, 1, -1)
        return self.opaque(node, f"'{node.name}' reshapes channels to {out_shape} with fixed sizes")

    def reduce(self, node, inp):
        if inp is None:
            return self.opaque(node, f"'{node.name}' reduces an untracked tensor")
        in_shape, out_shape = _meta_shape(node.args[0]), _meta_shape(node)
        dims = _arg(node, 1, "dim", None)
        if dims is None:
            return self.opaque(node, f"'{node.name}' reduces over all dimensions")
        dims = {_norm_dim(d, len(in_shape)) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        if inp.dim in dims:
            return self.opaque(node, f"'{node.name}' reduces over the channel dimension")
        keepdim = len(out_shape) == len(in_shape)
        new_dim = inp.dim if keepdim else inp.dim - sum(d < inp.dim for d in dims)
        return ChannelInfo(inp.atoms, inp.taint, new_dim)


def _arg(node, pos, name, default):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _name(target):
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def analyze(model, example_inputs, ignore=(), leaf_modules=()):
    """Traces ``model`` and returns its ChannelGraph. ``ignore``: module names whose channels stay."""
    root, graph = trace(model, example_inputs, leaf_modules)
    return _Analysis(root, graph, set(ignore)).run()
