"""Output shapes of a traced graph from closed-form rules, without running it.

Pruning needs every tensor's shape (channel counts, flatten block sizes, MACs) but no values, and
running the model is most of a prune's cost; meta tensors are no cheaper (their kernels are Python
decompositions). ``infer_shapes`` covers the layers and ops the channel analysis understands and
gives up (returns False) at the first node it does not, so the caller can run the real graph.
The tests compare both on every model they prune.
"""

import math
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn


class Shape(tuple):
    """A tensor's shape standing in for the tensor."""


class _Unknown(Exception):
    pass


_SAME_SHAPE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.Tanh,
    nn.Hardtanh, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid, nn.Softsign, nn.PReLU,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity,
    nn.modules.batchnorm._BatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm,
    nn.GroupNorm,
)


def _same_shape_module(m):
    from .nn import ResidualConstant

    return isinstance(m, (_SAME_SHAPE_MODULES, ResidualConstant))
_SAME_SHAPE_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.hardswish, F.mish, F.hardtanh,
    F.sigmoid, F.hardsigmoid, F.softplus, F.logsigmoid, F.softsign, torch.relu, torch.relu_, torch.tanh,
    torch.sigmoid, torch.abs, torch.neg, torch.exp, torch.clone, operator.neg, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    "relu", "relu_", "tanh", "sigmoid", "sigmoid_", "abs", "neg", "exp", "clone", "contiguous", "float", "half",
    "double", "bfloat16", "to", "type_as", "detach", "clamp", "clamp_", "clamp_min",
}
_BINARY = {
    operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
    operator.truediv: operator.truediv, operator.floordiv: operator.floordiv, operator.iadd: operator.add,
    operator.isub: operator.sub, operator.imul: operator.mul, operator.itruediv: operator.truediv,
    torch.add: None, torch.sub: None, torch.mul: None, torch.div: None, "add": None, "add_": None, "sub": None,
    "sub_": None, "mul": None, "mul_": None, "div": None, "div_": None,
}


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _conv(m, shape):
    n = len(shape) - 2
    if len(shape) < 3 or shape[1] != m.in_channels:
        raise _Unknown
    k, s, d = _tuple(m.kernel_size, n), _tuple(m.stride, n), _tuple(m.dilation, n)
    if m.padding == "same":
        return Shape((shape[0], m.out_channels, *shape[2:]))
    p = (0,) * n if m.padding == "valid" else _tuple(m.padding, n)
    return Shape((shape[0], m.out_channels,
                  *[(i + 2 * pi - di * (ki - 1) - 1) // si + 1 for i, ki, si, pi, di in zip(shape[2:], k, s, p, d)]))


def _pool(shape, kernel, stride, padding, dilation, ceil_mode):
    n = len(shape) - 2
    k = _tuple(kernel, n)
    s = _tuple(stride if stride not in (None, []) else kernel, n)
    p, d = _tuple(padding, n), _tuple(dilation, n)
    out = []
    for i, ki, si, pi, di in zip(shape[2:], k, s, p, d):
        span = i + 2 * pi - di * (ki - 1) - 1
        o = (-(-span // si) if ceil_mode else span // si) + 1
        if ceil_mode and (o - 1) * si >= i + pi:  # the last window must start inside the input
            o -= 1
        out.append(o)
    return Shape((*shape[:2], *out))


def _adaptive(shape, output_size):
    n = len(shape) - 2
    size = _tuple(output_size, n)
    return Shape((*shape[:2], *[i if o is None else o for i, o in zip(shape[2:], size)]))


def _module(m, shape):
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _conv(m, shape)
    if isinstance(m, nn.Linear):
        if shape[-1] != m.in_features:
            raise _Unknown
        return Shape((*shape[:-1], m.out_features))
    if _same_shape_module(m):
        return shape
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        return _pool(shape, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        return _pool(shape, m.kernel_size, m.stride, m.padding, 1, m.ceil_mode)
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                      nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        return _adaptive(shape, m.output_size)
    if isinstance(m, nn.Flatten):
        return _flatten(shape, m.start_dim, m.end_dim)
    raise _Unknown


def _flatten(shape, start=0, end=-1):
    n = len(shape)
    start, end = start % n if n else 0, end % n if n else 0
    return Shape((*shape[:start], math.prod(shape[start:end + 1]), *shape[end + 1:]))


def _arg(args, kwargs, pos, name, default):
    return args[pos] if len(args) > pos else kwargs.get(name, default)


def _function(target, args, kwargs):
    first = args[0] if args else None
    if target in _BINARY:
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        if not isinstance(a, Shape) and not isinstance(b, Shape):
            fn = _BINARY[target]
            if fn is None:
                raise _Unknown
            return fn(a, b)
        shapes = [x for x in (a, b) if isinstance(x, Shape)]
        return Shape(torch.broadcast_shapes(*shapes))
    if target is getattr:
        if isinstance(first, Shape) and args[1] == "shape":
            return tuple(first)
        raise _Unknown
    if target is operator.getitem:
        if isinstance(first, (tuple, list)) and not isinstance(first, Shape):
            return first[args[1]]
        raise _Unknown
    if not isinstance(first, Shape):
        if target in (torch.cat, torch.concat) and all(isinstance(t, Shape) for t in first):
            dim = _arg(args, kwargs, 1, "dim", 0) % len(first[0])
            return Shape((*first[0][:dim], sum(t[dim] for t in first), *first[0][dim + 1:]))
        raise _Unknown
    if target == "size":
        dim = _arg(args, kwargs, 1, "dim", None)
        return tuple(first) if dim is None else first[dim]
    if target == "dim":
        return len(first)
    if target in _SAME_SHAPE_FUNCTIONS:
        return first
    if target in (torch.flatten, "flatten"):
        return _flatten(first, _arg(args, kwargs, 1, "start_dim", 0), _arg(args, kwargs, 2, "end_dim", -1))
    if target in ("view", "reshape", torch.reshape):
        sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        sizes = list(sizes)
        if sizes.count(-1) == 1:
            known = math.prod(s for s in sizes if s != -1)
            sizes[sizes.index(-1)] = math.prod(first) // known
        if math.prod(sizes) != math.prod(first):
            raise _Unknown
        return Shape(sizes)
    if target in (torch.mean, "mean", torch.sum, "sum", torch.amax, "amax"):
        dims = _arg(args, kwargs, 1, "dim", None)
        keep = _arg(args, kwargs, 2, "keepdim", False)
        if dims is None:
            raise _Unknown
        dims = {d % len(first) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        return Shape(tuple(1 if i in dims else s for i, s in enumerate(first) if keep or i not in dims))
    if target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d):
        return _adaptive(first, _arg(args, kwargs, 1, "output_size", None))
    if target in (F.max_pool2d, F.max_pool1d, F.max_pool3d):
        return _pool(first, args[1] if len(args) > 1 else kwargs["kernel_size"], _arg(args, kwargs, 2, "stride", None),
                     _arg(args, kwargs, 3, "padding", 0), _arg(args, kwargs, 4, "dilation", 1),
                     _arg(args, kwargs, 5, "ceil_mode", False))
    if target in (F.avg_pool2d, F.avg_pool1d, F.avg_pool3d):
        return _pool(first, args[1] if len(args) > 1 else kwargs["kernel_size"], _arg(args, kwargs, 2, "stride", None),
                     _arg(args, kwargs, 3, "padding", 0), 1, _arg(args, kwargs, 4, "ceil_mode", False))
    if getattr(target, "__name__", "") == "stochastic_depth":
        return first
    raise _Unknown


def infer_shapes(root, graph, example_inputs, key):
    """Stores each tensor node's shape in node.meta[key]; False if some node has no rule."""
    modules = dict(root.named_modules())
    values = {}
    inputs = iter(example_inputs)

    def load(a):
        return torch.fx.node.map_arg(a, lambda n: values[n])

    try:
        for node in graph.nodes:
            if node.op == "placeholder":
                x = next(inputs)
                value = Shape(x.shape) if isinstance(x, torch.Tensor) else x
            elif node.op == "get_attr":
                obj = root
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                value = Shape(obj.shape) if isinstance(obj, torch.Tensor) else obj
            elif node.op == "call_module":
                args = load(node.args)
                if not args or not isinstance(args[0], Shape) or node.kwargs:
                    raise _Unknown
                value = _module(modules[node.target], args[0])
            elif node.op in ("call_function", "call_method"):
                value = _function(node.target, load(node.args), load(node.kwargs))
            else:  # output
                continue
            values[node] = value
            if isinstance(value, Shape):
                node.meta[key] = tuple(value)
    except (_Unknown, StopIteration, TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, RuntimeError):
        for node in graph.nodes:
            node.meta.pop(key, None)
        return False
    return True
