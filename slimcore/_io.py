"""Atomic checkpoint writes and safe loads."""

import os
import tempfile

import torch


def atomic_save(obj, path):
    """torch.save to a temporary file in the same directory, then rename over ``path``: a crash
    mid-write leaves the previous file intact, never a truncated one."""
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
