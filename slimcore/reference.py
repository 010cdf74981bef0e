"""Pure-PyTorch versions of every slimcore op.

They are the oracle the compiled kernels are tested against and the fallback when the extension
cannot be loaded. Each list-level function has the signature of its ``torch.ops.slimcore`` op.
Written for clarity, not speed: elementwise formulas from docs/penalties.md, computed in
float32 (float64 for float64 inputs; TL1's prox always in float64), like the kernels.
"""

import math

import torch

PENALTY_NAMES = ("l1", "l2", "lp", "tl1", "scad", "mcp")


def check_penalty(penalty, p, a, knee, eps):
    """The parameter rules of csrc/penalty_args.cpp, with the same messages."""
    if penalty not in PENALTY_NAMES:
        raise ValueError(f"slimcore: unknown penalty '{penalty}'; expected one of {', '.join(PENALTY_NAMES)}")

    def finite_at_least(value, low, strict, what):
        ok = math.isfinite(value) and (value > low if strict else value >= low)
        if not ok:
            raise ValueError(f"slimcore: {what}, got {value}")

    if penalty == "lp":
        if not 0.0 < p < 1.0:
            raise ValueError(f"slimcore: Lp penalty needs 0 < p < 1 (use 'l1' for p = 1), got p={p}")
        finite_at_least(eps, 0.0, False, "Lp penalty needs a finite eps >= 0")
    elif penalty == "tl1":
        finite_at_least(a, 0.0, True, "TL1 penalty needs a finite a > 0")
    elif penalty == "scad":
        finite_at_least(a, 2.0, True, "SCAD penalty needs a finite a > 2")
        finite_at_least(knee, 0.0, False, "SCAD penalty needs a finite knee (lambda) >= 0")
    elif penalty == "mcp":
        finite_at_least(a, 1.0, True, "MCP penalty needs a finite gamma > 1")
        finite_at_least(knee, 0.0, False, "MCP penalty needs a finite knee (lambda) >= 0")


def _acc(x):
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


# --------------------------------------------------------------------------------------------
# Elementwise: g(x), an element of dg(x), prox_{mu g}(v). Inputs already in the math dtype.


def _scad_value_abs(u, a, lam):
    mid = (2 * a * lam * u - u * u - lam * lam) / (2 * (a - 1))
    return torch.where(u <= lam, lam * u, torch.where(u <= a * lam, mid, torch.full_like(u, (a + 1) * lam * lam / 2)))


def _mcp_value_abs(u, gamma, lam):
    return torch.where(u <= gamma * lam, lam * u - u * u / (2 * gamma), torch.full_like(u, gamma * lam * lam / 2))


def value(x, penalty, p=0.0, a=0.0, knee=0.0, eps=0.0):
    """g(x) elementwise. Lp with eps > 0 is the smoothed (|x|+eps)^p - eps^p, whose derivative is the
    eps-shifted subgradient; eps = 0 gives |x|^p."""
    u = x.abs()
    if penalty == "l1":
        return u
    if penalty == "l2":
        return x * x
    if penalty == "lp":
        return (u + eps) ** p - eps**p
    if penalty == "tl1":
        return (a + 1) * u / (a + u)
    if penalty == "scad":
        return torch.where(torch.isnan(x), x, _scad_value_abs(u, a, knee))
    if penalty == "mcp":
        return torch.where(torch.isnan(x), x, _mcp_value_abs(u, a, knee))
    raise ValueError(f"slimcore: unknown penalty '{penalty}'")


def subgradient(x, penalty, p=0.0, a=0.0, knee=0.0, eps=0.0):
    """An element of dg(x): 0 at x = 0, NaN at NaN (torch.sign(NaN) would silently give 0)."""
    s = torch.sign(x)
    u = x.abs()
    if penalty == "l1":
        d = s
    elif penalty == "l2":
        d = 2 * x
    elif penalty == "lp":
        d = torch.where(x == 0, torch.zeros_like(x), s * p * (u + eps) ** (p - 1))
    elif penalty == "tl1":
        d = s * a * (a + 1) / (a + u) ** 2
    elif penalty == "scad":
        d = s * torch.where(u <= knee, torch.full_like(u, knee), (a * knee - u).clamp(min=0) / (a - 1))
    elif penalty == "mcp":
        d = s * (knee - u / a).clamp(min=0)
    else:
        raise ValueError(f"slimcore: unknown penalty '{penalty}'")
    return torch.where(torch.isnan(x), x, d)


def _prox_lp_half_abs(u, mu):
    thr = 1.5 * mu ** (2.0 / 3.0)
    safe = u.clamp(min=thr if thr > 0 else 1.0)  # the unused branch must stay finite
    arg = ((mu / 4) * (3 / safe) ** 1.5).clamp(-1, 1)
    x = (2.0 / 3.0) * safe * (1 + torch.cos(2 * math.pi / 3 - (2.0 / 3.0) * torch.arccos(arg)))
    return torch.where(u > thr, x, torch.zeros_like(u))


def _prox_lp_two_thirds_abs(u, mu):
    thr = 2 * (2 * mu / 3) ** 0.75
    lam2 = 2 * mu
    safe = u.clamp(min=thr)
    theta = torch.arccosh(((27 * safe * safe / 16) * lam2**-1.5).clamp(min=1))
    phi = (2 / math.sqrt(3)) * lam2**0.25 * torch.sqrt(torch.cosh(theta / 3))
    root = torch.sqrt((2 * safe / phi - phi * phi).clamp(min=0))
    x = ((phi + root) / 2) ** 3
    return torch.where(u > thr, x, torch.zeros_like(u))


def _prox_lp_general_abs(u, mu, p):
    base = 2 * mu * (1 - p)
    tau = base ** (1 / (2 - p)) + mu * p * base ** ((p - 1) / (2 - p))
    active = u > tau
    x = u.clone()
    eps = torch.finfo(u.dtype).eps
    for _ in range(200):
        nxt = torch.where(active, u - mu * p * x.clamp(min=torch.finfo(u.dtype).tiny) ** (p - 1), x)
        moved = (nxt - x).abs() > 4 * eps * nxt.abs()
        x = nxt
        if not bool(moved.any()):
            break
    return torch.where(active, x, torch.zeros_like(u))


def _prox_tl1_abs(u, mu, a):
    u64 = u.double()
    thr = mu * (a + 1) / a if mu <= a * a / (2 * (a + 1)) else math.sqrt(2 * mu * (a + 1)) - a / 2
    d = a + u64
    phi = torch.arccos((1 - 27 * mu * a * (a + 1) / (2 * d**3)).clamp(-1, 1))
    x = (2.0 / 3.0) * d * torch.cos(phi / 3) - 2 * a / 3 + u64 / 3
    return torch.where(u64 > thr, x, torch.zeros_like(u64)).to(u.dtype)


def _prox_scad_abs(u, c, a, lam):
    if a > 1 + c:
        low = (u - c * lam).clamp(min=0)
        mid = ((a - 1) * u - c * a * lam) / (a - 1 - c)
        return torch.where(u <= (1 + c) * lam, low, torch.where(u <= a * lam, mid, u))
    x1 = (u - c * lam).clamp(0, lam)
    x3 = u.clamp(min=a * lam)
    f1 = 0.5 * (x1 - u) ** 2 + c * _scad_value_abs(x1, a, lam)
    f3 = 0.5 * (x3 - u) ** 2 + c * _scad_value_abs(x3, a, lam)
    return torch.where(f3 < f1, x3, x1)


def _prox_mcp_abs(u, c, gamma, lam):
    if gamma > c:
        return torch.where(u <= gamma * lam, gamma * (u - c * lam).clamp(min=0) / (gamma - c), u)
    return torch.where(u > lam * math.sqrt(c * gamma), u, torch.zeros_like(u))


def prox(v, mu, penalty, p=0.0, a=0.0, knee=0.0, eps=0.0):
    """argmin_x 1/2 (x - v)^2 + mu * g(x), elementwise; non-finite v and mu = 0 return v.
    Lp uses the exact |x|^p here (eps only shapes the subgradient)."""
    if mu == 0:
        return v.clone()
    u = v.abs()
    if penalty == "l1":
        x = (u - mu).clamp(min=0)
    elif penalty == "l2":
        x = u / (1 + 2 * mu)
    elif penalty == "lp":
        if p == 0.5:
            x = _prox_lp_half_abs(u, mu)
        elif abs(p - 2.0 / 3.0) < 1e-12:
            x = _prox_lp_two_thirds_abs(u, mu)
        else:
            x = _prox_lp_general_abs(u, mu, p)
    elif penalty == "tl1":
        x = _prox_tl1_abs(u, mu, a)
    elif penalty == "scad":
        x = _prox_scad_abs(u, mu, a, knee)
    elif penalty == "mcp":
        x = _prox_mcp_abs(u, mu, a, knee)
    else:
        raise ValueError(f"slimcore: unknown penalty '{penalty}'")
    x = torch.where(v < 0, -x, x)
    return torch.where(torch.isfinite(v), x, v)


# --------------------------------------------------------------------------------------------
# List-level twins of the torch.ops.slimcore ops (same signatures).


def _check_list(tensors, list_name):
    for i, t in enumerate(tensors):
        if t is None:
            raise ValueError(f"slimcore: {list_name}[{i}] is undefined (None)")
        if not t.is_floating_point():
            raise TypeError(
                f"slimcore: {list_name}[{i}] must be floating point (float64/32/16 or bfloat16), got {t.dtype}"
            )
        if t.device != tensors[0].device:
            raise ValueError(
                f"slimcore: {list_name} are on mixed devices: {list_name}[0] is on {tensors[0].device} "
                f"but {list_name}[{i}] is on {t.device}"
            )


def _scales(scale, n):
    scale = list(scale)
    if len(scale) not in (1, n):
        raise ValueError(f"slimcore: scale must have 1 entry or one per tensor ({n}), got {len(scale)}")
    for s in scale:
        if not (math.isfinite(s) and s >= 0):
            raise ValueError(f"slimcore: scale must be finite and >= 0, got {s}")
    return scale * n if len(scale) == 1 else scale


def penalty_subgradient_(weights, grads, penalty, scale, p, a, knee, eps):
    """grads[i] += scale[i] * dg(weights[i]), in place."""
    check_penalty(penalty, p, a, knee, eps)
    _check_list(weights, "weights")
    _check_list(grads, "grads")
    if len(weights) != len(grads):
        raise ValueError(f"slimcore: got {len(weights)} weights but {len(grads)} grads")
    for i, (w, g) in enumerate(zip(weights, grads)):
        if g.shape != w.shape or g.dtype != w.dtype or g.device != w.device:
            raise ValueError(
                f"slimcore: grads[{i}] ({g.dtype}, {tuple(g.shape)}, {g.device}) does not match "
                f"weights[{i}] ({w.dtype}, {tuple(w.shape)}, {w.device})"
            )
    with torch.no_grad():
        for w, g, s in zip(weights, grads, _scales(scale, len(weights))):
            d = subgradient(_acc(w), penalty, p, a, knee, eps)
            g.copy_(_acc(g) + s * d)


def penalty_prox_(weights, penalty, scale, p, a, knee, eps):
    """weights[i] = prox_{scale[i] g}(weights[i]), in place."""
    check_penalty(penalty, p, a, knee, eps)
    _check_list(weights, "weights")
    with torch.no_grad():
        for w, s in zip(weights, _scales(scale, len(weights))):
            w.copy_(prox(_acc(w), s, penalty, p, a, knee, eps))


def penalty_value(weights, penalty, scale, p, a, knee, eps):
    """sum_i scale[i] * sum_j g(weights[i][j]) as a 0-dim tensor (float64 if any input is, else float32)."""
    check_penalty(penalty, p, a, knee, eps)
    _check_list(weights, "weights")
    if not weights:
        raise ValueError("slimcore: penalty_value needs at least one tensor to pick a device")
    out_dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    total = sum(s * value(_acc(w), penalty, p, a, knee, eps).double().sum() for w, s in zip(weights, _scales(scale, len(weights))))
    return total.to(out_dtype)


# --------------------------------------------------------------------------------------------
# Channel gather (pruning): the rules and messages of csrc/channel_gather_args.cpp.


def check_gather(op, weight, out_index, in_index, in_place, check_values=True):
    """Validates channel_gather / channel_gather_ arguments in the order the kernels do.

    ``check_values=False`` skips the data-dependent checks (range, order): the fake kernels use it.
    """
    if weight.dim() < 1:
        raise ValueError(f"slimcore: {op}: weight must have at least 1 dimension, got a 0-d tensor")
    if in_place and weight.requires_grad:
        raise ValueError(
            f"slimcore: {op}: weight requires grad and cannot be resized in place; gather param.data and assign "
            "param.data = result"
        )
    if not weight.is_contiguous():
        raise ValueError(
            f"slimcore: {op}: weight must be contiguous (got sizes {list(weight.shape)}, strides "
            f"{list(weight.stride())}); a channels_last or transposed weight needs .contiguous() first"
        )
    if in_index is not None and weight.dim() < 2:
        raise ValueError(f"slimcore: {op}: in_index must be None for a 1-D weight (it has no input-channel dimension)")
    for name, index, dim in (("out_index", out_index, 0), ("in_index", in_index, 1)):
        if index is None:
            continue
        if index.dtype != torch.int64:
            raise TypeError(f"slimcore: {op}: {name} must be an int64 (torch.long) tensor, got {index.dtype}")
        if index.dim() != 1:
            raise ValueError(f"slimcore: {op}: {name} must be 1-D, got shape {list(index.shape)}")
        if index.device != weight.device:
            raise ValueError(f"slimcore: {op}: {name} is on {index.device} but weight is on {weight.device}")
        if not check_values:
            continue
        size = weight.shape[dim]
        values = index.tolist()
        for k, v in enumerate(values):
            if not 0 <= v < size:
                raise IndexError(
                    f"slimcore: {op}: {name}[{k}] = {v} is out of range for dimension {dim} of weight (size {size})"
                )
            if in_place and k > 0 and v <= values[k - 1]:
                raise ValueError(
                    f"slimcore: {op}: {name} must be strictly increasing (sorted, no duplicates) for the in-place "
                    f"gather, but {name}[{k}] = {v} follows {name}[{k - 1}] = {values[k - 1]}; "
                    "use channel_gather for any order"
                )


def gathered_shape(weight, out_index, in_index):
    """The shape channel_gather returns."""
    shape = list(weight.shape)
    if out_index is not None:
        shape[0] = out_index.numel()
    if in_index is not None:
        shape[1] = in_index.numel()
    return shape


def _gather(weight, out_index, in_index):
    out = weight
    if out_index is not None:
        out = out.index_select(0, out_index)
    if in_index is not None:
        out = out.index_select(1, in_index)
    return weight.clone() if out is weight else out.contiguous()


def channel_gather(weight, out_index, in_index):
    """weight.index_select(0, out_index).index_select(1, in_index) as a new contiguous tensor; None keeps
    that dimension whole. Any order and duplicates allowed."""
    check_gather("channel_gather", weight, out_index, in_index, False)
    return _gather(weight, out_index, in_index)


def channel_gather_(weight, out_index, in_index):
    """The same gather into weight itself (strictly increasing indices): weight is resized to the
    gathered shape (its storage keeps its size and address) and returned."""
    check_gather("channel_gather_", weight, out_index, in_index, True)
    with torch.no_grad():
        result = _gather(weight, out_index, in_index)
        weight.resize_(result.shape)
        weight.copy_(result)
    return weight


# --------------------------------------------------------------------------------------------
# Channel affine (deploy's fused selection BN): the rules and messages of csrc/channel_affine_args.cpp.

ACTIVATIONS = {
    "none": lambda y: y,
    "relu": torch.relu,
    "relu6": torch.nn.functional.relu6,
    "hardswish": torch.nn.functional.hardswish,
    "silu": torch.nn.functional.silu,
}


# c10::ScalarType's names, as the kernels' messages print dtypes
_SCALAR_TYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
                      torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
                      torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool"}


def _type_name(dtype):
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype))


def affine_memory_format(input):
    """The layout channel_affine reads and writes: contiguous, or channels_last(_3d); None if neither."""
    if input.is_contiguous():
        return torch.contiguous_format
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def check_channel_affine(input, index, scale, shift, activation, check_values=True):
    """Validates channel_affine's arguments in the kernels' order; returns the output's shape.
    ``check_values=False`` skips the index range check (data-dependent): the fake kernel uses it."""
    op = "slimcore: channel_affine"
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation '{activation}'; expected one of none, relu, relu6, hardswish, silu")
    if input.dim() < 2:
        raise ValueError(f"{op}: input must have a channel dimension (N, C, ...), got shape {list(input.shape)}")
    if input.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: input must be float32, float64, float16 or bfloat16, got {_type_name(input.dtype)}")
    if affine_memory_format(input) is None:
        raise ValueError(
            f"{op}: input must be contiguous (NCHW) or channels_last, got sizes {list(input.shape)} and strides "
            f"{list(input.stride())}; call .contiguous() or .contiguous(memory_format=torch.channels_last) first"
        )
    channels = input.shape[1]
    if index is not None:
        if index.dtype != torch.int64:
            raise TypeError(f"{op}: index must be an int64 (torch.long) tensor, got {_type_name(index.dtype)}")
        if index.dim() != 1:
            raise ValueError(f"{op}: index must be 1-D, got shape {list(index.shape)}")
        if index.device != input.device:
            raise ValueError(f"{op}: index is on {index.device} but input is on {input.device}")
        if check_values:
            for k, v in enumerate(index.tolist()):
                if not 0 <= v < input.shape[1]:
                    raise IndexError(f"{op}: index[{k}] = {v} is out of range for the input's {input.shape[1]} channels")
        channels = index.numel()
    for name, t in (("scale", scale), ("shift", shift)):
        if t.device != input.device:
            raise ValueError(f"{op}: {name} is on {t.device} but input is on {input.device}")
        if t.dim() != 1 or t.shape[0] != channels:
            raise ValueError(f"{op}: {name} must have shape [{channels}] (one value per output channel), got "
                             f"{list(t.shape)}")
        half = input.dtype in (torch.float16, torch.bfloat16)
        if not (t.dtype == input.dtype or (half and t.dtype == torch.float32)):
            raise TypeError(f"{op}: {name} is {_type_name(t.dtype)} but input is {_type_name(input.dtype)}; {name} "
                            "must have input's dtype "
                            "(or float32 for float16/bfloat16 input)")
    return [input.shape[0], channels, *input.shape[2:]]


def channel_affine(input, index, scale, shift, activation):
    """act(input.index_select(1, index) * scale[c] + shift[c]) per channel c (index None: every
    channel), computed in float32 (float64 for float64 input), in input's memory layout."""
    check_channel_affine(input, index, scale, shift, activation)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input if index is None else input.index_select(1, index)
    shape = [1, -1] + [1] * (input.dim() - 2)
    y = ACTIVATIONS[activation](x.to(acc) * scale.to(acc).view(shape) + shift.to(acc).view(shape))
    # allocated as the kernels allocate (a C=1 tensor is both layouts: the strides still differ)
    out = torch.empty(y.shape, dtype=input.dtype, device=input.device, memory_format=affine_memory_format(input))
    return out.copy_(y)


# --------------------------------------------------------------------------------------------
# BatchNorm with the penalty in its backward: the rules and messages of csrc/batch_norm_args.cpp.


def _bn_layout_ok(t):
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) or (
        t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)
    )


def check_batch_norm_penalty(penalty, scale, p, a, knee, penalty_eps):
    check_penalty(penalty, p, a, knee, penalty_eps)
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"slimcore.batch_norm: penalty scale must be finite and >= 0, got {scale}")


def _bn_view(t, input):
    return t.view((1, -1) + (1,) * (input.dim() - 2))


def batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, penalty, scale, p, a, knee,
               penalty_eps):
    """(out, save_mean, save_invstd) of BatchNorm over every dim but 1, statistics in float32 (float64
    for float64 input). Training: batch statistics, running statistics updated in place (unbiased
    variance); eval: the running statistics. The penalty arguments only matter to the backward."""
    check_batch_norm_penalty(penalty, scale, p, a, knee, penalty_eps)
    if input.dim() < 2:
        raise ValueError(f"slimcore.batch_norm: input must have a channel dimension (N, C, ...), got shape {tuple(input.shape)}")
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    dims = [0] + list(range(2, input.dim()))
    count = input.numel() // max(1, input.shape[1])
    with torch.no_grad():
        x = input.detach().to(acc)
        if training:
            if count == 1:
                raise ValueError(
                    "slimcore.batch_norm: expected more than 1 value per channel when training, got input size "
                    f"{list(input.shape)}"
                )
            if count == 0:
                zeros = input.new_zeros(input.shape[1], dtype=acc)
                return torch.empty_like(input), zeros, zeros.clone()
            mean = x.mean(dims)
            var = x.var(dims, unbiased=False)
            if running_mean is not None:
                m = momentum
                running_mean.copy_((m * mean.double() + (1 - m) * running_mean.double()).to(running_mean.dtype))
                unbiased = var.double() * count / (count - 1)
                running_var.copy_((m * unbiased + (1 - m) * running_var.double()).to(running_var.dtype))
        else:
            if running_mean is None or running_var is None:
                raise ValueError("slimcore.batch_norm: eval mode (training=False) needs running_mean and running_var")
            mean, var = running_mean.to(acc), running_var.to(acc)
        invstd = (var.double() + eps).rsqrt().to(acc)
        gamma = weight.to(acc) if weight is not None else torch.ones_like(mean)
        beta = bias.to(acc) if bias is not None else torch.zeros_like(mean)
        y = (x - _bn_view(mean, input)) * _bn_view(gamma * invstd, input) + _bn_view(beta, input)
        out = torch.empty_like(input)
        out.copy_(y)
    return out, mean.clone(), invstd


def batch_norm_backward(grad_out, input, weight, save_mean, save_invstd, training, penalty, scale, p, a, knee,
                        penalty_eps):
    """(grad_input, grad_weight + scale * dg(weight), grad_bias) of :func:`batch_norm`. Without a
    weight the penalty is skipped and grad_weight is that of gamma = 1."""
    check_batch_norm_penalty(penalty, scale, p, a, knee, penalty_eps)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    param_dtype = weight.dtype if weight is not None else acc
    dims = [0] + list(range(2, input.dim()))
    count = input.numel() // max(1, input.shape[1])
    with torch.no_grad():
        x, g = input.to(acc), grad_out.to(acc)
        mean, invstd = save_mean.to(acc), save_invstd.to(acc)
        xhat = (x - _bn_view(mean, input)) * _bn_view(invstd, input)
        sdy = g.sum(dims)
        sdyx = (g * xhat).sum(dims)  # = sum dy * (x - mean) * invstd: the weight's gradient
        gamma = weight.to(acc) if weight is not None else torch.ones_like(mean)
        k = _bn_view(gamma * invstd, input)
        if training and count > 0:
            gi = (g - _bn_view(sdy / count, input) - xhat * _bn_view(sdyx / count, input)) * k
        else:
            gi = g * k
        grad_input = torch.empty_like(input)
        grad_input.copy_(gi)
        gw = sdyx
        if weight is not None and scale != 0:
            gw = gw + scale * subgradient(gamma, penalty, p, a, knee, penalty_eps)
    return grad_input, gw.to(param_dtype), sdy.to(param_dtype)


class BatchNormFunction(torch.autograd.Function):
    """Autograd of the reference batch_norm (the fallback when the extension is not loaded)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps, penalty, scale, p, a,
                knee, penalty_eps):
        out, mean, invstd = batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps,
                                       penalty, scale, p, a, knee, penalty_eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.args = (training, penalty, scale, p, a, knee, penalty_eps)
        ctx.mark_non_differentiable(mean, invstd)
        return out, mean, invstd

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_invstd):
        input, weight, mean, invstd = ctx.saved_tensors
        gi, gw, gb = batch_norm_backward(grad_out, input, weight, mean, invstd, *ctx.args)
        return (gi, gw if weight is not None else None, gb if ctx.needs_input_grad[2] else None) + (None,) * 11
