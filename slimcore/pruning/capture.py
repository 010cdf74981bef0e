"""Capture: the model as an ATen-level graph, recorded while it runs once on the example inputs.

A ``TorchDispatchMode`` sees every ATen op the model's Python code runs, after torch's own
decompositions, so ``nn.BatchNorm2d``, ``F.batch_norm``, timm's ``BatchNormAct2d`` and a user's BN
wrapper all arrive as the same batch-norm op, and any Python control flow (on shapes, lists of
tensors, attributes) simply runs: whatever runs can be captured, which torch.fx's symbolic tracing
cannot promise (it stops at YOLO's Detect head and many timm blocks). torch.export captures those
too, but costs ~1 s per model where this costs about one forward pass.

What is recorded, per op: the overload, its arguments with each tensor replaced by a
:class:`Ref` to a recorded value, the values it produced (an in-place op produces a new version of
the tensor it wrote), and the stack of modules running it (global module hooks). Parameters and
buffers become values named by their owning module and attribute. A ``TorchFunctionMode`` notes
the Python call behind size-sensitive ops (``chunk``, ``flatten``, ``view(..., -1)``), which ATen
alone cannot tell from ``split(int)`` or a view with sizes written into the code.

Only shapes matter to the pruner, so by default convolutions and matrix products are not computed:
the mode returns uninitialised tensors of their output shape and layout (a line of Python for
convolutions, the meta kernel for the rest). Values downstream of them are then not the model's,
so the batch norms, activations and element-wise arithmetic that read them get their outputs the
same way (shape rules below); any other op runs on the garbage. Should the model's Python read such
a value (``.item()``, ``nonzero``), the capture starts again computing everything. resnet50 at
224x224, 2 threads: 25 ms, against 100 ms capturing with every op computed (78 ms plain forward).
"""

import os
import sys
import traceback
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .._modules import eval_mode
from .modules import LEAF_MODULES

aten = torch.ops.aten
_SEQUENCES = (list, tuple)
_NUMBERS = (int, float, bool)

# Ops computed only for their shape in the default capture: the bulk of a forward's time.
_SHAPE_ONLY = {
    aten.convolution.default, aten.addmm.default, aten.mm.default, aten.bmm.default, aten.baddbmm.default,
}
# Ops that hand tensor values to Python or size their output by them: they need real values.
_READS_VALUES = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.unique_dim.default,
    aten._unique2.default, aten.unique_consecutive.default, aten.is_nonzero.default, aten.equal.default,
    aten.repeat_interleave.Tensor,
}


class TraceFailure(RuntimeError):
    """The model could not be captured: running it on the example inputs raised."""


class _NeedsValues(Exception):
    """The model read a value the shape-only capture did not compute."""


class Ref:
    """A recorded tensor value in a node's arguments."""

    __slots__ = ("id",)

    def __init__(self, value_id):
        self.id = value_id

    def __repr__(self):
        return f"%{self.id}"


@dataclass(eq=False)
class Node:
    """One recorded op. ``op`` is the ATen overload packet's name ("convolution", "add_", ...), or
    "input", "param", "output", "leaf" (a leaf module's whole call) or "alias_write" (an in-place
    op changed a tensor that shares its memory: its value is no longer traced)."""

    index: int
    op: str
    func: object
    args: tuple
    kwargs: dict
    outputs: tuple  # value ids of the tensors it produced, in order
    stack: tuple  # names of the modules running it, outermost first (the root model is not listed)
    pycall: tuple = None  # the Python-level call it came from, when size-sensitive: ("chunk",), ("flatten",), ...
    module: str = None  # "param": the owning module; "leaf": the leaf module
    attr: str = None  # "param": the attribute name
    reads: tuple = None  # refs(), kept: the graph rules ask for them several times per node

    def refs(self):
        """Value ids read by this node, in argument order (nested lists flattened)."""
        if self.reads is None:
            out = []
            _collect_refs(self.args, out)
            _collect_refs(tuple(self.kwargs.values()), out)
            self.reads = tuple(out)
        return self.reads


def _collect_refs(obj, out):
    for a in obj:
        t = type(a)
        if t is Ref:
            out.append(a.id)
        elif t in _SEQUENCES or (t not in _NUMBERS and isinstance(a, (list, tuple))):
            _collect_refs(a, out)


@dataclass(eq=False)
class Call:
    """One call of a submodule: its recorded inputs and outputs and the nodes it ran."""

    name: str
    inputs: list  # value ids of its tensor arguments (None where an argument is not a tensor)
    outputs: list = field(default_factory=list)
    start: int = 0  # first node index inside the call
    end: int = 0  # one past the last


@dataclass(eq=False)
class Capture:
    nodes: list = field(default_factory=list)
    shapes: list = field(default_factory=list)  # value id -> shape tuple
    dtypes: list = field(default_factory=list)  # value id -> torch.dtype
    producer: list = field(default_factory=list)  # value id -> index of the node that produced it
    users: list = field(default_factory=list)  # value id -> indices of the nodes reading it
    concrete: dict = field(default_factory=dict)  # value id -> tensor, for parameters, buffers and constants
    garbage: set = field(default_factory=set)  # value ids not computed (downstream of a shape-only op)
    calls: list = field(default_factory=list)  # Call per submodule call, in call order
    inputs: list = field(default_factory=list)  # value ids of the model's tensor inputs
    outputs: list = field(default_factory=list)  # value ids of the model's tensor outputs
    output_paths: list = field(default_factory=list)  # where each output sits in the returned structure
    computed: bool = False  # every op was computed (no shape-only ops)
    seconds: float = 0.0

    def node_of(self, value):
        return self.nodes[self.producer[value]]

    def param(self, value):
        """(module name, attribute) when value is a parameter or buffer of the model, else None."""
        node = self.nodes[self.producer[value]]
        return (node.module, node.attr) if node.op == "param" else None


def _storage_key(t):
    if t.is_meta:
        return None  # no memory: nothing can alias
    try:
        return (t.device, t.untyped_storage().data_ptr()) if t.numel() else None
    except (RuntimeError, NotImplementedError):
        return None


def _meta(t):
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


class _Recorder(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls):
        # torch wraps a mode's __torch_dispatch__ in torch._dynamo.disable unless told otherwise:
        # an import of dynamo on the first op (~1 s in a fresh process) and a frame per op, for
        # a mode that only ever runs eager code
        return False

    def __init__(self, capture, model, leaf_types, leaf_ids, shape_only):
        super().__init__()
        self.c = capture
        self.shape_only = shape_only
        # Recorded tensors carry their value id as an attribute (with this capture's token), so they
        # can be freed as the forward goes on; tensors the model holds (parameters, buffers,
        # cached constants) are looked up by id and kept alive until the capture ends.
        self.token = object()
        self.by_id = {}  # id(tensor) -> value id, for tensors first seen as arguments
        self.alive = []
        self.by_storage = {}  # storage key -> {id: weak reference} of tensors sharing it (writes through views)
        self.names = {}  # id(module) -> its first name
        self.leaf_types, self.leaf_ids = leaf_types, leaf_ids
        self.owner = {}  # id(param/buffer) -> (module name, attribute)
        for mname, m in model.named_modules(remove_duplicate=False):
            if mname:
                self.names.setdefault(id(m), mname)
            for kind in (m._parameters, m._buffers):
                for attr, t in kind.items():
                    if t is not None:
                        self.owner.setdefault(id(t), (mname, attr))
        self.stack = []
        self.open_calls = []
        self.leaf_depth = None  # stack depth of the leaf module being run (its ops are not recorded)
        self.pycall = None
        self.meta_cache = {}
        self.current = None  # (module stack, op) of the op running, for a failure's report
        self.unwinding = None  # module stack where an exception started unwinding the module calls

    # -- values ----------------------------------------------------------------------------------
    def new_value(self, t, node_index, garbage=False, register=True):
        v = len(self.c.shapes)
        self.c.shapes.append(tuple(t.shape))
        self.c.dtypes.append(t.dtype)
        self.c.producer.append(node_index)
        self.c.users.append([])
        if garbage:
            self.c.garbage.add(v)
        if id(t) in self.by_id:
            self.by_id[id(t)] = v
        else:
            t.__dict__["_slimcore_value"] = (self.token, v)
        key = _storage_key(t) if register else None
        if key is not None:
            # keyed by id: a tensor seen again is one entry; dead ones (their memory reused) are
            # skipped where the entries are read
            self.by_storage.setdefault(key, {})[id(t)] = weakref.ref(t)
        return v

    def value_of(self, t):
        v = self.by_id.get(id(t))
        if v is None:
            tag = t.__dict__.get("_slimcore_value")
            if tag is not None and tag[0] is self.token:
                v = tag[1]
        return v

    def ref(self, t):
        """The value of tensor t, recording it as a parameter/buffer/constant when first seen."""
        v = self.value_of(t)
        if v is not None:
            return v
        mname, attr = self.owner.get(id(t), (None, None))
        node = self.add_node("param" if mname is not None else "constant", None, (), {}, module=mname, attr=attr)
        self.by_id[id(t)] = None
        self.alive.append(t)
        v = self.new_value(t, node.index)
        node.outputs = (v,)
        self.c.concrete[v] = t
        return v

    def to_refs(self, obj, read=None, tensors=None):
        """obj with each tensor replaced by its Ref; the value ids and tensors met are appended to
        ``read`` and ``tensors`` (in argument order, as Node.refs lists them)."""
        if isinstance(obj, torch.Tensor):
            v = self.ref(obj)
            if read is not None:
                read.append(v)
                tensors.append(obj)
            return Ref(v)
        t = type(obj)
        if t in _SEQUENCES:
            if not obj or type(obj[0]) in _NUMBERS:  # sizes, strides, dims: no tensors in them
                return obj
            return t(self.to_refs(a, read, tensors) for a in obj)
        if t in _NUMBERS or obj is None:
            return obj
        if isinstance(obj, (list, tuple)):  # a named tuple
            return tuple(self.to_refs(a, read, tensors) for a in obj)
        return obj

    def add_node(self, op, func, args, kwargs, read=None, **extra):
        """Records a node; ``read``: its value ids in Node.refs order when the caller has them."""
        nodes = self.c.nodes
        node = Node(len(nodes), op, func, args, kwargs, (), tuple(self.stack), **extra)
        if read is not None:
            node.reads = tuple(read)
        nodes.append(node)
        users = self.c.users
        for v in node.refs():
            users[v].append(node.index)
        return node

    # -- ATen ops --------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        recording = self.leaf_depth is None
        garbage_ids = self.c.garbage
        if recording:
            # the arguments' values before the op runs (an in-place op reads the old version)
            read, inputs = [], []
            ref_args = self.to_refs(args, read, inputs)
            ref_kwargs = {k: self.to_refs(a, read, inputs) for k, a in kwargs.items()} if kwargs else {}
            reads_garbage = bool(garbage_ids) and any(v in garbage_ids for v in read)
        else:
            inputs = flat_tensors((args, kwargs))
            reads_garbage = bool(garbage_ids) and any(self.value_of(t) in garbage_ids for t in inputs)
        if reads_garbage and func in _READS_VALUES:
            raise _NeedsValues(str(func))
        if recording:
            self.current = (tuple(self.stack), func.overloadpacket.__name__)
        out = None
        if self.shape_only and (reads_garbage or func in _SHAPE_ONLY):
            rule = _SHAPE_RULES.get(func)
            if rule is not None:
                out = rule(args, kwargs)
        # Otherwise only the heavy ops go through meta kernels: those of element-wise ops run as
        # Python (torch._refs) and cost more than computing them (~1 ms each on mobilenet_v3_small).
        if out is None and self.shape_only and func in _SHAPE_ONLY and _shape_only_ok(func):
            out = self.shape_only_call(func, args, kwargs, inputs)
        if out is not None:
            garbage = True
        else:
            out = func(*args, **kwargs)
            garbage = reads_garbage
        if not recording:
            return out
        self.current = None
        written = _written_args(func, args, kwargs)
        node = self.add_node(func.overloadpacket.__name__, func, ref_args, ref_kwargs, read, pycall=self.pycall)
        outputs = []
        for t in flat_tensors(out):
            if any(t is w for w in written):
                self.alias_writes(t, node)
            outputs.append(self.new_value(t, node.index, garbage))
        node.outputs = tuple(outputs)
        return out

    def shape_only_call(self, func, args, kwargs, inputs):
        """func's outputs with the right shapes and uninitialised values (its meta kernel gives the
        shapes): downstream of a shape-only op the values are garbage anyway. An op that writes its
        argument in place returns that argument. None when func has no meta kernel."""
        real_of = {}

        def to_meta(a):
            if isinstance(a, torch.Tensor):
                m = self.meta_of(a)
                real_of[id(m)] = a
                return m
            if isinstance(a, (list, tuple)):
                return type(a)(to_meta(x) for x in a)
            return a

        try:
            meta_out = func(*to_meta(args), **{k: to_meta(a) for k, a in kwargs.items()})
        except Exception:  # no meta kernel (or it disagrees): compute for real
            return None
        device = inputs[0].device

        def to_real(o):
            if isinstance(o, torch.Tensor):
                real = real_of.get(id(o))
                if real is not None:
                    return real
                # uninitialised: zero-filling would cost page faults for values nobody reads
                return torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device=device)
            if isinstance(o, (list, tuple)):
                return type(o)(to_real(x) for x in o)
            return o

        return to_real(meta_out)

    def meta_of(self, a):
        if isinstance(a, torch.Tensor):
            if id(a) not in self.by_id:
                return _meta(a)
            m = self.meta_cache.get(id(a))  # parameters: the same tensor at every call
            if m is None:
                m = self.meta_cache[id(a)] = _meta(a)
            return m
        if isinstance(a, (list, tuple)):
            return type(a)(self.meta_of(x) for x in a)
        return a

    def alias_writes(self, t, node):
        """t was written in place: every other live tensor sharing its memory changed too."""
        refs = self.by_storage.get(_storage_key(t))
        if not refs:
            return
        for ref in list(refs.values()):
            other = ref()
            old = None if other is None or other is t else self.value_of(other)
            if old is None:
                continue
            alias = self.add_node("alias_write", None, (Ref(old),), {})
            alias.outputs = (self.new_value(other, alias.index, old in self.c.garbage, register=False),)

    # -- modules ---------------------------------------------------------------------------------
    def pre_hook(self, module, args):
        name = self.names.get(id(module))
        if name is None:
            return
        self.unwinding = None
        if self.leaf_depth is None:
            ins = [self.ref(a) if isinstance(a, torch.Tensor) else None for a in args]
            call = Call(name, ins, start=len(self.c.nodes))
            self.c.calls.append(call)
            self.open_calls.append(call)
            if isinstance(module, self.leaf_types) or id(module) in self.leaf_ids:
                self.leaf_depth = len(self.stack)
        self.stack.append(name)

    def post_hook(self, module, args, output):
        name = self.names.get(id(module))
        if name is None or not self.stack or self.stack[-1] != name:
            return
        if self.unwinding is None and sys.exc_info()[1] is not None:  # called as the forward raises
            self.unwinding = tuple(self.stack)
        self.stack.pop()
        if self.leaf_depth is not None and self.leaf_depth < len(self.stack):
            return  # inside a leaf
        call = self.open_calls.pop()
        if self.leaf_depth == len(self.stack):
            self.leaf_depth = None
            node = self.add_node("leaf", None, tuple(Ref(v) if v is not None else None for v in call.inputs), {},
                                 module=name)
            garbage = (not self.c.computed) or any(v in self.c.garbage for v in call.inputs if v is not None)
            node.outputs = tuple(self.new_value(t, node.index, garbage) for t in flat_tensors(output))
        call.end = len(self.c.nodes)
        call.outputs = [self.value_of(t) for t in flat_tensors(output)]


class _PythonCalls(TorchFunctionMode):
    """Notes the Python-level call behind size-sensitive ops, for the recorder's nodes."""

    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            out = _sdpa_on_meta(*args, **kwargs)
            if out is not None:
                return out
        note = _size_call(func, args, kwargs)
        if note is None:
            return func(*args, **kwargs)
        previous, self.recorder.pycall = self.recorder.pycall, note
        try:
            return func(*args, **kwargs)
        finally:
            self.recorder.pycall = previous


_SDPA = torch.nn.functional.scaled_dot_product_attention


def _sdpa_on_meta(query, key, value, *args, **kwargs):
    """scaled_dot_product_attention's output on the meta device, as one op. On meta tensors torch
    picks its math fallback (a dozen ops) where a CPU or GPU run is one fused op, and the size
    check lines up the meta capture of the pruned model with the real capture op by op."""
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)) or query.dim() < 2 \
            or query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        return None  # let torch raise its own error
    return torch.empty((*query.shape[:-1], value.shape[-1]), dtype=query.dtype, device="meta")


_CHUNK = {torch.chunk, torch.Tensor.chunk}
_FLATTEN = {torch.flatten, torch.Tensor.flatten}
_VIEW = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape}


def _size_call(func, args, kwargs):
    if func in _CHUNK:
        return ("chunk",)
    if func in _FLATTEN:
        return ("flatten",)
    if func in _VIEW:
        sizes = args[1:] if len(args) > 1 else kwargs.get("shape", ())
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
            sizes = sizes[0]
        if any(isinstance(s, int) and s == -1 for s in sizes):
            return ("view", tuple(int(s) for s in sizes))
    return None


def flat_tensors(obj):
    """The tensors in nested lists, tuples and dicts, in order (the hot path of the capture)."""
    out = []
    _flatten_into(obj, out)
    return out


def _flatten_into(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for a in obj:
            t = type(a)
            if t in _NUMBERS or a is None:
                continue
            if isinstance(a, torch.Tensor):
                out.append(a)
            elif t in _SEQUENCES:
                if a and type(a[0]) not in _NUMBERS:  # not sizes/strides/dims
                    _flatten_into(a, out)
            elif isinstance(a, (list, tuple, dict)):
                _flatten_into(a, out)
    elif isinstance(obj, dict):
        for a in obj.values():
            _flatten_into(a, out)


def tensor_paths(obj, path=""):
    """(path, tensor) for every tensor in nested lists, tuples and dicts, in order. A path joins
    the indices and keys with dots: "0", "1.feats.2"; a lone tensor's path is ""."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, (list, tuple, dict)):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, a in items:
            yield from tensor_paths(a, f"{path}.{key}" if path else str(key))


_WRITES = {}
_SHAPE_ONLY_OK = {}


def _shape_only_ok(func):
    """Ops that may run on meta tensors only: not views (their outputs must share the input's
    memory, so writes through them are seen) and not ops that resize or re-point their argument."""
    ok = _SHAPE_ONLY_OK.get(func)
    if ok is None:
        schema = func._schema
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        name = func.overloadpacket.__name__
        ok = _SHAPE_ONLY_OK[func] = not view and "resize" not in name and not name.startswith("set_") \
            and func not in _READS_VALUES
    return ok


def _written_args(func, args, kwargs):
    positions = _WRITES.get(func)
    if positions is None:
        positions = _WRITES[func] = tuple(
            (i, a.name) for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write)
    if not positions:
        return ()
    written = []
    for i, name in positions:
        t = args[i] if i < len(args) else kwargs.get(name)
        if isinstance(t, torch.Tensor):
            written.append(t)
    return written


# -- shapes without kernels ---------------------------------------------------------------------
# Downstream of a shape-only op the values are garbage, so the ops the forward spends its time on
# need only their outputs' shapes and layouts. For the common ones these are a line of Python (meta
# kernels cost ~0.5 ms a call, running the op on garbage as much as the real forward). Each rule
# returns None whenever its inputs are not the plain case it knows (then the op runs as before,
# raising the op's own error where the sizes do not fit: the size check relies on that).

def _dense_like(t):
    """An uninitialised tensor laid out like t, or None when t is not densely packed (then an op's
    output layout is not simply t's)."""
    return torch.empty_like(t) if _channels_last(t) is not None else None


def _unary_shape(args, kwargs):
    x = args[0]  # floating point: sigmoid of an integer tensor is a float tensor
    return _dense_like(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else None


def _broadcast(a, b):
    """torch.broadcast_shapes for two shapes (a tuple, or None where they do not broadcast)."""
    if len(a) < len(b):
        a, b = b, a
    b = (1,) * (len(a) - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x != y and x != 1 and y != 1:
            return None
        out.append(y if x == 1 else x)
    return tuple(out)


def _inplace_shape(args, kwargs):
    x = args[0]
    if not isinstance(x, torch.Tensor):
        return None
    shape = tuple(x.shape)
    for a in (*args[1:], *kwargs.values()):
        if isinstance(a, torch.Tensor) and _broadcast(shape, a.shape) != shape:
            return None
    return x


def _binary_shape(args, kwargs):
    a, b = args[0], args[1]
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return None
    dtype = torch.result_type(a, b)  # x * 0.5 arrives with a float64 0-dim tensor: x's dtype wins
    if not dtype.is_floating_point:
        return None  # integer division gives floats
    shape = _broadcast(a.shape, b.shape)
    if shape is None:
        return None
    full = [t for t in (a, b) if tuple(t.shape) == shape]
    if len(full) == 2 and full[0].stride() != full[1].stride():
        return None  # two layouts: TensorIterator's choice is not worth re-deriving
    return _dense_like(full[0]) if full and full[0].dtype == dtype else None


def _batch_norm_shape(args, kwargs):
    x = args[0]
    training = args[5] if len(args) == 8 else False  # native_batch_norm has a training flag
    if kwargs or training or not isinstance(x, torch.Tensor) or x.dim() < 2:
        return None
    if any(isinstance(t, torch.Tensor) and t.numel() != x.shape[1] for t in args[1:5]) or args[3] is None:
        return None
    out = _dense_like(x)
    return None if out is None else (out, x.new_empty(0), x.new_empty(0))


def _channels_last(t):
    """t's memory format when it is densely packed, contiguous or channels-last (None: neither)."""
    if t.is_contiguous():
        return torch.contiguous_format
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return fmt if fmt is not None and t.is_contiguous(memory_format=fmt) else None


def _convolution_shape(args, kwargs):
    """aten.convolution's output: channels-last when the input or the weight is (as the CPU and
    cuDNN kernels choose; the meta kernel returns contiguous there), else contiguous."""
    if kwargs or len(args) != 9:
        return None
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = args
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)):
        return None
    n = x.dim() - 2
    formats = {_channels_last(x), _channels_last(w)}
    if n < 1 or w.dim() != n + 2 or None in formats or x.dtype != w.dtype or groups < 1 \
            or not len(stride) == len(padding) == len(dilation) == n:
        return None
    if transposed:
        if x.shape[1] != w.shape[0] or w.shape[0] % groups or len(output_padding) != n:
            return None
        out_channels = w.shape[1] * groups
        sizes = [(i - 1) * s - 2 * p + d * (k - 1) + op + 1 for i, k, s, p, d, op in
                 zip(x.shape[2:], w.shape[2:], stride, padding, dilation, output_padding)]
    else:
        if x.shape[1] != w.shape[1] * groups or w.shape[0] % groups:
            return None
        out_channels = w.shape[0]
        sizes = [(i + 2 * p - d * (k - 1) - 1) // s + 1 for i, k, s, p, d in
                 zip(x.shape[2:], w.shape[2:], stride, padding, dilation)]
    if bias is not None and bias.numel() != out_channels or min(sizes) < 1 or min(stride) < 1:
        return None
    fmt = next((f for f in formats if f is not torch.contiguous_format), torch.contiguous_format)
    return torch.empty((x.shape[0], out_channels, *sizes), dtype=x.dtype, device=x.device, memory_format=fmt)


def _reduction_shape(args, kwargs):
    """mean/sum over dims of a floating-point tensor: contiguous output, as the CPU kernels give.
    (Reducing uninitialised memory is not just wasted: denormals in it made each mean over a
    mobilenet_v3 squeeze-excitation input cost ~1.7 ms.)"""
    x = args[0]
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    dtype = kwargs.get("dtype") or x.dtype
    if not x.is_floating_point() or not dtype.is_floating_point or set(kwargs) - {"dim", "keepdim", "dtype"}:
        return None
    n = x.dim()
    dims = range(n) if dims is None or len(dims) == 0 else dims
    if any(not -n <= d < max(n, 1) for d in dims):
        return None
    reduced = {d % n for d in dims} if n else set()
    shape = [1 if d in reduced else size for d, size in enumerate(x.shape) if keepdim or d not in reduced]
    return torch.empty(shape, dtype=dtype, device=x.device)


def _matmul_shape(args, kwargs):
    """mm/addmm/bmm/baddbmm: a new contiguous (…, rows of a, columns of b) tensor, as the CPU kernels
    give. (Their meta kernels are Python decompositions: ~1.4 ms per Linear layer.)"""
    if set(kwargs) - {"beta", "alpha"}:
        return None
    bias, a, b = (args[0], args[1], args[2]) if len(args) >= 3 else (None, args[0], args[1])
    if not all(isinstance(t, torch.Tensor) for t in (a, b)) or not a.is_floating_point() or a.dtype != b.dtype \
            or a.dim() != b.dim() or a.dim() not in (2, 3) or a.shape[-1] != b.shape[-2] \
            or a.shape[:-2] != b.shape[:-2]:
        return None
    shape = (*a.shape[:-1], b.shape[-1])
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != a.dtype
                             or _broadcast(shape, bias.shape) != shape):
        return None
    return torch.empty(shape, dtype=a.dtype, device=a.device)


_SHAPE_RULES = {aten.convolution.default: _convolution_shape,
                aten.mm.default: _matmul_shape, aten.addmm.default: _matmul_shape,
                aten.bmm.default: _matmul_shape, aten.baddbmm.default: _matmul_shape,
                aten.mean.dim: _reduction_shape, aten.sum.dim_IntList: _reduction_shape,
                aten.native_batch_norm.default: _batch_norm_shape,
                aten._native_batch_norm_legit_no_training.default: _batch_norm_shape}
for _name in ("relu", "silu", "sigmoid", "hardswish", "hardsigmoid", "hardtanh", "gelu", "leaky_relu", "elu",
              "tanh", "mish", "neg", "clamp"):
    _SHAPE_RULES[getattr(aten, _name).default] = _unary_shape
    _SHAPE_RULES[getattr(aten, _name + "_").default] = _inplace_shape
for _name in ("add", "sub", "mul", "div"):
    _SHAPE_RULES[getattr(aten, _name).Tensor] = _binary_shape
    _SHAPE_RULES[getattr(aten, _name + "_").Tensor] = _inplace_shape


def _user_frame(exc):
    """'file:line: code' of the innermost traceback frame outside torch and slimcore."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not frame.filename.startswith(skip) and "<frozen" not in frame.filename:
            return f"{frame.filename}:{frame.lineno}: {frame.line}"
    return None


def capture(model, example_inputs, leaf_modules=(), shape_only=True):
    """Runs ``model(*example_inputs)`` once in eval mode under no_grad and returns its
    :class:`Capture`. ``leaf_modules``: submodules or classes recorded as one "leaf" node each.
    Raises TraceFailure naming the line of the model's code that failed."""
    import time


    start = time.perf_counter()
    leaf_types = LEAF_MODULES + tuple(m for m in leaf_modules if isinstance(m, type))
    leaf_ids = {id(m) for m in leaf_modules if isinstance(m, nn.Module)}
    try:
        result = _run(model, example_inputs, leaf_types, leaf_ids, shape_only)
    except _NeedsValues:
        result = _run(model, example_inputs, leaf_types, leaf_ids, False)
    result.seconds = time.perf_counter() - start
    return result


def _run(model, inputs, leaf_types, leaf_ids, shape_only):
    c = Capture(computed=not shape_only)
    rec = _Recorder(c, model, leaf_types, leaf_ids, shape_only)
    pre = nn.modules.module.register_module_forward_pre_hook(rec.pre_hook)
    post = nn.modules.module.register_module_forward_hook(rec.post_hook, always_call=True)
    try:
        for t in inputs:
            if isinstance(t, torch.Tensor):
                node = rec.add_node("input", None, (), {})
                node.outputs = (rec.new_value(t, node.index),)
                c.inputs.append(node.outputs[0])
        with torch.no_grad(), eval_mode(model), _PythonCalls(rec), rec:
            out = model(*inputs)
        paths = list(tensor_paths(out))
        outs = [rec.ref(t) for _, t in paths]
        c.outputs, c.output_paths = outs, [p for p, _ in paths]
        rec.add_node("output", None, tuple(Ref(v) for v in outs), {})
    except _NeedsValues:
        raise
    except Exception as exc:
        where = _user_frame(exc)
        failure = TraceFailure(
            f"slimcore could not capture {type(model).__name__}: running it on example_inputs raised "
            f"{type(exc).__name__}: {exc}" + (f"\n  at {where}" if where else ""))
        # what ran before it failed, and where: the op running, or (the model's Python failed
        # between ops, e.g. reshape's size check) the module stack with no op
        failure.partial = c
        failure.failed_key = rec.current if rec.current is not None else (rec.unwinding or tuple(rec.stack), None)
        raise failure from exc
    finally:
        pre.remove()
        post.remove()
    del rec.alive, rec.by_id, rec.by_storage
    return c
