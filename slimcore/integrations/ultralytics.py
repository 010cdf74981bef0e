"""Network slimming of ultralytics YOLO models through ultralytics' own trainer.

    from ultralytics import YOLO
    from slimcore.integrations.ultralytics import slim_trainer, prune_yolo, save_yolo

    YOLO("yolov8n.yaml").train(trainer=slim_trainer(lam=1e-3), data="data.yaml", epochs=100, project="runs")
    yolo, report = prune_yolo("runs/train/weights/last.pt", ratio=0.5, imgsz=640)
    save_yolo(yolo, "pruned.pt")
    YOLO("pruned.pt").train(trainer=slim_trainer(lam=0), data="data.yaml", epochs=50)   # fine-tune

* The trainers (:func:`slim_trainer`, :data:`SlimDetectionTrainer`) are ultralytics' task
  trainers plus two things. (1) The penalty: a :class:`slimcore.SparseBNStep` runs inside the
  optimizer's own ``step`` (a step pre-hook for the subgradient, a post-hook for the proximal
  step). ultralytics calls ``scaler.unscale_``, then clips, then ``scaler.step(optimizer)``, which
  runs ``optimizer.step`` only when the gradients are finite: so the subgradient is added to the
  unscaled, clipped gradient (never multiplied by AMP's loss scale, never clipped), exactly once
  per optimizer step (ultralytics accumulates ``nbs / batch`` micro-batches per step), and the
  proximal step runs after every step actually taken, with the lr that step used, and not after
  one GradScaler skipped. Nothing of ultralytics' own ``optimizer_step`` is replaced. (2) A model
  that its yaml cannot rebuild (a pruned one) is trained as loaded: ultralytics' ``Model.train``
  and ``resume`` otherwise build a fresh model from ``model.yaml`` and copy over only the tensors
  whose shapes match (``DetectionModel.load``), which silently trains a dense, mostly random
  network. Each epoch logs the share of BatchNorm weights with ``|gamma| < 0.01`` (the model's and
  the EMA's: the checkpoints hold the EMA) and the penalty's value in ``results.csv``
  (``slim/gamma_small``, ``slim/gamma_small_ema``, ``slim/penalty``).
* :func:`prune_yolo` prunes with ``slimcore.prune(..., keep_outputs=["0"])`` (the predictions keep
  their channels; the neck features the head also returns in eval may shrink), the head's output
  convs ignored, and refuses a ratio that would empty a layer. :func:`save_yolo` writes the pruned
  model in ultralytics' checkpoint format, atomically: ``YOLO(path)`` loads the pickled module as
  it is (predict, val, export).
* :func:`make_synthetic_detection` writes a small detection data set (coloured shapes on noise).

ultralytics (AGPL-3.0) is imported, never copied, and only when one of these is used.
Limits: ultralytics' *default* trainer always rebuilds from the yaml, so fine-tune a pruned
checkpoint with ``trainer=slim_trainer(lam=0)`` (or any trainer of this module); a pruned model
holds slimcore modules (``CompensatedConv2d``, the ``Slim*Model`` classes), so loading it needs
slimcore installed and not ``ULTRALYTICS_SAFE_LOAD``'s allow-list.
"""

import copy
import datetime
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._io import CheckpointError, atomic_save, atomic_write, atomic_write_text
from .._modules import eval_mode
from ..sparsity.step import SparseBNStep, bn_weights, sparsity_loss

# |gamma| below this counts as "small" in the logs and reports (the slimcore pipeline's threshold).
SMALL_GAMMA = 1e-2
_TASKS = ("detect", "segment", "pose", "classify", "obb")
_MARK = "slimcore"  # key in model.yaml of a pruned model (travels with ultralytics' EMA and checkpoints)


class InputError(ValueError):
    """A model, checkpoint, data set or setting these functions cannot use (the message says why)."""


def _ultralytics():
    try:
        import ultralytics
    except ImportError:
        raise ImportError("slimcore.integrations.ultralytics needs ultralytics: pip install 'slimcore[yolo]'") from None
    return ultralytics


# ------------------------------------------------------------------------------- synthetic data

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
_IMAGE_SUFFIXES = {".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".dng", ".mpo", ".pfm", ".heic"}
_SYNTHETIC_MARK = ".slimcore-synthetic"


def _shape_names(classes):
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer, list, tuple)):
        raise TypeError(f"make_synthetic_detection: classes must be a count or a list of shape names, got {classes!r}")
    if isinstance(classes, (int, np.integer)):
        if not 1 <= classes <= len(SHAPES):
            raise InputError(f"make_synthetic_detection: classes must be in [1, {len(SHAPES)}], got {classes}")
        return list(SHAPES[:classes])
    unknown = [c for c in classes if c not in SHAPES]
    if not classes or unknown or len(set(classes)) != len(classes):
        raise InputError(f"make_synthetic_detection: classes must be distinct names from {SHAPES}, got {list(classes)}")
    return list(classes)


def _draw(draw, shape, box, color):
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=color)
    else:  # cross: two bars a third of the box wide
        w, h = (x1 - x0) / 6, (y1 - y0) / 6
        draw.rectangle((cx - w, y0, cx + w, y1), fill=color)
        draw.rectangle((x0, cy - h, x1, cy + h), fill=color)


def _synthetic_image(rng, imgsz, names, max_objects):
    from PIL import Image, ImageDraw

    base = rng.integers(60, 196, 3)
    pixels = np.clip(base + rng.normal(0.0, 25.0, (imgsz, imgsz, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    boxes = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(20):  # a free spot: objects may touch, not overlap
            size = rng.uniform(0.2, 0.45) * imgsz
            w, h = size * rng.uniform(0.8, 1.25), size * rng.uniform(0.8, 1.25)
            w, h = min(w, imgsz - 2), min(h, imgsz - 2)
            x0, y0 = rng.uniform(0, imgsz - w), rng.uniform(0, imgsz - h)
            box = (x0, y0, x0 + w, y0 + h)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for _, b in boxes):
                break
        else:
            continue
        cls = int(rng.integers(len(names)))
        color = rng.integers(0, 256, 3)
        if np.abs(color - base).sum() < 150:  # keep the shape visible against the background
            color = 255 - color
        if np.abs(color - base).sum() < 150:
            color = np.where(base > 127, 0, 255)
        _draw(draw, names[cls], box, tuple(int(c) for c in color))
        boxes.append((cls, box))
    return image, boxes


def make_synthetic_detection(root, n_train=64, n_val=16, imgsz=64, classes=3, seed=0, max_objects=3):
    """Writes a YOLO-format detection data set of coloured shapes on noise and returns the path
    of its ``data.yaml``.

    Each image (``imgsz`` square, PNG) has 1..``max_objects`` non-overlapping filled shapes of
    random colour and size (20-45% of the image); the class is the shape (``SHAPES``: circle,
    square, triangle, diamond, cross; ``classes`` is how many of them, or their names). Labels are
    the shapes' exact boxes, one ``class cx cy w h`` line per object (normalised). Image ``i`` of
    a split depends only on ``(seed, split, i)``: the same call writes the same files, and a
    larger ``n_train`` adds images without changing the first ones. ``root`` must be new, empty
    or a synthetic set written before (which is replaced).
    """
    names = _shape_names(classes)
    for name, value, low in (("n_train", n_train, 1), ("n_val", n_val, 1), ("imgsz", imgsz, 32),
                             ("max_objects", max_objects, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InputError(f"make_synthetic_detection: {name} must be an integer >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"make_synthetic_detection: seed must be an integer >= 0, got {seed!r}")
    root = Path(root).resolve()
    if root.exists() and not root.is_dir():
        raise InputError(f"make_synthetic_detection: {root} is a file, not a directory")
    if root.is_dir() and any(root.iterdir()) and not (root / _SYNTHETIC_MARK).exists():
        raise InputError(f"make_synthetic_detection: {root} is not empty and not a synthetic data set written by "
                         "slimcore; give a new directory")
    for sub in ("images", "labels"):
        shutil.rmtree(root / sub, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / _SYNTHETIC_MARK).write_text(f"seed={seed} imgsz={imgsz} classes={names}\n")
    for split_id, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            rng = np.random.default_rng([seed, split_id, i])
            image, boxes = _synthetic_image(rng, imgsz, names, max_objects)
            image.save(root / "images" / split / f"{i:05d}.png")
            lines = [f"{c} {(b[0] + b[2]) / 2 / imgsz:.6f} {(b[1] + b[3]) / 2 / imgsz:.6f} "
                     f"{(b[2] - b[0]) / imgsz:.6f} {(b[3] - b[1]) / imgsz:.6f}" for c, b in boxes]
            (root / "labels" / split / f"{i:05d}.txt").write_text("\n".join(lines) + "\n")
    names_yaml = "\n".join(f"  {i}: {n}" for i, n in enumerate(names))
    data = root / "data.yaml"
    data.write_text(f"# slimcore.integrations.ultralytics.make_synthetic_detection(seed={seed}, imgsz={imgsz})\n"
                    f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names_yaml}\n")
    return str(data)


def check_data_yaml(path):
    """Reads a YOLO ``data.yaml`` and checks that its ``train`` and ``val`` entries exist, resolved
    as ultralytics resolves them (``path:`` or the file's folder; a relative ``path:`` that does not
    exist is looked up in ultralytics' datasets_dir). Returns the absolute path of the file.
    Raises FileNotFoundError / ValueError naming the problem: slimcore never lets ultralytics
    download a data set (its ``download:`` key is not used)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data {path}: no such file" + ("" if file.suffix in (".yaml", ".yml") else
                                                               " (expected a YOLO data.yaml)"))
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"data {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"data {path} is not a YOLO data.yaml (a mapping with train, val and names)")
    for key in ("train", "val"):
        if not data.get(key):
            raise InputError(f"data {path} has no '{key}:' entry (a YOLO data.yaml needs train, val and names)")
    if data.get("names") is None and data.get("nc") is None:
        raise InputError(f"data {path} has neither 'names:' nor 'nc:'")
    if data.get("path"):
        root = Path(data["path"])
        if not root.exists() and not root.is_absolute():
            from ultralytics.utils import DATASETS_DIR

            root = (DATASETS_DIR / root).resolve()
    else:
        root = file.parent.resolve()
    for key in ("train", "val"):
        for entry in data[key] if isinstance(data[key], list) else [data[key]]:
            target = (root / str(entry)).resolve()
            if not target.exists() and str(entry).startswith("../"):
                target = (root / str(entry)[3:]).resolve()
            if not target.exists():
                raise FileNotFoundError(f"data {path}: '{key}: {entry}' points nowhere ({target} does not exist); "
                                        "slimcore never downloads data sets")
            if target.is_dir() and not any(p.suffix.lower() in _IMAGE_SUFFIXES for p in target.rglob("*")):
                raise FileNotFoundError(f"data {path}: '{key}: {entry}' ({target}) holds no images")
    return str(file.resolve())


# ------------------------------------------------------------------------------- models


def _is_ultralytics_model(obj):
    try:
        from ultralytics.engine.model import Model
    except ImportError:
        return False
    return isinstance(obj, Model)


def _module_of(model):
    """The nn.Module of an ultralytics YOLO object, or the module itself."""
    module = model.model if _is_ultralytics_model(model) else model
    if not isinstance(module, nn.Module) or not isinstance(getattr(module, "model", None), nn.Sequential) \
            or not isinstance(getattr(module, "yaml", None), dict):
        raise TypeError(f"expected an ultralytics YOLO object or its .model (a DetectionModel, SegmentationModel, ...), "
                        f"got {type(module).__name__}; use slimcore.prune for other models")
    return module


def _tasks_base(module):
    """The ultralytics.nn.tasks class a model is (or derives from)."""
    for cls in type(module).__mro__:
        if cls.__module__ == "ultralytics.nn.tasks":
            return cls
    raise TypeError(f"{type(module).__name__} is not an ultralytics.nn.tasks model")


class _SlimModelMixin:
    """A pruned ultralytics model: ``fuse()`` keeps slimcore's bias compensation exact.

    A conv that reads removed channels through zero padding becomes slimcore's
    ``CompensatedConv2d``, which adds the removed channels' constant response ``extra`` to its
    output before the BatchNorm. ultralytics' fuse folds the BN into the conv's weight and bias
    only, so the BN's scale ``s = gamma / sqrt(var + eps)`` must then multiply ``extra`` too:
    ``BN(conv(x) + extra) = fused_conv(x) + s * extra``."""

    def fuse(self, *args, **kwargs):
        from ..pruning.modules import COMPENSATED_CONV

        compensated = tuple(COMPENSATED_CONV.values())
        pending = [(m, m.bn) for m in self.modules()
                   if isinstance(getattr(m, "conv", None), compensated) and isinstance(getattr(m, "bn", None), nn.BatchNorm2d)]
        out = super().fuse(*args, **kwargs)
        with torch.no_grad():
            for m, bn in pending:
                if not hasattr(m, "bn"):  # folded by this fuse
                    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                    c = m.conv.compensation
                    c.mul_(s.to(c.dtype).view((-1,) + (1,) * (c.dim() - 1)))
        return out


_MODEL_CLASSES = {}


def _slim_model_class(base):
    if issubclass(base, _SlimModelMixin):
        return base
    name = "Slim" + base.__name__
    cls = _MODEL_CLASSES.get(name)
    if cls is None:  # importable by name (module __getattr__ below), so checkpoints unpickle
        cls = type(name, (_SlimModelMixin, base), {"__module__": __name__, "__qualname__": name,
                                                   "__doc__": _SlimModelMixin.__doc__})
        _MODEL_CLASSES[name] = cls
    return cls


def head_output_layers(model):
    """Names of the layers producing the head's outputs: every plain conv/linear of the last
    module (Detect's box and class convs, Segment's mask coefficients, Pose's keypoints,
    Classify's linear) and the prototype conv of Segment's Proto. Convs inside ultralytics'
    ``Conv`` blocks (conv + BN + activation) elsewhere in the head are not output layers."""
    module = _module_of(model)
    index = len(module.model) - 1
    head = module.model[index]
    names = []
    for name, m in head.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not name.endswith(".conv") and not name.startswith("dfl"):
            names.append(f"model.{index}.{name}")
    proto = getattr(head, "proto", None)
    if isinstance(proto, nn.Module):
        last = [n for n, m in proto.named_children() if isinstance(getattr(m, "conv", None), nn.Conv2d)]
        if last:
            names.append(f"model.{index}.proto.{last[-1]}")
    return names


def load_yolo(path):
    """``ultralytics.YOLO(path)`` after checking that ``path`` is an ultralytics checkpoint (the
    check reads the pickle's list of classes without running it)."""
    ultralytics = _ultralytics()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint; was its write interrupted?")
    if path.suffix != ".pt":
        raise CheckpointError(f"{path}: ultralytics checkpoints end in .pt")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        raise CheckpointError(f"{path} is not a torch checkpoint, or it is truncated or corrupted") from None
    ours = f"{__name__}.Slim"
    if not any(n.startswith("ultralytics.nn.tasks.") or n.startswith(ours) for n in names):
        what = "it holds only tensors and plain containers (a state_dict, or a slimcore.save_pruned file: load " \
               "those with slimcore.load_pruned)" if not names else f"it holds {', '.join(sorted(names)[:4])}"
        raise CheckpointError(f"{path} is not an ultralytics checkpoint (no ultralytics model in it): {what}")
    return ultralytics.YOLO(str(path))


def _resolve(model_or_checkpoint):
    """(YOLO object or None, its nn.Module)."""
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        yolo = load_yolo(model_or_checkpoint)
        return yolo, _module_of(yolo)
    if _is_ultralytics_model(model_or_checkpoint):
        return model_or_checkpoint, _module_of(model_or_checkpoint)
    return None, _module_of(model_or_checkpoint)


def prune_yolo(model_or_checkpoint, ratio=0.5, imgsz=640, **prune_kwargs):
    """Prunes an ultralytics model in place with :func:`slimcore.prune`; returns ``(model, report)``.

    Args:
        model_or_checkpoint: an ``ultralytics.YOLO`` object, its ``.model``, or the path of an
            ultralytics ``.pt`` checkpoint (loaded with ``YOLO(path)``; returned as a YOLO object).
        ratio: share of the prunable channels to remove (network slimming: the smallest |gamma|).
        imgsz: side of the example image the model is captured on (shapes only; any size the model
            takes gives the same plan).
        prune_kwargs: passed to ``slimcore.prune``. Defaults here: ``keep_outputs=["0"]`` (in
            eval the head returns (predictions, raw outputs); the predictions keep their channels
            and the neck features among the raw outputs may shrink), and ``ignore`` gets the head's
            output layers (:func:`head_output_layers`) added to yours.

    The pruned model is marked (``model.yaml["slimcore"]``) and its class becomes a subclass
    (``SlimDetectionModel``, ...) whose ``fuse()`` stays exact. Raises ValueError, before anything
    changes, when a layer would be left at ``min_channels`` because the threshold emptied it (e.g.
    an untrained model, whose gammas are all 1, at any ratio): lower the ratio, train with the
    penalty first, or pass ``max_layer_ratio=0.9``.
    """
    from ..pruning.prune import prune

    yolo, module = _resolve(model_or_checkpoint)
    if isinstance(imgsz, bool) or not isinstance(imgsz, (int, np.integer)) or imgsz < 32:
        raise InputError(f"prune_yolo: imgsz must be an integer >= 32, got {imgsz!r}")
    ignore = prune_kwargs.pop("ignore", ())
    ignore = [ignore] if isinstance(ignore, (str, nn.Module)) else list(ignore)
    ignore += head_output_layers(module)
    prune_kwargs.setdefault("keep_outputs", ["0"])
    if prune_kwargs.get("dry_run"):
        raise InputError("prune_yolo: dry_run is not an option here; call slimcore.prune(..., dry_run=True)")
    min_channels = prune_kwargs.get("min_channels", 1)
    param = next(module.parameters())
    channels = int(module.yaml.get("channels", 3))
    x = torch.rand(1, channels, imgsz, imgsz, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    with eval_mode(module):
        plan = prune(module, x, ratio, ignore=ignore, dry_run=True, **prune_kwargs)
        starved = plan.starved
        if starved:
            raise InputError(
                f"prune_yolo: ratio {ratio:g} would empty {len(starved)} layers ({', '.join(starved[:4])}"
                f"{', ...' if len(starved) > 4 else ''}): they would keep only min_channels={min_channels}. Lower "
                "the ratio, sparsity-train first (an untrained model's gammas are all equal), or pass max_layer_ratio "
                "(e.g. 0.9) to keep a share of every layer")
        report = prune(module, x, ratio, ignore=ignore, **prune_kwargs)
    module.__class__ = _slim_model_class(_tasks_base(module))
    module.yaml = {**module.yaml, _MARK: {"pruned": True, "ratio": float(ratio), "imgsz": int(imgsz),
                                          "params_before": report.params_before, "params_after": report.params_after,
                                          "flops_before": report.flops_before, "flops_after": report.flops_after,
                                          "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}}
    if hasattr(module, "criterion"):
        module.criterion = None  # ultralytics' loss caches head sizes; it is rebuilt on the next loss call
    return (yolo if yolo is not None else module), report


def is_pruned(model):
    """Whether a model (YOLO object or module) carries prune_yolo's mark."""
    yaml = getattr(_module_of(model), "yaml", None)
    return isinstance(yaml, dict) and isinstance(yaml.get(_MARK), dict) and bool(yaml[_MARK].get("pruned"))


def _compact_module(module):
    # In-place pruning leaves the dropped channels' memory behind the kept ones; a pickled
    # tensor writes its whole storage.
    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for k, t in store.items():
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > t.numel() * t.element_size():
                    if isinstance(t, nn.Parameter):
                        t.data = t.data.clone()
                    else:
                        store[k] = t.clone()


def save_yolo(model, path):
    """Writes ``model`` (YOLO object or its module) as an ultralytics checkpoint that
    ``ultralytics.YOLO(path)`` loads as saved: the pickled module (float32, with its yaml, names,
    stride and args), in the layout of ultralytics' final checkpoints (no optimizer, epoch -1).
    Atomic (temporary file, then rename). Returns the path."""
    ultralytics = _ultralytics()
    from ultralytics.utils import DEFAULT_CFG_KEYS

    module = _module_of(model)
    path = os.fspath(path)
    if not path.endswith(".pt"):
        raise InputError(f"save_yolo: ultralytics loads checkpoints whose name ends in .pt, got {path!r}")
    m = copy.deepcopy(module).float()
    _compact_module(m)
    if hasattr(m, "criterion"):
        m.criterion = None
    args = getattr(m, "args", None)
    args = dict(vars(args) if args is not None and not isinstance(args, dict) else args or {})
    m.args = {k: v for k, v in args.items() if k in DEFAULT_CFG_KEYS}
    atomic_save({
        "date": datetime.datetime.now().astimezone().isoformat(),
        "version": ultralytics.__version__,
        "model": m,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "scaler": None,
        "epoch": -1,
        "best_fitness": None,
        "train_args": dict(m.args),
        _MARK: m.yaml.get(_MARK),
    }, path)
    return path


# ------------------------------------------------------------------------------- trainers


def _rebuild_differs(model):
    """Whether ultralytics' rebuild from ``model.yaml`` (at the model's own class count) would have
    other modules or tensor shapes than the model: then training must use the model as it is."""
    yaml = getattr(model, "yaml", None)
    if not isinstance(yaml, dict):
        return True
    if isinstance(yaml.get(_MARK), dict) or any(type(m).__module__.startswith("slimcore.") for m in model.modules()):
        return True
    try:
        base = _tasks_base(model)
        reference = base(copy.deepcopy(yaml), ch=yaml.get("channels", 3), nc=yaml.get("nc"), verbose=False)
    except Exception:
        return True
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return own != {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def _small_share(weights):
    if not weights:
        return float("nan")
    with torch.no_grad():
        g = torch.cat([w.detach().reshape(-1).float() for w in weights]).abs()
    return float((g < SMALL_GAMMA).float().mean())


class _SlimTrainerMixin:
    """The slimcore part of the trainers made by :func:`slim_trainer` (see the module docstring)."""

    slim_lam = 1e-4
    slim_penalty = "l1"
    slim_mode = "subgradient"
    slim_momentum = 0.0

    @classmethod
    def slim_config(cls):
        penalty = cls.slim_penalty if isinstance(cls.slim_penalty, str) else repr(cls.slim_penalty)
        return {"lam": cls.slim_lam, "penalty": penalty, "mode": cls.slim_mode, "momentum": cls.slim_momentum}

    def get_model(self, cfg=None, weights=None, verbose=True):
        from ultralytics.utils import LOGGER

        marked = isinstance(cfg, dict) and isinstance(cfg.get(_MARK), dict)
        if marked and not isinstance(weights, nn.Module):
            raise InputError("this model was pruned by slimcore: rebuilding it from its yaml (pretrained=False) would "
                             "train the dense architecture from scratch; train it with its weights (pretrained=True)")
        if isinstance(weights, nn.Module) and (marked or _rebuild_differs(weights)):
            head = weights.model[-1]
            nc = getattr(head, "nc", None)
            if nc is not None and nc != self.data["nc"]:
                raise InputError(f"this pruned model has {nc} classes and the data set {self.args.data} has "
                                 f"{self.data['nc']}: a model trained as loaded keeps its head, so fine-tune it on "
                                 "data with the same classes")
            weights = weights.float()
            for p in weights.parameters():
                p.requires_grad_(p.is_floating_point())
            if hasattr(weights, "criterion"):
                weights.criterion = None
            LOGGER.info(f"slimcore: training the model as loaded ({sum(p.numel() for p in weights.parameters()):,} "
                        "parameters); its yaml cannot rebuild it")
            return weights
        return super().get_model(cfg=cfg, weights=weights, verbose=verbose)

    def setup_model(self):
        ckpt = super().setup_model()
        saved = getattr((ckpt or {}).get("ema"), "slimcore_train", None) if isinstance(ckpt, dict) else None
        if self.resume and saved is not None and saved != self.slim_config():
            raise InputError(f"this run was trained with slimcore settings {saved}, and the trainer given to resume it "
                             f"has {self.slim_config()}: resume with slim_trainer(**{saved})")
        return ckpt

    def _setup_train(self):
        from ultralytics.utils import LOGGER
        from ultralytics.utils.torch_utils import unwrap_model

        super()._setup_train()
        model = unwrap_model(self.model)
        self.slim_weights = [w for _, w in bn_weights(model)]
        self.slim_step = None
        for m in (model, getattr(self.ema, "ema", None)):
            if m is not None:
                m.slimcore_train = self.slim_config()  # saved with the checkpoints; checked on resume
        if self.slim_lam > 0:
            self.slim_step = SparseBNStep(model, self.slim_lam, self.slim_penalty, mode=self.slim_mode,
                                          momentum=self.slim_momentum)
            # Hooks of the optimizer's own step(): ultralytics calls it through scaler.step, after
            # unscale_ and clipping, and not at all when GradScaler skips the step.
            if self.slim_mode == "subgradient":
                self.optimizer.register_step_pre_hook(self._slim_subgradient)
            else:
                self.optimizer.register_step_post_hook(self._slim_proximal)
            LOGGER.info(f"slimcore: {type(self.slim_step.penalty).__name__} penalty, lam={self.slim_lam:g}, "
                        f"{self.slim_mode} mode, on {len(self.slim_step.weights)} BatchNorm weights "
                        f"({sum(w.numel() for w in self.slim_step.weights):,} channels)")

    def _slim_subgradient(self, optimizer, args, kwargs):
        for w in self.slim_step.weights:
            if w.grad is None:  # a BN no loss reached this step: the penalty still applies
                w.grad = torch.zeros_like(w)
        self.slim_step()

    def _slim_proximal(self, optimizer, args, kwargs):
        # A fused optimizer (Adam on CUDA) under GradScaler runs step() and skips inside its kernel.
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, torch.Tensor) and bool(found_inf.item()):
            return
        self.slim_step(optimizer=optimizer)

    def slim_metrics(self):
        """Share of |gamma| < SMALL_GAMMA in the model and in its EMA, and the penalty's value."""
        ema = getattr(self.ema, "ema", None)
        ema_weights = [w for _, w in bn_weights(ema)] if ema is not None else []
        penalty = 0.0
        if self.slim_step is not None:
            with torch.no_grad():
                penalty = float(sparsity_loss(self.slim_step.weights, self.slim_lam, self.slim_penalty))
        return {"slim/gamma_small": _small_share(self.slim_weights), "slim/gamma_small_ema": _small_share(ema_weights),
                "slim/penalty": penalty}

    def save_metrics(self, metrics):
        from ultralytics.utils import LOGGER

        extra = self.slim_metrics()
        n = sum(w.numel() for w in self.slim_weights)
        LOGGER.info(f"slimcore: |gamma| < {SMALL_GAMMA:g}: {100 * extra['slim/gamma_small']:.1f}% of {n:,} BN channels "
                    f"(EMA {100 * extra['slim/gamma_small_ema']:.1f}%), penalty {extra['slim/penalty']:.4g}")
        # Appended last, so results.csv keeps one column order every epoch.
        super().save_metrics({**{k: v for k, v in metrics.items() if not k.startswith("slim/")}, **extra})


def _task_trainer(task):
    _ultralytics()
    from ultralytics.models import yolo

    trainers = {"detect": yolo.detect.DetectionTrainer, "segment": yolo.segment.SegmentationTrainer,
                "pose": yolo.pose.PoseTrainer, "classify": yolo.classify.ClassificationTrainer,
                "obb": yolo.obb.OBBTrainer}
    if task not in trainers:
        raise InputError(f"slim_trainer: task must be one of {_TASKS}, got {task!r}")
    return trainers[task]


def slim_trainer(lam=1e-4, penalty="l1", *, mode="subgradient", momentum=0.0, task="detect"):
    """An ultralytics trainer class for ``model.train(trainer=...)``: the task's own trainer
    (``DetectionTrainer`` for task="detect", ...) applying the sparsity penalty ``lam * sum g(gamma)``
    over every trainable BatchNorm weight at each optimizer step, and training pruned models as
    loaded. Arguments are :class:`slimcore.SparseBNStep`'s (``penalty``: a name or a
    ``slimcore.penalties`` object; ``mode``: "subgradient" or "proximal"; ``momentum``: proximal step
    size ``lr / (1 - momentum)``). ``lam=0``: plain ultralytics training (fine-tuning a pruned model).

    ultralytics' ``optimizer="auto"`` picks AdamW for short runs, which normalises the penalty away
    (slimcore/sparsity/step.py); pass ``optimizer="SGD"`` for sparsity training. Resume a run with the same
    settings: ``YOLO("last.pt").train(resume=True, trainer=slim_trainer(...))``."""
    SparseBNStep([torch.zeros(1, requires_grad=True)], lam, penalty, mode=mode, momentum=momentum)  # checks the arguments
    base = _task_trainer(task)
    attrs = {"slim_lam": float(lam), "slim_penalty": penalty, "slim_mode": mode, "slim_momentum": float(momentum),
             "__module__": __name__, "__qualname__": f"slim_trainer.<locals>.Slim{base.__name__}",
             "__doc__": f"ultralytics' {base.__name__} with slimcore's penalty (lam={lam:g}, {penalty}, {mode})."}
    return type(f"Slim{base.__name__}", (_SlimTrainerMixin, base), attrs)


_DEFAULT_TRAINER = []


def __getattr__(name):
    # Built on first use so that importing this module does not import ultralytics.
    if name == "SlimDetectionTrainer":
        if not _DEFAULT_TRAINER:
            cls = slim_trainer()
            cls.__qualname__ = name
            cls.__doc__ = ("ultralytics' DetectionTrainer with slimcore's penalty at its defaults (L1, lam=1e-4, "
                           "subgradient); slim_trainer(...) makes one with other settings.")
            _DEFAULT_TRAINER.append(cls)
        return _DEFAULT_TRAINER[0]
    if name.startswith("Slim") and name.endswith("Model") and name != "Slim":
        import ultralytics.nn.tasks as tasks

        base = getattr(tasks, name[4:], None)
        if isinstance(base, type) and issubclass(base, nn.Module):
            return _slim_model_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------- measuring


def gamma_values(model):
    """|gamma| of every BatchNorm of a model (YOLO object or module), as one float64 array."""
    module = model.model if _is_ultralytics_model(model) else model
    ws = [w.detach().abs().reshape(-1).double().cpu() for _, w in bn_weights(module)]
    return torch.cat(ws).numpy() if ws else np.zeros(0)


def measure_latency(models, imgsz, rounds=7, calls=10, warmup=5, threads=None):
    """Median CPU latency (ms) of one forward at batch 1 for each ``{name: model}``, as ultralytics
    runs it for prediction (a fused copy in eval, under inference_mode). Rounds alternate between
    the models so that machine drift hits them alike; returns ``{name: {median_ms, q1_ms, q3_ms,
    calls, threads}}``. ``threads``: torch's CPU threads while timing (default 1: on a shared or
    small machine, multi-threaded timings of models this small mostly measure thread waits)."""
    threads = threads or 1
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = _time_models(models, imgsz, rounds, calls, warmup)
    finally:
        torch.set_num_threads(previous)
    for record in out.values():
        record["threads"] = threads
    return out


def _time_models(models, imgsz, rounds, calls, warmup):
    x = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))
    ready = {}
    for name, model in models.items():
        m = copy.deepcopy(_module_of(model)).float().cpu().eval()
        m.fuse(verbose=False)
        ready[name] = m
    times = {name: [] for name in ready}
    with torch.inference_mode():
        for m in ready.values():
            for _ in range(warmup):
                m(x)
        for _ in range(rounds):
            for name, m in ready.items():
                for _ in range(calls):
                    t = time.perf_counter()
                    m(x)
                    times[name].append(time.perf_counter() - t)
    out = {}
    for name, ts in times.items():
        q1, med, q3 = np.percentile(np.asarray(ts) * 1e3, [25, 50, 75])
        out[name] = {"median_ms": float(med), "q1_ms": float(q1), "q3_ms": float(q3), "calls": len(ts)}
    return out


def plot_gamma_histogram(stages, path, threshold=None):
    """Histogram of |gamma| (log x axis, zeros at the left edge) per ``{stage: model}``; the prune
    threshold as a vertical line. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), tight_layout=True)
    floor = 1e-6
    bins = np.logspace(math.log10(floor), 1, 60)
    for name, model in stages.items():
        g = np.clip(gamma_values(model), floor, 10)
        ax.hist(g, bins=bins, histtype="step", linewidth=1.5, label=f"{name} ({len(g):,} channels)")
    if threshold is not None and threshold > 0:
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"prune threshold {threshold:.3g}")
    ax.axvline(SMALL_GAMMA, color="grey", linestyle=":", linewidth=1, label=f"|gamma| = {SMALL_GAMMA:g}")
    ax.set_xscale("log")
    ax.set_xlabel(f"|gamma| (values below {floor:g} drawn at {floor:g})")
    ax.set_ylabel("BN channels")
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------- the recipe


def _copy_atomic(src, dst):
    with open(src, "rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f), binary=True)


def _start_model(model):
    ultralytics = _ultralytics()
    text = os.fspath(model)
    if text.endswith(".pt"):
        return load_yolo(text)  # never a bare name ultralytics would download
    if not text.endswith((".yaml", ".yml")):
        raise InputError(f"model {text!r}: give a model yaml (e.g. yolov8n.yaml) or the path of a .pt checkpoint")
    try:
        return ultralytics.YOLO(text)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"model {text}: no such model yaml ({exc})") from None


def _read_results_csv(path):
    import csv

    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [{k.strip(): float(v) for k, v in row.items() if v not in (None, "")} for row in rows]


def _stage_numbers(path, data, imgsz, batch, device, runs, name):
    """mAP50-95, mAP50 (ultralytics' validator on the data's val split), params and FLOPs of a checkpoint."""
    from ..pruning.profile import profile

    yolo = load_yolo(path)
    metrics = yolo.val(data=data, imgsz=imgsz, batch=batch, device=device, project=str(runs), name=name,
                       exist_ok=True, plots=False, verbose=False)
    module = copy.deepcopy(_module_of(yolo)).float().cpu().eval()
    flops, params = profile(module, torch.zeros(1, int(module.yaml.get("channels", 3)), imgsz, imgsz))
    return {"checkpoint": str(path), "map50_95": float(metrics.box.map), "map50": float(metrics.box.map50),
            "params": int(params), "flops": int(flops)}


def run_recipe(model, data, out, *, lam=1e-3, ratio=0.5, epochs=10, finetune_epochs=None, imgsz=640, batch=16,
               penalty="l1", mode="subgradient", momentum=0.0, optimizer="SGD", lr0=0.01, device=None, seed=0,
               workers=None, amp=False, plots=False, latency_rounds=7, latency_threads=None, prune_kwargs=None,
               command=None):
    """Network slimming of a YOLO end to end, all through ultralytics' trainer and validator:
    sparsity training (``slim_trainer(lam, penalty, mode)``, ``epochs``; 0: ``model`` is a
    checkpoint trained already, e.g. a previous run's trained.pt), :func:`prune_yolo` at
    ``ratio``, fine-tuning (``finetune_epochs``, default ``epochs``, no penalty), then each
    stage's mAP on the data's val split, params, FLOPs and CPU latency.

    Writes into ``out``: ``trained.pt`` (the sparsity run's last.pt), ``pruned.pt``,
    ``finetuned.pt`` (the fine-tune's last.pt; last, not best, so the val split does not pick the
    epoch it is then scored on), ``report.json``, ``report.md``, ``gamma_hist.png``, and
    ultralytics' own run folders under ``out/ultralytics/`` (train, finetune, val-<stage>).
    ``amp=False`` by default: on CUDA, ultralytics' AMP check downloads a model. Returns the report
    as a dict."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"out {out} is an existing file; give a directory")
    data = check_data_yaml(data)
    finetune_epochs = epochs if finetune_epochs is None else finetune_epochs
    if not finetune_epochs:
        raise InputError("finetune_epochs (--finetune-epochs) must be >= 1; it defaults to epochs, so give it with "
                         "epochs=0")
    trainer = slim_trainer(lam, penalty, mode=mode, momentum=momentum)  # checks the penalty arguments first
    if not epochs and not os.fspath(model).endswith(".pt"):
        raise InputError(f"epochs=0 skips the sparsity training, so the model must be a trained .pt checkpoint, "
                         f"not {os.fspath(model)}")
    start = _start_model(model)
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "ultralytics"
    common = dict(data=data, imgsz=imgsz, batch=batch, seed=seed, project=str(runs), exist_ok=True, plots=plots,
                  amp=amp, optimizer=optimizer, lr0=lr0, verbose=False)
    if device is not None:
        common["device"] = device
    if workers is not None:
        common["workers"] = workers
    t0 = time.time()
    trained = out / "trained.pt"
    if epochs:
        start.train(trainer=trainer, epochs=epochs, name="train", **common)
        _copy_atomic(runs / "train" / "weights" / "last.pt", trained)
    elif Path(os.fspath(model)).resolve() != trained:
        _copy_atomic(os.fspath(model), trained)  # already sparsity-trained: start at the prune
    t1 = time.time()
    try:
        pruned_yolo, report = prune_yolo(str(trained), ratio, imgsz=imgsz, **(prune_kwargs or {}))
    except InputError as exc:
        raise InputError(f"{exc}. The sparsity-trained model is {trained}: prune it again with --model {trained} "
                         "--epochs 0 (run_recipe(..., epochs=0))") from None
    pruned = out / "pruned.pt"
    save_yolo(pruned_yolo, pruned)
    t2 = time.time()
    load_yolo(pruned).train(trainer=slim_trainer(0.0), epochs=finetune_epochs, name="finetune", **common)
    finetuned = out / "finetuned.pt"
    _copy_atomic(runs / "finetune" / "weights" / "last.pt", finetuned)
    t3 = time.time()
    paths = {"trained": trained, "pruned": pruned, "finetuned": finetuned}
    stages = {name: _stage_numbers(p, data, imgsz, batch, common.get("device"), runs, f"val-{name}")
              for name, p in paths.items()}
    models = {name: load_yolo(p) for name, p in paths.items()}
    latency = measure_latency(models, imgsz, rounds=latency_rounds, threads=latency_threads)
    for name in stages:
        stages[name]["latency_ms"] = latency[name]
    for name in ("trained", "finetuned"):
        g = gamma_values(models[name])
        stages[name]["gamma_small_share"] = float((g < SMALL_GAMMA).mean()) if len(g) else float("nan")
    plot_gamma_histogram({"sparsity-trained": models["trained"], "fine-tuned": models["finetuned"]},
                         out / "gamma_hist.png", threshold=report.threshold)
    import ultralytics

    result = {
        "command": command, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": os.fspath(model), "data": data, "imgsz": imgsz, "batch": batch, "epochs": epochs,
        "finetune_epochs": finetune_epochs, "lam": lam, "penalty": penalty if isinstance(penalty, str) else repr(penalty),
        "mode": mode, "momentum": momentum, "optimizer": optimizer, "lr0": lr0, "seed": seed, "ratio": ratio,
        "device": common.get("device", "ultralytics' default"), "latency_threads": latency["trained"]["threads"],
        "latency_method": f"median of {latency['trained']['calls']} forwards at batch 1, {imgsz}x{imgsz}, fused "
                          "(as ultralytics predicts), in interleaved rounds, CPU",
        "small_gamma_threshold": SMALL_GAMMA,
        "prune": {"options": {k: v for k, v in (prune_kwargs or {}).items() if isinstance(v, (int, float, str))},
                  "threshold": report.threshold, "channels_removed_share": report.channels_removed_share,
                  "params_before": report.params_before, "params_after": report.params_after,
                  "flops_before": report.flops_before, "flops_after": report.flops_after,
                  "compensated_layers": len(report.compensated), "notes": report.notes, "seconds": report.seconds},
        "stages": stages,
        "epochs_log": {"train": _read_results_csv(runs / "train" / "results.csv"),
                       "finetune": _read_results_csv(runs / "finetune" / "results.csv")},
        "seconds": {"train": t1 - t0, "prune": t2 - t1, "finetune": t3 - t2, "evaluate": time.time() - t3},
        "versions": {"torch": torch.__version__, "ultralytics": ultralytics.__version__},
    }
    import json

    atomic_write_text(out / "report.json", json.dumps(result, indent=2))
    (out / "report.md").write_text(recipe_markdown(result))
    return result


def recipe_markdown(result):
    """report.md of :func:`run_recipe`."""
    lines = [
        f"# Network slimming of {result['model']} (slimcore yolo)", "",
        f"{result['date']}; data {result['data']}; imgsz {result['imgsz']}, batch {result['batch']}; "
        f"{result['epochs']} epochs of sparsity training{' (before this run)' if not result['epochs'] else ''} ({result['penalty']}, lam={result['lam']:g}, "
        f"{result['mode']}, optimizer {result['optimizer']}, lr0 {result['lr0']:g}), prune ratio {result['ratio']:g}, "
        f"{result['finetune_epochs']} epochs of fine-tuning.", "",
        "| stage | mAP50-95 | mAP50 | params | FLOPs (MACs) | CPU latency, ms (median [IQR]) |",
        "|---|---|---|---|---|---|",
    ]
    names = {"trained": "dense, sparsity-trained", "pruned": "pruned, before fine-tuning", "finetuned": "pruned + fine-tuned"}
    for key, s in result["stages"].items():
        lat = s["latency_ms"]
        lines.append(f"| {names[key]} | {s['map50_95']:.4f} | {s['map50']:.4f} | {s['params']:,} | {s['flops']:,} | "
                     f"{lat['median_ms']:.2f} [{lat['q1_ms']:.2f}, {lat['q3_ms']:.2f}] |")
    p = result["prune"]
    st = result["stages"]
    lines += [
        "",
        f"Latency: {result['latency_method']}, {result['latency_threads']} threads. mAP: ultralytics' validator on the "
        "data's val split. Params: the unfused model's; FLOPs: multiply-accumulates of conv/linear layers per image "
        "(slimcore.profile).",
        "",
        f"Prune ({', '.join(f'{k}={v}' for k, v in p['options'].items()) or 'defaults'}): "
        f"{100 * p['channels_removed_share']:.1f}% of the scored channels removed (|gamma| threshold "
        f"{p['threshold']:.4g}), {p['compensated_layers']} layers compensated for the removed channels' constants, "
        f"{p['seconds']:.1f} s. Share of BN channels with |gamma| < {result['small_gamma_threshold']:g}: "
        f"{100 * st['trained']['gamma_small_share']:.1f}% after sparsity training, "
        f"{100 * st['finetuned']['gamma_small_share']:.1f}% after fine-tuning (histogram: gamma_hist.png; per epoch: "
        "ultralytics/train/results.csv, columns slim/*).",
        "",
    ]
    if p["notes"]:
        lines += ["Prune notes:", ""] + [f"- {n}" for n in p["notes"]] + [""]
    if result.get("command"):
        lines += ["Command:", "", "```bash", result["command"], "```", ""]
    return "\n".join(lines)
