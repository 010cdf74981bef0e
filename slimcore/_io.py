"""Atomic checkpoint writes and safe loads."""

import os
import tempfile

import torch


def _compact(obj):
    """Copies of tensors whose storage is larger than their data (in-place pruning leaves the
    dropped channels' memory behind, and torch.save writes whole storages)."""
    if isinstance(obj, torch.Tensor):
        if obj.untyped_storage().nbytes() > obj.numel() * obj.element_size():
            return obj.clone()
        return obj
    if isinstance(obj, dict):
        return type(obj)((k, _compact(v)) for k, v in obj.items()) if type(obj) is not dict else \
            {k: _compact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_compact(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_compact(v) for v in obj)
    return obj


def atomic_save(obj, path):
    """torch.save to a temporary file in the same directory, then rename over ``path``: a crash
    mid-write leaves the previous file intact, never a truncated one. Tensors are written
    compactly (only their own elements)."""
    obj = _compact(obj)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def safe_load(path, map_location="cpu"):
    """torch.load with weights_only=True (tensors and plain containers only: no code runs)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)
