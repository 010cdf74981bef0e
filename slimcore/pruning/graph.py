"""Channel dependency analysis: which channels of which modules must be removed together.

The model is captured once at the ATen level (capture.py: any model that runs can be captured),
and one set of channel rules, written against the canonical ATen ops, walks the recorded ops.
``nn.BatchNorm2d``, ``F.batch_norm``, timm's ``BatchNormAct2d`` and a user's own BN wrapper all
arrive as the same batch-norm op; ``chunk``, ``split``, ``narrow`` and ``x[:, a:b]`` as ``split`` /
``slice``. Every channel of every recorded tensor is described by an *atom*:

* a conv / linear output channel is a fresh atom owned by that module (prunable);
* a BatchNorm whose input comes straight from a conv/linear that nothing else reads is *coupled*:
  its channels are its input's atoms. Any other BatchNorm (pre-activation ResNet's ``bn1`` on the
  residual stream, DenseNet's BN on a concatenation) is a *selection* BN: its output channels are
  fresh atoms that may be dropped on their own (the pruned BN then gathers its input channels, the
  reference repo's ``channel_selection``), and must be dropped when their input channel is;
* network inputs and outputs of ops without a channel rule are frozen atoms.

Ops that make channels inseparable merge atoms into one *class* (union-find): element-wise ops
between channel tensors (residual adds, squeeze-and-excitation products), grouped convolutions
(channel j of every group), depthwise convolutions (output c is input c), equal pieces of a
``chunk`` (channel j of each piece, so the code's split stays valid). ``cat`` along channels
concatenates atom arrays, ``split``/``slice`` cut them; flatten/view repeats each channel's atom
over its spatial block, so a Linear after it loses that block of input features. Pooling,
padding, upsampling and zero-preserving activations pass atoms through.

Removing a class means: in the dense model, zero the class's channels at the output of every
conv, linear and BN that produces them. The pruned model must equal that masked dense model, so a
channel may only disappear from a tensor if its value there is exactly zero: it is *tainted* when
it passed an op with f(0) != 0 (sigmoid, adding a constant, ...; decided by evaluating the op on
zero), unless a later multiplication by an untainted zero clears it. A tainted channel that reaches
a conv, linear, BN or the output freezes its class. Every freeze is recorded, grouped by cause, in
``ChannelGraph.notes``.

Sizes written into a model's code (``x.split(self.c, 1)``, ``x[:, :64]``, ``view(n, 256, -1)``) are
checked after the decision by running a pruned copy of the model on the meta device
(:func:`verify`): module attributes holding an old size are updated where that makes the copy run
as planned; otherwise the channels that node reads are frozen and the decision is made again.
"""

import difflib
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .capture import Ref, TraceFailure, capture
from .modules import PLAIN_BATCHNORM, PLAIN_CONV, SELECTED_BATCHNORM, ResidualConstant
from .profile import layer_macs

__all__ = ["TraceFailure", "ChannelGraph", "ModuleChannels", "ResidualBlock", "analyze", "verify"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)
# Selection (dropping a BN's output channels while its input stays) needs a SelectedBatchNorm class.
_SELECTABLE_BATCHNORMS = (*SELECTED_BATCHNORM, *PLAIN_BATCHNORM)  # incl. SlimBatchNorm1d/2d

# ATen batch-norm ops: (input, weight, bias, running_mean, running_var, ...) -> (out, ...).
_BN_OPS = {"_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
           "_batch_norm_with_update", "_batch_norm_no_update", "cudnn_batch_norm", "miopen_batch_norm",
           "slimcore::batch_norm"}
_SAME = {"clone", "_to_copy", "detach", "alias", "lift_fresh", "lift_fresh_copy", "contiguous", "_conj",
         "resolve_conj", "resolve_neg", "dropout", "feature_dropout"}
_VIEWS = {"view", "_unsafe_view", "reshape", "_reshape_alias", "expand"}
# Per-channel spatial ops (channels in dim 1): an all-zero channel stays all zero.
_SPATIAL = {
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "upsample_nearest1d",
    "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
    "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d", "upsample_trilinear3d",
    "upsample_bicubic2d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa", "reflection_pad1d",
    "reflection_pad2d", "reflection_pad3d", "replication_pad1d", "replication_pad2d", "replication_pad3d",
}
# Reductions over listed dims: a zero channel reduces to zero.
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "nansum",
               "logsumexp", "norm", "linalg_vector_norm"}
_TAINTING_REDUCTIONS = {"logsumexp"}
_FACTORIES = {"new_full", "new_zeros", "new_ones", "new_empty", "new_empty_strided", "scalar_tensor"}
# Element-wise ops ATen does not tag pointwise.
_ACTIVATIONS = {"hardswish", "hardsigmoid", "hardtanh", "silu", "mish", "gelu", "elu", "celu", "selu", "leaky_relu",
                "relu", "relu6", "softplus", "softshrink", "hardshrink", "threshold", "sigmoid", "tanh", "_prelu_kernel",
                "log_sigmoid_forward", "logit"}
_LIKE = {"zeros_like": False, "ones_like": True, "empty_like": True, "full_like": None, "rand_like": True,
         "randn_like": True, "randint_like": True}


@dataclass
class ChannelInfo:
    """The channel dimension of one recorded tensor: an atom and a taint flag per channel."""

    atoms: np.ndarray  # int64
    taint: np.ndarray  # bool
    dim: int  # which tensor dimension holds the channels (non-negative)


@dataclass
class ModuleChannels:
    """A module whose parameters or attributes depend on channel counts."""

    name: str
    module: nn.Module
    kind: str  # conv | grouped_conv | depthwise_conv | linear | bn | selection_bn | prelu | residual_constant
    #            | channel_param (one parameter used along a channel dim, e.g. a layer scale)
    in_atoms: np.ndarray
    out_atoms: np.ndarray
    source_atoms: np.ndarray = None  # BN: the input atom each output channel normalises
    producer: str = None  # coupled BN: the conv/linear whose output (read by nothing else) it normalises
    calls: int = 1  # how many times the recorded forward calls the module
    attrs: tuple = ()  # bn: the parameters/buffers the BN op reads; channel_param: (attribute,)
    dim: int = 0  # channel_param: the parameter's dimension holding the channels


@dataclass
class ChannelGraph:
    """Atoms, their classes, and the modules reading and writing them (see the module docstring)."""

    modules: dict = field(default_factory=dict)  # name -> ModuleChannels, in execution order
    owner_names: list = field(default_factory=list)  # owner id -> module name
    selection_parent: dict = field(default_factory=dict)  # selection-BN atom -> its input atom
    causes: dict = field(default_factory=dict)  # why channels were frozen: cause -> [channels, places]
    macs: dict = field(default_factory=dict)  # conv/linear module name -> MACs per sample (profile.py rules)
    in_shapes: dict = field(default_factory=dict)  # conv/linear module name -> its input's shape (first call)
    residual_blocks: list = field(default_factory=list)  # ResidualBlock: submodules computing x + branch(x)
    capture: object = None  # the slimcore.pruning.capture.Capture analysed
    info: dict = field(default_factory=dict)  # value id -> ChannelInfo
    checks: list = field(default_factory=list)  # node indices whose sizes may be written in the code
    chunks: list = field(default_factory=list)  # node indices of chunk() calls along channels (sized by the code itself)
    reads: dict = field(default_factory=dict)  # conv/linear name -> value ids of its input, per call
    node_module: dict = field(default_factory=dict)  # node index -> (module name, "producer" | "bn" | "constant")
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

    def freeze(self, atoms, cause, where=None):
        if len(atoms):
            self._frozen.append(np.asarray(atoms, dtype=np.int64))
            entry = self.causes.setdefault(cause, [0, []])
            entry[0] += len(atoms)
            if where and where not in entry[1]:
                entry[1].append(where)

    @property
    def notes(self):
        """One line per cause of frozen channels, with a few of the places it happened."""
        out = []
        for cause, (n, places) in self.causes.items():
            at = f" at {len(places)} places (e.g. {', '.join(places[:3])})" if len(places) > 1 else (
                f" at {places[0]}" if places else "")
            out.append(f"{cause}{at}: {n} channels frozen")
        return out

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
    branch: int = None  # value id of the branch's output (what the block adds to its input)


def _norm_dim(dim, ndim):
    return dim + ndim if dim < 0 else dim


def _op_name(node):
    func = node.func
    if func is None:
        return node.op
    ns = func.namespace
    return node.op if ns == "aten" else f"{ns}::{node.op}"


def _view_map(in_shape, out_shape, d):
    """Where dimension d (the channels) of in_shape lands in a view to out_shape, as
    (dim, block, outer) when it stays whole in one output dimension: that dimension holds
    ``outer`` repeats of the channels (dims before d merged into it, e.g. attention heads merged
    back), each channel spread over ``block`` elements (dims after it merged in: flatten). None
    when the channels are split across dimensions or merged behind another one.

    Output dim j holds the channels when the dims before it hold exactly the elements of the dims
    before the merged ones and the dims after it the rest. Size-1 dims make several j fit (a batch
    of one, a single channel); the one nearest d is taken, without outer merges where possible.
    """
    c, inner = in_shape[d], math.prod(in_shape[d + 1:])
    best = None
    for s in range(d, -1, -1):  # the merge starts at input dim s
        pre, outer = math.prod(in_shape[:s]), math.prod(in_shape[s:d])
        for j in range(len(out_shape)):
            if math.prod(out_shape[:j]) != pre or out_shape[j] % (c * outer):
                continue
            block = out_shape[j] // (c * outer)
            if block * math.prod(out_shape[j + 1:]) != inner:
                continue
            if best is None or abs(j - d) <= abs(best[0] - d):
                best = (j, block, outer)
        if best is not None:
            return best
    return None


def _head_split(in_shape, out_shape, d):
    """(dim, groups) when a view splits the channels (dim d) into two output dims, groups x
    per-group (multi-head attention: [B, C, H, W] -> [B, heads, C / heads, H * W]), the dims
    around them holding the elements before and after the channels; else None."""
    c, pre, inner = in_shape[d], math.prod(in_shape[:d]), math.prod(in_shape[d + 1:])
    for j in range(len(out_shape) - 1):
        if math.prod(out_shape[:j]) == pre and out_shape[j] * out_shape[j + 1] == c and out_shape[j] > 1 \
                and out_shape[j + 1] > 1 and math.prod(out_shape[j + 2:]) == inner:
            return j + 1, out_shape[j]
    return None


class _Rules:
    """Walks a Capture and builds its ChannelGraph."""

    def __init__(self, model, cap, ignore, keep_outputs=None):
        self.c = cap
        self.keep_outputs = keep_outputs  # None: every output keeps its channels; else path prefixes
        self.modules = dict(model.named_modules())
        self.g = ChannelGraph(capture=cap)
        self.info = self.g.info
        self.ignore = ignore
        self.module_out = {}  # module name -> out atoms (a module called twice keeps its atoms)
        self.conv_out = {}  # value id -> conv/linear module name that produced it
        self.selected = {}  # value id -> (input value id, module name): a selection BN's index_select
        self.batch = cap.shapes[cap.inputs[0]][0] if cap.inputs and cap.shapes[cap.inputs[0]] else 1

    # -- helpers ---------------------------------------------------------------------------------
    def shape(self, v):
        return self.c.shapes[v]

    def fresh(self, v, frozen=True, dim=1):
        shape = self.shape(v)
        if len(shape) < 2:
            return None
        atoms = self.g.new_atoms(shape[dim], None, frozen=frozen)
        return ChannelInfo(atoms, np.zeros(len(atoms), dtype=bool), dim)

    def where(self, node):
        return f"'{node.stack[-1]}'" if node.stack else "the model's forward"

    def ignored(self, name):
        return name in self.ignore or any(name.startswith(p + ".") for p in self.ignore)

    def opaque(self, node, cause):
        """Unknown channel semantics: every channel it reads is frozen; its outputs are new frozen spaces."""
        for v in node.refs():
            inf = self.info.get(v)
            if inf is not None:
                self.g.freeze(inf.atoms, cause, self.where(node))
        dims = {self.info[v].dim for v in node.refs() if v in self.info}
        for v in node.outputs:  # keep the channel dim where it was (a layer norm of NHWC: the last)
            d = dims.pop() if len(dims) == 1 else 1
            inf = self.fresh(v, dim=d) if d < len(self.shape(v)) else self.fresh(v)
            if inf is not None:
                self.info[v] = inf

    def consume(self, inf, who, node):
        """A module reads these channels: tainted ones cannot be dropped."""
        if inf is not None and inf.taint.any():
            self.g.freeze(inf.atoms[inf.taint], f"{who} reads channels that are not zero when removed",
                          self.where(node))

    def set(self, v, atoms, taint, dim):
        self.info[v] = ChannelInfo(atoms, taint, dim)

    def param_vector(self, v):
        """(module, attribute, dim of the output holding the parameter's values) when v is a
        parameter with one non-1 dimension, or a view of one; else None."""
        node = self.c.node_of(v)
        steps = 0
        while node.op in _VIEWS | {"unsqueeze", "squeeze", "_to_copy", "detach", "alias", "permute", "t"} \
                and steps < 8:
            node = self.c.node_of(node.args[0].id)
            steps += 1
        if node.op != "param":
            return None
        shape = self.shape(v)
        big = [i for i, s in enumerate(shape) if s != 1]
        pshape = self.c.shapes[node.outputs[0]]
        pbig = [i for i, s in enumerate(pshape) if s != 1]
        if len(big) != 1 or len(pbig) != 1:
            return None
        return node.module, node.attr, big[0], pbig[0]

    def register(self, name, m, kind, in_atoms, out_atoms, **extra):
        prev = self.g.modules.get(name)
        if prev is not None:  # a module called again must see the same channels
            if len(prev.in_atoms) == len(in_atoms):
                self.g.union(prev.in_atoms, in_atoms)
            prev.calls += 1
            return prev.out_atoms
        self.g.modules[name] = ModuleChannels(name, m, kind, in_atoms, out_atoms, **extra)
        return out_atoms

    # -- the walk --------------------------------------------------------------------------------
    def run(self):
        for node in self.c.nodes:
            op = node.op
            if op == "input":
                inf = self.fresh(node.outputs[0])  # frozen: the input's channels are given
                if inf is not None:
                    self.info[node.outputs[0]] = inf
            elif op in ("param", "constant"):
                continue
            elif op == "output":
                for v, path in zip(self.c.outputs, self.c.output_paths):
                    inf = self.info.get(v)
                    if inf is not None and self.keeps_output(path):
                        self.g.freeze(inf.atoms, "model outputs keep their channels")
            elif op == "leaf":
                self.leaf(node)
            elif op == "alias_write":
                if self.c.users[node.outputs[0]]:  # the changed tensor is read again: its channels are unknown
                    self.opaque(node, "a tensor written in place through a view")
            else:
                self.aten(node)
        self.find_residual_blocks()
        return self.g

    def keeps_output(self, path):
        keep = self.keep_outputs
        return keep is None or any(path == p or path.startswith(p + ".") or p == "" for p in keep)

    # -- modules ---------------------------------------------------------------------------------
    def leaf(self, node):
        name = node.module
        m = self.modules[name]
        refs = [a for a in node.args if isinstance(a, Ref)]
        if not refs or not node.outputs:
            return self.opaque(node, f"leaf module {type(m).__name__} reads no tensor")
        x, out = refs[0].id, node.outputs[0]
        if self.ignored(name):
            return self.opaque(node, "ignored modules keep their channels")
        if isinstance(m, _CONVS):  # CompensatedConv: a conv plus its border map
            return self.conv(node, name, m, x, out)
        if isinstance(m, nn.Linear):
            return self.linear(node, name, m, x, out)
        if isinstance(m, ResidualConstant):  # x + c per channel: f(0) != 0 where c != 0
            inf = self.info.get(x)
            if inf is None or inf.dim != 1:
                return self.opaque(node, "ResidualConstant reads an untracked tensor")
            self.register(name, m, "residual_constant", inf.atoms, inf.atoms)
            self.g.node_module[node.index] = (name, "constant")
            self.set(out, inf.atoms, inf.taint | (m.constant.detach().cpu().numpy() != 0), 1)
            return
        return self.opaque(node, f"leaf module {type(m).__name__} (leaf_modules) keeps its channels")

    def macs(self, name, m, x, out):
        shape = self.shape(out)
        self.g.macs[name] = self.g.macs.get(name, 0) + layer_macs(m, math.prod(shape)) // max(self.batch, 1)
        self.g.in_shapes.setdefault(name, tuple(self.shape(x)))

    def conv(self, node, name, m, x, out):
        self.macs(name, m, x, out)
        inp = self.info.get(x)
        if self.ignored(name):
            return self.opaque(node, "ignored modules keep their channels")
        g = m.groups
        if inp is None or inp.dim != 1 or len(inp.atoms) != m.in_channels:
            if g != 1:
                return self.opaque(node, "convs reading untracked tensors keep their channels")
            inp = self.untracked_input(inp, m.in_channels, "convs reading untracked tensors keep their input channels",
                                       node)
        self.consume(inp, f"conv '{name}'", node)
        if g == 1:
            atoms = self.module_out.get(name)
            if atoms is None:
                atoms = self.g.new_atoms(m.out_channels, name)
            self.register(name, m, "conv", inp.atoms, atoms)
        elif g == m.in_channels == m.out_channels:
            atoms = inp.atoms  # depthwise: output c is a function of input c only
            self.register(name, m, "depthwise_conv", inp.atoms, atoms)
        elif m.in_channels % g == 0 and m.out_channels % g == 0 and m.in_channels // g > 1:
            # Grouped: every group must keep the same local channels; couple local index j across groups.
            ci, co = m.in_channels // g, m.out_channels // g
            ins = inp.atoms.reshape(g, ci)
            for k in range(1, g):
                self.g.union(ins[0], ins[k])
            atoms = self.module_out.get(name)
            if atoms is None:
                atoms = self.g.new_atoms(m.out_channels, name)
                outs = atoms.reshape(g, co)
                for k in range(1, g):
                    self.g.union(outs[0], outs[k])
            self.register(name, m, "grouped_conv", inp.atoms, atoms)
        else:  # depthwise with a channel multiplier
            return self.opaque(node, "depthwise convs with a channel multiplier keep their channels")
        self.module_out[name] = atoms
        self.conv_out[out] = name
        self.g.reads.setdefault(name, []).append(x)
        self.g.node_module[node.index] = (name, "producer")
        self.set(out, atoms, np.zeros(len(atoms), dtype=bool), 1)

    def untracked_input(self, inp, n, cause, node):
        """A conv/linear input whose channels are not where the layer reads them (a blocked layout
        [B, T, N, C] after an untracked reshape, a token-mixing input): what it holds is frozen and
        the layer reads n frozen channels. Its output channels are still its own, prunable."""
        atoms = self.g.new_atoms(n, None, frozen=inp is not None)
        self.g.freeze(inp.atoms if inp is not None else atoms, cause, self.where(node))
        return ChannelInfo(atoms, np.zeros(n, dtype=bool), 1)

    def linear(self, node, name, m, x, out):
        self.macs(name, m, x, out)
        inp = self.info.get(x)
        nd = len(self.shape(out))
        if self.ignored(name):
            return self.opaque(node, "ignored modules keep their channels")
        if inp is None or inp.dim != len(self.shape(x)) - 1 or len(inp.atoms) != m.in_features:
            inp = self.untracked_input(inp, m.in_features,
                                       "linears reading untracked tensors keep their input features", node)
        self.consume(inp, f"linear '{name}'", node)
        atoms = self.module_out.get(name)
        if atoms is None:
            atoms = self.module_out[name] = self.g.new_atoms(m.out_features, name)
        self.register(name, m, "linear", inp.atoms, atoms)
        self.conv_out[out] = name
        self.g.reads.setdefault(name, []).append(x)
        self.g.node_module[node.index] = (name, "producer")
        self.set(out, atoms, np.zeros(len(atoms), dtype=bool), nd - 1)

    # -- ATen ops --------------------------------------------------------------------------------
    def aten(self, node):
        name = _op_name(node)
        base = name[:-1] if name.endswith("_") and not name.endswith("__") else name
        tracked = [v for v in node.refs() if v in self.info]
        if name == "convolution":
            return self.convolution(node)
        if name in _BN_OPS:
            return self.batchnorm(node)
        if base == "index_select":
            return self.index_select(node)
        if not tracked or base in _FACTORIES:
            return  # factories (x.new_full: only x's dtype and device), ops on parameters: no channels to follow
        if base in _LIKE:
            inf = self.info[node.args[0].id]
            fill = _LIKE[base]
            if fill is None:
                fill = node.args[1] != 0
            self.set(node.outputs[0], inf.atoms, np.full(len(inf.atoms), bool(fill)), inf.dim)
            return
        if base in ("zero", "fill"):
            inf = self.info[node.args[0].id]
            fill = base == "fill" and not (isinstance(node.args[1], (int, float)) and node.args[1] == 0)
            self.set(node.outputs[0], inf.atoms, np.full(len(inf.atoms), fill), inf.dim)
            return
        if name in _SAME:
            return self.same(node)
        if name in _VIEWS:
            return self.view(node)
        handler = getattr(self, "op_" + base, None)
        if handler is not None:
            return handler(node)
        if name in _SPATIAL:
            return self.spatial(node)
        if base in _REDUCTIONS:
            return self.reduce(node, base)
        if base in _ACTIVATIONS or node.func is not None and torch.Tag.pointwise in node.func.tags:
            return self.pointwise(node, base)
        return self.opaque(node, f"ops without a channel rule (aten.{name})")

    def same(self, node):
        inf = self.info[node.args[0].id]
        if self.shape(node.outputs[0]) != self.shape(node.args[0].id):
            return self.opaque(node, f"aten.{node.op} changes the shape")
        self.info[node.outputs[0]] = inf

    def convolution(self, node):
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        owner = self.c.param(w.id) if isinstance(w, Ref) else None
        m = self.modules.get(owner[0]) if owner else None
        if m is None or owner[1] != "weight" or not isinstance(m, _CONVS):
            if any(v in self.info for v in node.refs()):
                return self.opaque(node, "convolutions with a computed weight keep their channels")
            return
        if bias is not None and self.c.param(bias.id) != (owner[0], "bias"):
            return self.opaque(node, "convolutions with a computed bias keep their channels")
        if node.args[6]:  # transposed
            return self.opaque(node, "transposed convolutions keep their channels")
        return self.conv(node, owner[0], m, x.id, node.outputs[0])

    def index_select(self, node):
        x, dim, index = node.args[0], node.args[1], node.args[2]
        owner = self.c.param(index.id) if isinstance(index, Ref) else None
        if owner and owner[1] == "selected_index" and _norm_dim(dim, len(self.shape(x.id))) == 1 \
                and len(self.c.users[node.outputs[0]]) == 1:
            self.selected[node.outputs[0]] = (x.id, owner[0])  # read by its BN (below)
            return
        inf = self.info.get(x.id)
        if inf is None:
            return
        if _norm_dim(dim, len(self.shape(x.id))) == inf.dim:
            return self.opaque(node, "index_select along channels")
        self.info[node.outputs[0]] = inf

    def batchnorm(self, node):
        x = node.args[0]
        owners = {self.c.param(a.id) for a in node.args[1:5] if isinstance(a, Ref)} - {None}
        names = {o[0] for o in owners}
        out = node.outputs[0]
        if len(names) != 1:
            if x.id in self.info or x.id in self.selected:
                return self.opaque(node, "batch norms over computed parameters keep their channels")
            return
        name = names.pop()
        m = self.modules[name]
        attrs = tuple(a.id for a in node.args[1:5] if isinstance(a, Ref))
        attrs = tuple(self.c.param(v)[1] for v in attrs)
        src, selected = x.id, None
        if src in self.selected:
            src, sel_owner = self.selected[src]
            selected = getattr(m, "selected_index", None) if sel_owner == name else None
            if selected is None:
                return self.opaque(node, "index_select along channels")
        inp = self.info.get(src)
        n_in = len(self.c.concrete[node.args[1].id]) if isinstance(node.args[1], Ref) else None
        if self.ignored(name):
            return self.opaque(node, "ignored modules keep their channels")
        if inp is None or inp.dim != 1 or (selected is None and n_in is not None and len(inp.atoms) != n_in):
            return self.opaque(node, "batch norms reading untracked tensors keep their channels")
        self.consume(inp, f"BatchNorm '{name}'", node)
        source = inp.atoms if selected is None else inp.atoms[selected.cpu().numpy()]
        producer = self.conv_out.get(src)
        coupled = producer is not None and len(self.c.users[src]) == 1 and selected is None
        affine = getattr(m, "affine", True) and "weight" in attrs
        if coupled or not affine or type(m) not in _SELECTABLE_BATCHNORMS:
            atoms = source
            self.register(name, m, "bn", inp.atoms, atoms, source_atoms=source,
                          producer=producer if coupled else None, attrs=attrs)
        else:
            atoms = self.module_out.get(name)
            if atoms is None:
                atoms = self.g.new_atoms(len(source), name)
                for s, p in zip(atoms.tolist(), source.tolist()):
                    self.g.selection_parent[s] = p
                self.module_out[name] = atoms
            self.register(name, m, "selection_bn", inp.atoms, atoms, source_atoms=source, attrs=attrs)
        self.g.node_module[node.index] = (name, "bn")
        self.set(out, atoms, np.zeros(len(atoms), dtype=bool), 1)

    def view(self, node):
        x = node.args[0].id
        inf = self.info[x]
        in_shape, out_shape = self.shape(x), self.shape(node.outputs[0])
        mapped = _view_map(in_shape, out_shape, inf.dim)
        if mapped is None:
            split = _head_split(in_shape, out_shape, inf.dim) if node.op != "expand" else None
            if split is None:
                return self.opaque(node, f"reshapes that split or merge channels (aten.{node.op})")
            # Channel j of every group is one channel to the pruner (the groups keep equal sizes,
            # as the view needs); the output's channel dim is the per-group one.
            d, groups = split
            atoms, taint = inf.atoms.reshape(groups, -1), inf.taint.reshape(groups, -1)
            for k in range(1, groups):
                self.g.union(atoms[0], atoms[k])
            self.g.checks.append(node.index)
            return self.set(node.outputs[0], atoms[0].copy(), taint.any(0), d)
        d, block, outer = mapped
        changed = tuple(in_shape) != tuple(out_shape)
        if changed and node.op != "expand" and not self.sized_by_python(node, out_shape, d):
            self.g.checks.append(node.index)
        if block == outer == 1 and x in self.conv_out and len(self.c.users[x]) == 1:
            # Still the layer's output, its channels one to one (a BatchNorm1d over tokens,
            # linear(x).flatten(0, 1), as LeViT does): a BN reading it is coupled to the layer.
            self.conv_out[node.outputs[0]] = self.conv_out[x]
        self.set(node.outputs[0], np.tile(np.repeat(inf.atoms, block), outer),
                 np.tile(np.repeat(inf.taint, block), outer), d)

    @staticmethod
    def sized_by_python(node, out_shape, d):
        """The Python call computes the channel dimension's size itself (flatten, view(..., -1))."""
        if node.pycall is None:
            return False
        if node.pycall[0] == "flatten":
            return True
        if node.pycall[0] == "view":
            sizes = node.pycall[1]
            return len(sizes) == len(out_shape) and sizes[d] == -1
        return False

    def op_bmm(self, node):
        """A @ B over the last two dims ([b,] n, k @ [b,] k, m). Channels along k in both (attention
        scores q^T k) go together; channels of A's rows or B's columns stay channels of the
        output's rows or columns. Channels contracted against an untracked side stay (the other
        side's rows or columns still pass); two live channel dims in the output have no rule."""
        a, b = node.args[0].id, node.args[1].id
        nd = len(self.shape(a))
        ia, ib = self.info.get(a), self.info.get(b)
        da = None if ia is None else ia.dim - (nd - 2)  # 0: rows, 1: the contracted dim
        db = None if ib is None else ib.dim - (nd - 2)  # 0: the contracted dim, 1: columns
        if (ia is not None and da < 0) or (ib is not None and db < 0):
            return self.opaque(node, "matrix products with channels along the batch dim")
        if (da == 1) != (db == 0):
            # Channels contracted against values that are not channels (a global-context block's
            # x @ softmax(attention map), whose single attention channel lies along the pixels): those
            # stay, the other side's row or column channels still pass through.
            side = ia if da == 1 else ib
            self.g.freeze(side.atoms, "matrix products contracting channels with untracked values",
                          self.where(node))
            if da == 1:
                ia = da = None
            else:
                ib = db = None
        out = node.outputs[0]
        if da == 1:
            if len(ia.atoms) != len(ib.atoms):
                return self.opaque(node, "matrix products contracting different channel counts")
            self.g.union(ia.atoms, ib.atoms)
            self.consume(ia, "a matrix product", node)
            self.consume(ib, "a matrix product", node)
            inf = self.fresh(out, dim=nd - 2)
            if inf is not None:
                self.info[out] = inf
            return
        rows = ia if da == 0 else None
        cols = ib if db == 1 else None
        if rows is not None and cols is not None:  # one side's channels must be fixed ones
            if self.g.frozen[rows.atoms].all():
                rows = None
            elif self.g.frozen[cols.atoms].all():
                cols = None
            else:
                return self.opaque(node, "matrix products with channels in both rows and columns")
        live = rows if rows is not None else cols
        if live is None:
            inf = self.fresh(out, dim=nd - 2)
            if inf is not None:
                self.info[out] = inf
            return
        self.set(out, live.atoms, live.taint, nd - 2 if live is rows else nd - 1)

    op_mm = op_bmm

    def op_permute(self, node):
        inf = self.info[node.args[0].id]
        dims = [_norm_dim(d, len(node.args[1])) for d in node.args[1]]
        self.set(node.outputs[0], inf.atoms, inf.taint, dims.index(inf.dim))

    def op_transpose(self, node):
        inf = self.info[node.args[0].id]
        nd = len(self.shape(node.args[0].id))
        a, b = _norm_dim(node.args[1], nd), _norm_dim(node.args[2], nd)
        d = b if inf.dim == a else a if inf.dim == b else inf.dim
        self.set(node.outputs[0], inf.atoms, inf.taint, d)

    def op_t(self, node):
        inf = self.info[node.args[0].id]
        self.set(node.outputs[0], inf.atoms, inf.taint, 1 - inf.dim if len(self.shape(node.args[0].id)) == 2 else 0)

    def op_unsqueeze(self, node):
        inf = self.info[node.args[0].id]
        d = _norm_dim(node.args[1], len(self.shape(node.outputs[0])))
        self.set(node.outputs[0], inf.atoms, inf.taint, inf.dim + 1 if d <= inf.dim else inf.dim)

    def op_squeeze(self, node):
        x = node.args[0].id
        inf = self.info[x]
        in_shape = self.shape(x)
        dims = node.args[1] if len(node.args) > 1 else None
        if dims is None:
            dims = [i for i, s in enumerate(in_shape) if s == 1]
        elif isinstance(dims, int):
            dims = [dims]
        dims = {_norm_dim(d, len(in_shape)) for d in dims if in_shape[_norm_dim(d, len(in_shape))] == 1}
        if inf.dim in dims:
            return self.opaque(node, "squeezing a one-channel dimension")
        self.set(node.outputs[0], inf.atoms, inf.taint, inf.dim - sum(d < inf.dim for d in dims))

    def op_select(self, node):
        x = node.args[0].id
        inf = self.info[x]
        d = _norm_dim(node.args[1], len(self.shape(x)))
        if d == inf.dim:
            return self.opaque(node, "selecting one channel (x[:, i])")
        self.set(node.outputs[0], inf.atoms, inf.taint, inf.dim - (d < inf.dim))

    def op_unbind(self, node):
        x = node.args[0].id
        inf = self.info[x]
        d = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(self.shape(x)))
        if d == inf.dim:
            return self.opaque(node, "unbinding the channel dimension")
        for v in node.outputs:
            self.set(v, inf.atoms, inf.taint, inf.dim - (d < inf.dim))

    def op_slice(self, node):
        x = node.args[0].id
        inf = self.info[x]
        n = self.shape(x)
        d = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(n))
        if d != inf.dim:
            self.info[node.outputs[0]] = inf
            return
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else n[d]
        step = node.args[4] if len(node.args) > 4 else 1
        idx = np.arange(n[d])[slice(start, end, step)]
        if step != 1:
            return self.opaque(node, "strided slices of channels")
        if len(idx) != n[d]:
            self.g.checks.append(node.index)
        self.set(node.outputs[0], inf.atoms[idx], inf.taint[idx], d)

    def op_narrow(self, node):
        x = node.args[0].id
        inf = self.info[x]
        d = _norm_dim(node.args[1], len(self.shape(x)))
        if d != inf.dim:
            self.info[node.outputs[0]] = inf
            return
        start, length = node.args[2], node.args[3]
        if length != len(inf.atoms):
            self.g.checks.append(node.index)
        self.set(node.outputs[0], inf.atoms[start:start + length], inf.taint[start:start + length], d)

    def op_split(self, node):
        x = node.args[0].id
        inf = self.info[x]
        nd = len(self.shape(x))
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        d = _norm_dim(dim, nd)
        if d != inf.dim:
            for v in node.outputs:
                self.info[v] = inf
            return
        sizes = [self.shape(v)[d] for v in node.outputs]
        bounds = np.cumsum([0] + sizes)
        pieces = [(inf.atoms[a:b], inf.taint[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        equal = len(set(sizes)) == 1
        if equal:  # channel j of every piece goes together, so equal pieces stay equal
            for atoms, _ in pieces[1:]:
                self.g.union(pieces[0][0], atoms)
        if not (equal and node.pycall == ("chunk",)) and len(pieces) > 1:
            self.g.checks.append(node.index)
        elif len(pieces) > 1:
            self.g.chunks.append(node.index)
        for v, (atoms, taint) in zip(node.outputs, pieces):
            self.set(v, atoms, taint, d)

    op_split_with_sizes = op_split
    op_unsafe_split = op_split
    op_unsafe_split_with_sizes = op_split

    def op_cat(self, node):
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out = node.outputs[0]
        infos = [self.info.get(t.id) for t in tensors]
        if any(i is None for i in infos):
            return self.opaque(node, "concatenations with untracked tensors")
        d = _norm_dim(dim, len(self.shape(out)))
        if all(i.dim == d for i in infos):
            self.set(out, np.concatenate([i.atoms for i in infos]), np.concatenate([i.taint for i in infos]), d)
            return
        if all(i.dim == infos[0].dim for i in infos) and all(len(i.atoms) == len(infos[0].atoms) for i in infos):
            for i in infos[1:]:
                self.g.union(infos[0].atoms, i.atoms)
            self.set(out, infos[0].atoms, np.logical_or.reduce([i.taint for i in infos]), infos[0].dim)
            return
        return self.opaque(node, "concatenations along mixed dimensions")

    def op_stack(self, node):
        tensors = node.args[0]
        infos = [self.info.get(t.id) for t in tensors]
        out = node.outputs[0]
        d = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(self.shape(out)))
        if any(i is None for i in infos) or any(i.dim != infos[0].dim or len(i.atoms) != len(infos[0].atoms)
                                                for i in infos):
            return self.opaque(node, "stacks of unlike tensors")
        for i in infos[1:]:
            self.g.union(infos[0].atoms, i.atoms)
        cd = infos[0].dim + (d <= infos[0].dim)
        self.set(out, infos[0].atoms, np.logical_or.reduce([i.taint for i in infos]), cd)

    def op_constant_pad_nd(self, node):
        x = node.args[0].id
        inf = self.info[x]
        pad = node.args[1]
        value = node.args[2] if len(node.args) > 2 else 0
        nd = len(self.shape(x))
        padded = {nd - 1 - i // 2 for i in range(len(pad)) if pad[i] != 0}
        if inf.dim in padded:
            return self.opaque(node, "padding along channels")
        taint = inf.taint if value == 0 else np.ones(len(inf.atoms), dtype=bool)
        self.set(node.outputs[0], inf.atoms, taint, inf.dim)

    def spatial(self, node):
        x = node.args[0].id
        inf = self.info[x]
        if inf.dim != 1 or self.shape(node.outputs[0])[1] != len(inf.atoms):
            return self.opaque(node, f"aten.{node.op} over channels")
        for v in node.outputs:  # max pooling's indices: not zero for a zero channel
            self.set(v, inf.atoms, inf.taint if v == node.outputs[0] else np.ones(len(inf.atoms), dtype=bool), 1)

    def reduce(self, node, base):
        x = node.args[0].id
        inf = self.info[x]
        nd = len(self.shape(x))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            return self.opaque(node, "reductions over every dimension")
        dims = {_norm_dim(d, nd) for d in (dims if isinstance(dims, (list, tuple)) else (dims,))}
        if inf.dim in dims:
            return self.opaque(node, "reductions over channels")
        for v in node.outputs:
            keep = len(self.shape(v)) == nd
            d = inf.dim if keep else inf.dim - sum(k < inf.dim for k in dims)
            ok = v == node.outputs[0] and base not in _TAINTING_REDUCTIONS
            self.set(v, inf.atoms, inf.taint if ok else np.ones(len(inf.atoms), dtype=bool), d)

    def op__softmax(self, node):
        x = node.args[0].id
        inf = self.info[x]
        if _norm_dim(node.args[1], len(self.shape(x))) == inf.dim:
            return self.opaque(node, "softmax over channels")
        self.set(node.outputs[0], inf.atoms, np.ones(len(inf.atoms), dtype=bool), inf.dim)

    op__log_softmax = op__softmax

    def op_native_layer_norm(self, node):
        x = node.args[0].id
        inf = self.info[x]
        nd = len(self.shape(x))
        if inf.dim >= nd - len(node.args[1]):
            return self.opaque(node, "layer norms over channels")
        self.set(node.outputs[0], inf.atoms, np.ones(len(inf.atoms), dtype=bool), inf.dim)

    def pointwise(self, node, base):
        out = node.outputs[0]
        n = len(self.shape(out))
        tracked, others = [], []
        cdim = None
        for pos, a in enumerate(node.args):
            if not isinstance(a, Ref):
                continue
            s = self.shape(a.id)
            inf = self.info.get(a.id)
            if inf is None:
                others.append((pos, a.id, s))
                continue
            d = inf.dim + n - len(s)
            if s[inf.dim] == 1 and self.shape(out)[d] != 1:
                # one channel broadcast over many: it cannot be removed from under the others
                self.g.freeze(inf.atoms, "single channels broadcast over a channel dimension", self.where(node))
                others.append((pos, a.id, s))
                continue
            if cdim not in (None, d):
                return self.opaque(node, "element-wise ops between tensors with different channel dims")
            cdim = d
            tracked.append((pos, inf))
        if not tracked:
            for v in node.outputs:
                inf = self.fresh(v) if len(self.shape(v)) >= 2 else None
                if inf is not None:
                    self.info[v] = inf
            return
        first = tracked[0][1]
        for _, inf in tracked[1:]:
            if len(inf.atoms) != len(first.atoms):
                return self.opaque(node, "element-wise ops between different channel counts")
            self.g.union(first.atoms, inf.atoms)
        taint = np.logical_or.reduce([inf.taint for _, inf in tracked])
        untracked_values = []  # per-channel values of aligned constant operands (None: unknown)
        for pos, v, s in others:
            k = cdim - (n - len(s))
            if 0 <= k < len(s) and s[k] != 1:  # an untracked tensor along the channels
                pv = self.param_vector(v)
                if pv is None or pv[2] != k or self.ignored(pv[0]):
                    return self.opaque(node, "element-wise ops with computed per-channel tensors")
                mname, attr, _, pdim = pv
                if pdim > 1:
                    return self.opaque(node, "element-wise ops with per-channel tensors laid out otherwise")
                key = f"{mname}.{attr}" if mname else attr
                self.register(key, self.modules[mname], "channel_param", first.atoms, first.atoms,
                              attrs=(attr,), dim=pdim)
                untracked_values.append(getattr(self.modules[mname], attr).detach().reshape(-1).cpu().numpy())
            else:
                untracked_values.append(None)
        ones = np.ones(len(first.atoms), dtype=bool)
        if base == "mul":  # an untainted zero factor zeroes the product
            taint = np.logical_and.reduce([inf.taint for _, inf in tracked])
            for vals in untracked_values:
                if vals is not None:
                    taint = taint | ~np.isfinite(vals)
        elif base in ("div", "true_divide"):
            taint = ones if any(pos == 1 for pos, _ in tracked) else tracked[0][1].taint.copy()  # x/0: not 0
        elif base in ("add", "sub"):
            other = node.args[1] if len(node.args) > 1 else None
            if isinstance(other, (int, float)) and other != 0:
                taint = ones
            for vals in untracked_values:
                taint = taint | (ones if vals is None else vals != 0)
        elif base == "_prelu_kernel":
            pass  # prelu(0) = 0 whatever the slope
        elif others:
            taint = ones  # other tensors' values are unknown
        elif _nonzero_at_zero(node):
            taint = ones
        for v in node.outputs:
            self.set(v, first.atoms, taint, cdim)

    # -- residual blocks -------------------------------------------------------------------------
    def find_residual_blocks(self):
        """Submodule calls whose output is their input plus a branch computed inside them."""
        c = self.c
        for call in c.calls:
            if len(call.outputs) != 1 or not call.inputs or call.inputs[0] is None or call.outputs[0] is None:
                continue
            out = call.outputs[0]
            node = c.nodes[c.producer[out]]
            if node.op not in ("add", "add_") or not (call.start <= node.index < call.end):
                continue
            refs = [a.id for a in node.args[:2] if isinstance(a, Ref)]
            x = call.inputs[0]
            if len(refs) != 2 or refs.count(x) != 1 or len(node.args) > 2 and node.args[2] != 1:
                continue
            if out not in self.info or x not in self.info:
                continue
            branch = refs[1] if refs[0] == x else refs[0]
            inside = range(call.start, call.end)
            if any(not (c.producer[v] in inside or v == x or c.nodes[c.producer[v]].op in ("param", "constant"))
                   for n in c.nodes[call.start:call.end] for v in n.refs()):
                continue
            last = c.nodes[c.producer[branch]]
            while last.func is not None and last.op in ("relu", "relu_", "clone") and last.refs():
                last = c.nodes[c.producer[last.refs()[0]]]
            name = self.producing_module(last)
            if name is None:
                continue
            m = self.modules[name]
            if isinstance(m, _BATCHNORMS):  # conv -> BN ends the branch
                bn_in = last.args[0].id if last.args and isinstance(last.args[0], Ref) else None
                name = self.conv_out.get(bn_in)
                if name is None:
                    continue
                m = self.modules[name]
            if not isinstance(m, (*_CONVS, nn.Linear)):
                continue
            padding = getattr(m, "padding", (0,))
            padded = padding == "same" or (not isinstance(padding, str) and any(p > 0 for p in padding))
            exact = not (padded and getattr(m, "padding_mode", "zeros") == "zeros")
            self.g.residual_blocks.append(ResidualBlock(call.name, self.info[out].atoms, name, exact, branch))

    def producing_module(self, node):
        if node.op == "leaf":
            return node.module
        for v in node.outputs:
            if v in self.conv_out:
                return self.conv_out[v]
        if _op_name(node) in _BN_OPS:
            owners = {self.c.param(a.id) for a in node.args[1:5] if isinstance(a, Ref)} - {None}
            if len({o[0] for o in owners}) == 1:
                return owners.pop()[0]
        return None


_NONZERO_AT_ZERO = {}  # (op, its non-tensor arguments) -> answer: the same activation recurs in every block


def _nonzero_at_zero(node):
    """Whether the op maps zero inputs to a nonzero value: evaluated on zero scalars with the op's
    other arguments (f(0) for relu, sigmoid, clamp(x, 0.1), x ** 2, ...)."""
    try:
        key = (node.func, tuple(None if isinstance(a, Ref) else a for a in node.args),
               tuple(sorted((k, None if isinstance(a, Ref) else a) for k, a in node.kwargs.items())))
        hash(key)
    except TypeError:  # an unhashable argument (a list): evaluate every time
        return _evaluate_at_zero(node)
    answer = _NONZERO_AT_ZERO.get(key)
    if answer is None:
        answer = _NONZERO_AT_ZERO[key] = _evaluate_at_zero(node)
    return answer


def _evaluate_at_zero(node):
    args = [torch.zeros((), dtype=torch.float32) if isinstance(a, Ref) else a for a in node.args]
    kwargs = {k: (torch.zeros((), dtype=torch.float32) if isinstance(a, Ref) else a) for k, a in node.kwargs.items()}
    kwargs.pop("out", None)
    try:
        r = node.func(*args, **kwargs)
    except Exception:
        return True
    r = r[0] if isinstance(r, (tuple, list)) else r
    if not isinstance(r, torch.Tensor):
        return True
    r = r.double() if r.dtype != torch.bool else r
    return bool((r != 0).any()) or bool(torch.isnan(r).any()) if r.dtype != torch.bool else bool(r.any())


def analyze(model, example_inputs, ignore=(), leaf_modules=(), keep_outputs=None):
    """Captures ``model`` and returns its ChannelGraph. ``ignore``: module names whose channels
    stay; ``keep_outputs``: None (every output keeps its channels) or the paths of the outputs that
    do (see slimcore.pruning.capture.tensor_paths; a path also keeps everything under it)."""
    leaves = (nn.Linear, *PLAIN_CONV, *leaf_modules)
    cap = capture(model, example_inputs, leaf_modules=leaves)
    if keep_outputs is not None:
        for p in keep_outputs:
            if not any(q == p or q.startswith(p + ".") or p == "" for q in cap.output_paths):
                raise ValueError(f"slimcore.prune: keep_outputs names '{p}', which is not an output of the model; "
                                 f"its tensor outputs are at {', '.join(repr(q) for q in cap.output_paths)}")
    return _Rules(model, cap, set(ignore), keep_outputs).run()


# ---------------------------------------------------------------------------------------- verify


def meta_copy(model, device="meta"):
    """A structural copy of ``model``: every module copied (its attributes shallowly), parameters
    and buffers replaced by meta tensors (no data) or uninitialised ones on ``device`` (integer
    ones, index tables, keep their values there). Far
    cheaper than copy.deepcopy, which copies every attribute of every module deeply."""
    tensors, modules = {}, {}

    def data_less(t):
        new = tensors.get(id(t))
        if new is None:
            if device != "meta" and not (t.is_floating_point() or t.is_complex()):
                # integer tensors are index tables (relative position indices): garbage there would
                # index out of bounds; they hold no channels, so their values are kept
                new = t.detach().to(device, copy=True)
            else:
                new = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
            if isinstance(t, nn.Parameter):
                new = nn.Parameter(new, requires_grad=t.requires_grad)
            tensors[id(t)] = new
        return new

    def copy_module(m):
        new = modules.get(id(m))
        if new is None:
            new = modules[id(m)] = object.__new__(type(m))
            new.__dict__ = m.__dict__.copy()
            new._parameters = {k: None if t is None else data_less(t) for k, t in m._parameters.items()}
            new._buffers = {k: None if t is None else data_less(t) for k, t in m._buffers.items()}
            new._modules = {k: None if c is None else copy_module(c) for k, c in m._modules.items()}
        return new

    return copy_module(model)


def expected_shape(graph, v, kept_atom):
    """The shape value v should have in the pruned model."""
    shape = list(graph.capture.shapes[v])
    inf = graph.info.get(v)
    if inf is not None and len(inf.atoms):
        shape[inf.dim] = int(kept_atom[inf.atoms].sum())
    return tuple(shape)


def _node_keys(cap):
    """(module stack, op, occurrence) of every node."""
    counts = defaultdict(int)
    keys = []
    for node in cap.nodes:
        k = (node.stack, node.op)
        keys.append((k, counts[k]))
        counts[k] += 1
    return keys


class _NodeMatch:
    """Which node of a capture of the pruned model is node i of the dense capture. Nodes are
    compared per module stack, as sequences of op names aligned by difflib: the pruned model may
    run ops the dense capture did not (a cache keyed by a shape that changed: ultralytics' Detect
    remakes its anchors) or skip some (collapsed blocks), and the rest must still line up."""

    def __init__(self, old, new):
        self.old, self.new = self._by_stack(old), self._by_stack(new)
        self.position = {}  # dense node index -> (stack, position in its stack's list)
        for stack, nodes in self.old.items():
            for k, node in enumerate(nodes):
                self.position[node.index] = (stack, k)
        self.maps = {}

    @staticmethod
    def _by_stack(cap):
        out = defaultdict(list)
        for node in cap.nodes:
            out[node.stack].append(node)
        return out

    def __call__(self, i):
        stack, k = self.position[i]
        m = self.maps.get(stack)
        if m is None:
            old, new = self.old[stack], self.new.get(stack, [])
            m = self.maps[stack] = {}
            matcher = difflib.SequenceMatcher(None, [n.op for n in old], [n.op for n in new], autojunk=False)
            for a, b, size in matcher.get_matching_blocks():
                for t in range(size):
                    m[a + t] = new[b + t]
        return m.get(k)


@dataclass
class SizeMismatch:
    """A node of the model's code whose sizes do not follow the plan in the pruned model."""

    node: object  # the capture's Node (None: not located)
    changes: dict  # old size -> the size the plan needs, for the integers the node was given
    message: str
    unverified: list = field(default_factory=list)  # check nodes never reached (the pruned model failed first)


def verify(graph, pruned_meta, example_inputs, kept_atom, device="meta"):
    """Runs a pruned data-less copy of the model and compares the sizes at every node listed in
    ``graph.checks`` and at the outputs with the plan. Returns the SizeMismatches, in model order
    (empty: the pruned model follows the plan)."""
    cap = graph.capture
    meta_inputs = tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                        if isinstance(t, torch.Tensor) and device == "meta" else t for t in example_inputs)
    failure = None
    try:
        new = capture(pruned_meta, meta_inputs, leaf_modules=(nn.Linear, *PLAIN_CONV))
    except TraceFailure as exc:
        failure = exc
        new = getattr(exc, "partial", None)
        if new is None:
            return [SizeMismatch(None, {}, str(exc), list(graph.checks))]
    keys = _node_keys(cap)
    match = _NodeMatch(cap, new)
    checks = sorted(set(graph.checks) | {cap.producer[v] for v in cap.outputs})
    unverified, mismatches = [], []
    data_dependent = _first_data_dependent(cap)
    for i in checks:
        node = cap.nodes[i]
        twin = match(i)
        if twin is None:
            unverified.append(i)
            continue
        got = [tuple(new.shapes[v]) for v in twin.outputs]
        want = [expected_shape(graph, v, kept_atom) for v in node.outputs]
        dense = [cap.shapes[v] for v in node.outputs]
        if got != want and (i < data_dependent or not _follows_plan(got, want, dense)):
            mismatches.append(SizeMismatch(
                node, size_changes(graph, node, kept_atom),
                f"aten.{node.op} in {_where(node)} gives sizes {got} where the plan needs {want}"))
    if failure is not None:
        key = getattr(failure, "failed_key", None)
        node = None
        if key is not None and key[1] is None:
            # No op was running: the dense node at the same place in that module's ops stands for
            # the failing line (the op it would have dispatched), so its channels can be frozen.
            stack = key[0]
            ran = sum(1 for n in new.nodes if n.stack == stack)
            dense = [n for n in cap.nodes if n.stack == stack]
            node = dense[ran] if ran < len(dense) else None
        elif key is not None:
            occurrence = sum(1 for n in new.nodes if (n.stack, n.op) == key)
            i = next((i for i, k in enumerate(keys) if k == (key, occurrence)), None)
            node = cap.nodes[i] if i is not None else None
        if not mismatches or node is not None and node.index < mismatches[0].node.index:
            mismatches.insert(0, SizeMismatch(
                node, size_changes(graph, node, kept_atom) if node is not None else {},
                f"the pruned model does not run: {failure.__cause__ or failure}", unverified))
    return mismatches


# Ops whose output sizes depend on the values (score thresholds, NMS). The data-less copy of the
# pruned model gets other sizes from them, and may take other paths after them. (.item() is left
# out: models read scalars for other reasons, and the check after it would be weaker.)
_DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique_dim", "_unique", "_unique2", "unique_consecutive",
                   "repeat_interleave", "nms", "batched_nms"}


def _first_data_dependent(cap):
    """Index of the first node whose output sizes depend on values (boolean-mask indexing too)."""
    for node in cap.nodes:
        if node.op in _DATA_DEPENDENT:
            return node.index
        indices = node.args[1] if node.op in ("index", "_index_put_impl", "index_put") and len(node.args) > 1 else ()
        if isinstance(indices, (list, tuple)) and any(
                isinstance(a, Ref) and cap.dtypes[a.id] in (torch.bool, torch.uint8) for a in indices):
            return node.index
    return len(cap.nodes)


def _follows_plan(got, want, dense):
    """After a data-dependent op: the pruned copy's sizes are wrong only where the plan changes a
    size (a channel count) and the copy does not follow it; other sizes may come from the data."""
    if len(got) != len(want):
        return True  # another path through the code (nothing detected): not a channel question
    for g, w, d in zip(got, want, dense):
        if len(g) == len(w) and any(gj != wj for gj, wj, dj in zip(g, w, d) if wj != dj):
            return False
    return True


def _where(node):
    return f"'{node.stack[-1]}'" if node.stack else "the model's forward"


def size_changes(graph, node, kept_atom):
    """{old: new} for the integer sizes a split/slice/narrow/view was given, where the plan needs
    new ones (conflicting demands on one old value: left out)."""
    cap, info = graph.capture, graph.info
    x = node.args[0].id if node.args and isinstance(node.args[0], Ref) else None
    inf = info.get(x) if x is not None else None
    pairs = []
    if node.op in ("split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes") and inf is not None:
        for v in node.outputs:
            pairs.append((cap.shapes[v][inf.dim], expected_shape(graph, v, kept_atom)[inf.dim]))
        # code often sizes equal pieces from the whole (x.split(self.channels // 2, 1))
        pairs.append((cap.shapes[x][inf.dim], expected_shape(graph, x, kept_atom)[inf.dim]))
    elif node.op in ("slice", "narrow") and inf is not None:
        n = cap.shapes[x][inf.dim]
        for pos in (2, 3):
            if len(node.args) > pos and isinstance(node.args[pos], int):
                old = node.args[pos]
                end = min(old if old >= 0 else old + n, n) if node.op == "slice" or pos == 2 else \
                    node.args[2] + old
                new = int(kept_atom[inf.atoms[:end]].sum())
                if node.op == "narrow" and pos == 3:
                    new -= int(kept_atom[inf.atoms[:node.args[2]]].sum())
                pairs.append((old, new))
    elif node.op in _VIEWS:
        v = node.outputs[0]
        pairs = list(zip(cap.shapes[v], expected_shape(graph, v, kept_atom)))
    changes = {}
    for old, new in pairs:
        if old != new:
            if changes.get(old, new) != new:
                changes[old] = None
            else:
                changes[old] = new
    return {k: v for k, v in changes.items() if v is not None}


def attribute_fixes(model, node, changes):
    """[(module name, attribute, old value, new value)]: the integer attributes (or tuples/lists of
    them) of the innermost module running ``node`` that hold an old size."""
    for name in reversed(node.stack):
        m = model.get_submodule(name)
        fixes = []
        for attr, value in vars(m).items():
            if attr.startswith("_") or isinstance(value, bool):
                continue
            if isinstance(value, int) and value in changes:
                fixes.append((name, attr, value, changes[value]))
            elif isinstance(value, (list, tuple)) and value and all(
                    isinstance(a, int) and not isinstance(a, bool) for a in value) and any(a in changes for a in value):
                fixes.append((name, attr, value, type(value)(changes.get(a, a) for a in value)))
        if fixes:
            return fixes
    return []


# ---------------------------------------------------------------------------------------- constants

# Ops that only move channels around (or reduce other dimensions): a channel's constant follows its atom.
_MOVES = _SAME | _VIEWS | {"permute", "transpose", "t", "unsqueeze", "squeeze", "select", "unbind", "slice",
                           "narrow", "split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes",
                           "index_select", "mean", "amax", "amin", "max", "min"} | (
    _SPATIAL - {"avg_pool1d", "avg_pool2d", "avg_pool3d"})  # zero-padded averages change near borders


def constants(graph, removed_atom, betas=True):
    """The constant each removed channel carries where it flows, computed from the capture alone:
    a removed BN channel emits its beta (``betas``; else 0), a removed conv/linear channel 0, and
    element-wise ops, pooling, reshapes, concatenations, splits and reductions carry that on
    (relu(beta), x * sigmoid(0), ...). Returns {value id: float64 array per channel, NaN where the
    channel is not a known constant}; values without constants are left out."""
    cap, info = graph.capture, graph.info
    const = {}
    for node in cap.nodes:
        outs = [v for v in node.outputs if v in info]
        if not outs:
            continue
        owner = graph.node_module.get(node.index)
        if owner is not None and owner[1] in ("producer", "bn"):
            name, kind = owner
            atoms = info[outs[0]].atoms
            values = np.full(len(atoms), np.nan)
            gone = removed_atom[atoms]
            x = node.args[0].id if node.args and isinstance(node.args[0], Ref) else None
            if x in const and np.isfinite(const[x]).all():  # every input a constant (a collapsed branch)
                values = _module_response(graph.modules[name], const[x])
                if values is not None:
                    values = values.copy()
                    values[gone] = np.nan
            if values is None:
                values = np.full(len(atoms), np.nan)
            if kind == "bn" and betas and getattr(graph.modules[name].module, "bias", None) is not None:
                beta = graph.modules[name].module.bias.detach().double().cpu().numpy()
                values[gone] = beta[gone]
            else:
                values[gone] = 0.0
            if gone.any() or np.isfinite(values).any():
                const[outs[0]] = values
            continue
        ins = [v for v in node.refs() if v in const]
        if not ins:
            continue
        if owner is not None:  # ResidualConstant: x + c
            c = graph.modules[owner[0]].module.constant.detach().double().cpu().numpy()
            const[outs[0]] = const[ins[0]] + c
            continue
        name = node.op[:-1] if node.op.endswith("_") and not node.op.endswith("__") else node.op
        if name in _MOVES or _constant_average(node) or (name == "cat" and all(
                info[t.id].dim == info[outs[0]].dim for t in node.args[0] if t.id in info)):
            by_atom = {}
            for v in node.refs():
                if v in info:
                    c = const.get(v, np.full(len(info[v].atoms), np.nan))
                    by_atom.update(zip(info[v].atoms.tolist(), c.tolist()))
            for v in outs:
                values = np.array([by_atom.get(a, np.nan) for a in info[v].atoms.tolist()])
                if name == "sum":
                    values = values * _reduced_size(cap, node)
                if not np.isnan(values).all():
                    const[v] = values
        elif name in _ACTIVATIONS or name in _REDUCTIONS and name == "sum" or (
                node.func is not None and torch.Tag.pointwise in node.func.tags):
            values = _evaluate(graph, node, const, outs[0])
            if values is not None and name != "sum":
                const[outs[0]] = values
            elif name == "sum" and ins:
                v = node.args[0].id
                if v in const:
                    const[outs[0]] = const[v] * _reduced_size(cap, node)
    return const


def _constant_average(node):
    """An average pooling that maps a constant plane to the same constant: no zero padding counted
    in (padding 0 without ceil_mode, or count_include_pad=False) and no divisor override."""
    if node.op not in ("avg_pool1d", "avg_pool2d", "avg_pool3d"):
        return False
    args = list(node.args) + [None] * 7
    padding, ceil_mode = args[3] or (0,), bool(args[4])
    count_include_pad = True if args[5] is None else bool(args[5])
    if args[6] is not None:
        return False
    return not count_include_pad or (not any(padding) and not ceil_mode)


def _reduced_size(cap, node):
    x = node.args[0].id
    shape = cap.shapes[x]
    dims = node.args[1] if len(node.args) > 1 else None
    dims = dims if isinstance(dims, (list, tuple)) else (dims,)
    return math.prod(shape[_norm_dim(d, len(shape))] for d in dims)


def _evaluate(graph, node, const, out):
    """An element-wise op on the channels' constants (one value per channel, float64)."""
    info, cap = graph.info, graph.capture
    n = len(info[out].atoms)
    args = []
    for a in node.args:
        if isinstance(a, Ref):
            if a.id in info:
                c = const.get(a.id)
                if c is None or len(c) != n:
                    if cap.shapes[a.id][info[a.id].dim] == 1:
                        return None
                    c = np.full(n, np.nan)
                args.append(torch.from_numpy(c))
            else:
                t = cap.concrete.get(a.id)
                if t is None:
                    pv = _param_values(graph, a.id, n)
                    if pv is None:
                        return None
                    args.append(pv)
                elif t.numel() == 1:
                    args.append(t.detach().double().reshape(()).cpu())
                elif t.numel() == n:
                    args.append(t.detach().double().reshape(-1).cpu())
                else:
                    return None
        else:
            args.append(a)
    try:
        r = node.func(*args, **{k: v for k, v in node.kwargs.items() if not isinstance(v, Ref)})
    except Exception:
        return None
    r = r[0] if isinstance(r, (tuple, list)) else r
    if not isinstance(r, torch.Tensor) or r.numel() != n:
        return None
    r = r.double().reshape(-1).numpy()
    return None if np.isnan(r).all() else r


def _param_values(graph, v, n):
    """The values of a parameter seen through a view, one per channel."""
    node = graph.capture.node_of(v)
    for _ in range(8):
        if node.op == "param":
            t = graph.capture.concrete[node.outputs[0]]
            return t.detach().double().reshape(-1).cpu() if t.numel() == n else None
        if not node.args or not isinstance(node.args[0], Ref):
            return None
        node = graph.capture.node_of(node.args[0].id)
    return None


def _module_response(mc, c):
    """What a conv, linear or BN outputs, per channel, for an input that is constant per channel
    (None where it is not a constant: zero-padded convs change near the borders)."""
    m = mc.module
    x = torch.from_numpy(c)
    with torch.no_grad():
        if mc.kind == "linear":
            w = m.weight.detach().double().cpu()
            out = w @ x
            return (out + m.bias.detach().double().cpu() if m.bias is not None else out).numpy()
        if mc.kind in ("conv", "grouped_conv", "depthwise_conv"):
            padding = m.padding
            padded = padding == "same" or (not isinstance(padding, str) and any(p > 0 for p in padding))
            if padded and m.padding_mode == "zeros" or "compensation" in m._buffers:
                return None
            w = m.weight.detach().double().cpu()
            g = m.groups
            per_input = w.flatten(2).sum(2)  # (out, in/groups): a constant plane meets the whole kernel
            xs = x.reshape(g, -1)
            out = torch.cat([per_input[k * (w.shape[0] // g):(k + 1) * (w.shape[0] // g)] @ xs[k] for k in range(g)])
            return (out + m.bias.detach().double().cpu() if m.bias is not None else out).numpy()
        if mc.kind == "bn" and isinstance(m, _BATCHNORMS) and m.running_mean is not None:
            scale = (m.running_var.detach().double().cpu() + m.eps).rsqrt()
            out = (x - m.running_mean.detach().double().cpu()) * scale
            if m.weight is not None:
                out = out * m.weight.detach().double().cpu() + m.bias.detach().double().cpu()
            return out.numpy()
    return None
