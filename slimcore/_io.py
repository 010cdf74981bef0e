"""Atomic checkpoint writes and safe loads."""

import copy
import glob
import os
import pickle
import socket
import zipfile

import torch


class CheckpointError(ValueError):
    """A file that is not a usable slimcore checkpoint: empty, truncated, not written by
    torch.save, holding objects other than tensors and plain containers, or saved from a
    different architecture than the one it is loaded into."""


def _compact(obj):
    """Copies of tensors whose storage is larger than their data (in-place pruning leaves the
    dropped channels' memory behind, and torch.save writes whole storages)."""
    if isinstance(obj, torch.Tensor):
        if obj.untyped_storage().nbytes() > obj.numel() * obj.element_size():
            return obj.clone()
        return obj
    if isinstance(obj, dict):
        if type(obj) is dict:
            return {k: _compact(v) for k, v in obj.items()}
        # A dict subclass keeps its type and attributes (OrderedDict, defaultdict's factory);
        # type(obj)(pairs) would count the pairs into a Counter (MultiStepLR's milestones).
        out = copy.copy(obj)
        for k, v in obj.items():
            out[k] = _compact(v)
        return out
    if isinstance(obj, list):
        return [_compact(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_compact(v) for v in obj)
    return obj


_HOST = socket.gethostname().replace(".", "_") or "host"


def _tmp_name(path):
    # Host and pid in the name: a later run on this host can tell a dead writer's leftover from a
    # live writer's file (on a shared file system other hosts' files are left alone).
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".tmp-{base}.{_HOST}.{os.getpid()}")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def clean_stale_tmp(path):
    """Removes ``.tmp-<name>.<host>.<pid>`` files that a killed writer of ``path`` on this host
    left behind; returns how many."""
    directory, base = os.path.split(os.path.abspath(path))
    removed = 0
    for tmp in glob.glob(os.path.join(glob.escape(directory), glob.escape(f".tmp-{base}.{_HOST}.") + "*")):
        pid = tmp.rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                os.remove(tmp)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def atomic_write(path, write, binary=False):
    """Writes ``path`` through ``write(file)`` so that a crash mid-write leaves the previous file
    intact, never a truncated one: a temporary file beside it, fsynced, then renamed over it. The
    file gets the usual permissions (0666 less the umask); a killed writer's temporary file is
    removed by the next write to the same path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    clean_stale_tmp(path)
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path, text):
    """``path`` holds ``text`` afterwards, written atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text))


def atomic_save(obj, path):
    """torch.save(obj, path), atomically (see :func:`atomic_write`). Tensors are written compactly
    (only their own elements)."""
    obj = _compact(obj)
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def safe_load(path, map_location="cpu"):
    """torch.load with weights_only=True (tensors and plain containers only: no code runs).

    A missing file raises FileNotFoundError; one torch cannot read (empty, truncated, random
    bytes, a pickle of other objects) raises :class:`CheckpointError` saying which."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint; was its write interrupted?")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message advises weights_only=False, i.e. running the file's code: never do that
        # for a file that should hold only tensors.
        if "weights_only" in str(exc) and ("GLOBAL" in str(exc) or "global" in str(exc)):
            raise CheckpointError(
                f"{path} holds Python objects other than tensors and plain containers; slimcore only loads "
                "checkpoints with weights_only=True, so it was not written by slimcore (or was tampered with)"
            ) from None
        raise CheckpointError(f"{path} ({size} bytes) is not a torch checkpoint, or it is corrupted") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise CheckpointError(
            f"{path} ({size} bytes) cannot be read: it is truncated or corrupted, or not a torch checkpoint "
            f"({type(exc).__name__})"
        ) from None
