"""``save_pruned`` / ``load_pruned``: a pruned model's weights with its per-layer widths, and its
rebuild from the dense model's constructor.
"""


import torch
from torch import nn

from .. import models
from .._io import CheckpointError, atomic_save, safe_load
from .._modules import parent_module
from .modules import ResidualConstant, set_compensation, set_input_selection
from .options import is_integer


_SHAPED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.PReLU)


_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features", "num_parameters")


def channel_config(model):
    """{module name: its channel attributes} for every conv, linear, BN and PReLU."""
    config = {}
    for name, m in model.named_modules():
        if isinstance(m, ResidualConstant):
            config[name] = {"residual_constant": len(m.constant)}
        elif isinstance(m, _SHAPED):
            entry = {a: int(getattr(m, a)) for a in _ATTRS if hasattr(m, a)}
            entry["selected"] = "selected_index" in m._buffers
            entry["compensated"] = "compensation" in m._buffers
            entry["bias"] = isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and m.bias is not None
            config[name] = entry
    return config


def save_pruned(model, path, meta=None):
    """Writes the model's state_dict and channel configuration to ``path`` (atomically), to be
    rebuilt with :func:`load_pruned` from the dense architecture. ``meta`` (JSON-like) is stored
    with it; ``{"model": name, "model_kwargs": {...}}`` lets load_pruned rebuild a slimcore.models
    architecture without a build_fn."""

    atomic_save({"format": "slimcore.pruned/1", "config": channel_config(model), "state_dict": model.state_dict(),
                 "meta": meta or {}}, path)


def _check_pruned_config(path, model, config, state):
    """Checks every saved channel entry against the module build_fn() made, before anything is
    resized: resizing parameters to the saved shapes would defeat load_state_dict's own shape
    check (a 5x5 conv would silently take 3x3 weights)."""

    if not isinstance(config, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path}: the channel config and state_dict must be dicts (a damaged checkpoint)")
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    for name, entry in config.items():
        def fail(msg, name=name):
            raise CheckpointError(f"{path}: module '{name}': {msg}; the checkpoint does not fit the model "
                                  "build_fn() returned (another architecture or width?)")

        if not isinstance(name, str) or not isinstance(entry, dict):
            fail(f"malformed config entry {entry!r}")
        prefix = f"{name}." if name else ""

        def shape_of(key):
            t = state.get(prefix + key)
            if not isinstance(t, torch.Tensor):
                fail(f"the state_dict has no tensor '{prefix + key}'")
            return tuple(t.shape)

        counts = {a: entry[a] for a in (*_ATTRS, "residual_constant") if a in entry}
        for a, v in counts.items():
            if not (is_integer(v) and v >= 1):
                fail(f"{a} must be a positive integer, got {v!r}")
        try:
            m = model.get_submodule(name)
        except AttributeError:
            fail("does not exist in the model")
        if "residual_constant" in entry:
            if shape_of("constant") != (entry["residual_constant"],):
                fail(f"constant has shape {shape_of('constant')}, not ({entry['residual_constant']},)")
            continue
        if not isinstance(m, _SHAPED):
            fail(f"is a {type(m).__name__}, not a conv, linear, BatchNorm or PReLU")
        expected = {a for a in _ATTRS if hasattr(m, a)}
        if set(counts) != expected:
            fail(f"saved as a layer with {sorted(counts)} but the model's {type(m).__name__} has {sorted(expected)}")
        for a in ("in_channels", "out_channels", "in_features", "out_features"):
            if a in counts and counts[a] > getattr(m, a):
                fail(f"{a}={counts[a]} is more than the unpruned model's {getattr(m, a)}")
        if isinstance(m, convs):
            cin, cout, groups = counts["in_channels"], counts["out_channels"], counts["groups"]
            depthwise = m.groups == m.in_channels and m.groups > 1
            if depthwise and (groups != cin or cout * m.in_channels != cin * m.out_channels):
                fail(f"a depthwise conv must keep groups = in_channels and out/in = {m.out_channels}/{m.in_channels}, "
                     f"got in_channels={cin}, out_channels={cout}, groups={groups}")
            if not depthwise and groups != m.groups:
                fail(f"groups={groups} but the model's conv has groups={m.groups}")
            if cin % groups or cout % groups:
                fail(f"in_channels={cin} and out_channels={cout} must be multiples of groups={groups}")
            want = (cout, cin // groups, *m.kernel_size)
            if shape_of("weight") != want:
                fail(f"weight has shape {shape_of('weight')}; in_channels={cin}, out_channels={cout}, groups={groups} "
                     f"and the model's kernel_size={tuple(m.kernel_size)} need {want}")
            if entry.get("bias") and shape_of("bias") != (cout,):
                fail(f"bias has shape {shape_of('bias')}, not ({cout},)")
            if entry.get("compensated") and shape_of("compensation") != (cout, 1, *m.kernel_size):
                fail(f"compensation has shape {shape_of('compensation')}, not {(cout, 1, *m.kernel_size)}")
        elif isinstance(m, nn.Linear):
            want = (counts["out_features"], counts["in_features"])
            if shape_of("weight") != want:
                fail(f"weight has shape {shape_of('weight')}, not {want} (out_features, in_features)")
            if entry.get("bias") and shape_of("bias") != (want[0],):
                fail(f"bias has shape {shape_of('bias')}, not ({want[0]},)")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = counts["num_features"]
            if n > m.num_features:
                fail(f"num_features={n} is more than the unpruned model's {m.num_features}")
            for key in ("weight", "bias", "running_mean", "running_var"):
                if prefix + key in state and shape_of(key) != (n,):
                    fail(f"{key} has shape {shape_of(key)}, not ({n},)")
            if entry.get("selected"):
                index = state.get(prefix + "selected_index")
                if not (isinstance(index, torch.Tensor) and index.dtype == torch.long and tuple(index.shape) == (n,)
                        and (n == 0 or int(index.min()) >= 0)):
                    fail(f"selected_index must be {n} non-negative int64 channel indices")
        elif isinstance(m, nn.PReLU):
            if counts["num_parameters"] != 1 and counts["num_parameters"] > m.num_parameters:
                fail(f"num_parameters={counts['num_parameters']} is more than the model's {m.num_parameters}")
            if shape_of("weight") != (counts["num_parameters"],):
                fail(f"weight has shape {shape_of('weight')}, not ({counts['num_parameters']},)")


def load_pruned(path, build_fn=None, map_location="cpu"):
    """Rebuilds a pruned model: ``build_fn()`` makes the dense architecture (default: the
    slimcore.models architecture named in the file's metadata), which is reshaped to the saved
    channel configuration and loaded (``weights_only=True``, strict).

    The saved configuration is checked against the built model first (module types, kernel
    sizes, groups, widths no larger than the dense model's, positive counts, parameter shapes);
    a file that does not fit, or that torch cannot read, raises :class:`slimcore.CheckpointError`."""

    ckpt = safe_load(path, map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "slimcore.pruned/1":
        raise CheckpointError(f"{path} is not a slimcore pruned checkpoint (written by slimcore.save_pruned)")
    if build_fn is None:
        meta = ckpt.get("meta") or {}
        if "model" not in meta:
            raise ValueError(f"{path} names no slimcore.models architecture in its metadata: pass build_fn")

        def build_fn():
            return models.build(meta["model"], **meta.get("model_kwargs", {}))

    model = build_fn()
    state = ckpt.get("state_dict")
    _check_pruned_config(path, model, ckpt.get("config"), state)
    for name, entry in ckpt["config"].items():  # collapsed residual blocks first: they remove submodules
        if "residual_constant" in entry:
            parent, attr = parent_module(model, name)
            setattr(parent, attr, ResidualConstant(torch.zeros(entry["residual_constant"])))
    for name, entry in ckpt["config"].items():
        if "residual_constant" in entry:
            continue
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: module '{name}' does not exist in the model build_fn() returned") from None
        prefix = f"{name}." if name else ""
        if entry.get("selected"):
            set_input_selection(m, state[f"{prefix}selected_index"])
        if entry.get("compensated"):
            set_compensation(m, torch.zeros_like(state[f"{prefix}compensation"]))
        if entry.get("bias") and m.bias is None:  # compensation added a bias
            m.bias = nn.Parameter(torch.zeros_like(state[f"{prefix}bias"]))
        for a in _ATTRS:
            if a in entry:
                setattr(m, a, entry[a])
        with torch.no_grad():
            for pname, p in list(m.named_parameters(recurse=False)):
                p.data = torch.empty_like(p, memory_format=torch.contiguous_format).resize_(state[prefix + pname].shape)
            for bname, b in list(m.named_buffers(recurse=False)):
                if b is not None and prefix + bname in state:
                    m._buffers[bname] = torch.empty(state[prefix + bname].shape, dtype=b.dtype, device=b.device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the model build_fn() returned: {exc}") from None
    return model
