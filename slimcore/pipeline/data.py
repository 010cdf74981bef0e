"""Data sets from disk (never downloaded), held in memory, and a deterministic batch loader.

=============  ===========================================================================================
fashion-mnist  IDX files (gz or not): train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-*.
               Default directory /usr/share/datasets/fashion-mnist (Debian: apt-get install
               dataset-fashion-mnist); upstream: https://github.com/zalandoresearch/fashion-mnist
mnist          the same IDX file names, from --data-dir (https://yann.lecun.com/exdb/mnist/)
cifar10        cifar-10-batches-py/{data_batch_1..5, test_batch} ("CIFAR-10 python version",
               https://www.cs.toronto.edu/~kriz/cifar.html); --data-dir is that folder or its parent
cifar100       cifar-100-python/{train, test} (fine labels), same source
svhn           train_32x32.mat, test_32x32.mat (http://ufldl.stanford.edu/housenumbers/; needs scipy)
synthetic      deterministic class templates plus noise, 1x28x28, 10 classes: for tests
synthetic32    the same at 3x32x32
=============  ===========================================================================================

Images stay uint8 in memory; a batch is converted, augmented and normalised (per-channel mean
and std of the training images) on the fly. CIFAR and SVHN are augmented with a random 32x32
crop of the image padded by 4; CIFAR also with horizontal flips (digits are not flipped).
Augmentation is drawn per sample index at the start of each epoch, so a sample looks the same
whichever batch, rank or micro-batch it lands in: resuming, distributed and single-process runs
see identical data.
"""

import gzip
import io
import os
import pickle
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "synthetic", "synthetic32")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DataError(RuntimeError):
    """A data set is missing or malformed; the message names the files and where to get them."""


@dataclass
class ArrayDataset:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self):
        return len(self.labels)


@dataclass
class DataSpec:
    name: str
    num_classes: int
    in_channels: int
    size: int
    mean: tuple
    std: tuple
    crop_padding: int = 0
    flip: bool = False


# -------------------------------------------------------------------------------------------- readers

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _open_idx(directory, stem, name):
    for candidate in (stem + ".gz", stem):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            return path
    where = {"fashion-mnist": f"apt-get install dataset-fashion-mnist (files land in {FASHION_MNIST_DIR}) or "
                              "https://github.com/zalandoresearch/fashion-mnist",
             "mnist": "https://yann.lecun.com/exdb/mnist/"}[name]
    raise DataError(f"{name}: no {stem}[.gz] in {directory}. Expected train-images-idx3-ubyte, "
                    f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (gzipped or not); "
                    f"get them from {where} and pass --data-dir")


def read_idx(path):
    """An IDX file (the MNIST format) as a numpy array; checks the header against the payload."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc}); the file is truncated or not gzip") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} ({int(np.prod(shape))} bytes) but the file holds "
                        f"{len(raw) - header} bytes of data: truncated or corrupted")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _load_idx(name, directory, split):
    images_stem, labels_stem = _IDX_FILES[split]
    images = read_idx(_open_idx(directory, images_stem, name))
    labels = read_idx(_open_idx(directory, labels_stem, name))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{name} {split}: images {images.shape} and labels {labels.shape} do not match")
    return ArrayDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's python batches are pickles: allow only the numpy pieces they contain, so a
    tampered file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _cifar_dir(data_dir, folder, name):
    if data_dir is None:
        raise DataError(f"{name} is not downloaded by slimcore: get the python version from "
                        "https://www.cs.toronto.edu/~kriz/cifar.html, extract it and pass --data-dir")
    for candidate in (os.path.join(data_dir, folder), data_dir):
        if os.path.isdir(candidate) and (os.path.exists(os.path.join(candidate, "test_batch"))
                                         or os.path.exists(os.path.join(candidate, "test"))):
            return candidate
    raise DataError(f"{name}: no {folder}/ with its batch files under {data_dir}; get the python version "
                    "from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there")


def _read_pickle(path):
    if not os.path.exists(path):
        raise DataError(f"missing {path} (CIFAR python version, https://www.cs.toronto.edu/~kriz/cifar.html)")
    try:
        with open(path, "rb") as f:
            return _ArraysOnly(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: not a CIFAR python batch ({exc})") from None


def _cifar_arrays(batches, label_key):
    data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataError(f"CIFAR batch has data {data.shape} and {len(labels)} labels; expected (N, 3072)")
    return ArrayDataset(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels))


def _load_cifar10(data_dir, split):
    d = _cifar_dir(data_dir, "cifar-10-batches-py", "cifar10")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return _cifar_arrays([_read_pickle(os.path.join(d, n)) for n in names], b"labels")


def _load_cifar100(data_dir, split):
    d = _cifar_dir(data_dir, "cifar-100-python", "cifar100")
    return _cifar_arrays([_read_pickle(os.path.join(d, split))], b"fine_labels")


def _load_svhn(data_dir, split):
    if data_dir is None:
        raise DataError("svhn is not downloaded by slimcore: get train_32x32.mat and test_32x32.mat from "
                        "http://ufldl.stanford.edu/housenumbers/ and pass --data-dir")
    path = os.path.join(data_dir, f"{split}_32x32.mat")
    if not os.path.exists(path):
        raise DataError(f"svhn: missing {path}; get {split}_32x32.mat from http://ufldl.stanford.edu/housenumbers/")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("svhn's .mat files need scipy: pip install scipy") from None
    try:
        mat = loadmat(path)
    except Exception as exc:  # scipy raises several types for bad files
        raise DataError(f"{path}: not a readable SVHN .mat file ({exc})") from None
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DataError(f"{path}: expected X of shape (32, 32, 3, N) and y of N labels")
    labels = y.reshape(-1).astype(np.int64) % 10  # the files label digit 0 as 10
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))), torch.from_numpy(labels))


def _synthetic(split, channels, size, n_train=2000, n_test=500, classes=10):
    """Class templates (smooth random patterns) plus noise: learnable, deterministic."""
    g = torch.Generator().manual_seed(1234)
    templates = F.interpolate(torch.rand(classes, channels, 7, 7, generator=g), size=(size, size), mode="bilinear",
                              align_corners=False)
    n = n_train if split == "train" else n_test
    g.manual_seed(1 if split == "train" else 2)
    labels = torch.randint(0, classes, (n,), generator=g)
    images = templates[labels] + 0.9 * torch.randn(n, channels, size, size, generator=g)
    return ArrayDataset((images.clamp(0, 1) * 255).round().to(torch.uint8), labels)


def load(name, split, data_dir=None):
    """One split ("train" or "test") of a data set as an ArrayDataset."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "fashion-mnist":
        return _load_idx(name, data_dir or FASHION_MNIST_DIR, split)
    if name == "mnist":
        if data_dir is None:
            raise DataError("mnist is not downloaded by slimcore: get the four IDX files from "
                            "https://yann.lecun.com/exdb/mnist/ and pass --data-dir")
        return _load_idx(name, data_dir, split)
    if name == "cifar10":
        return _load_cifar10(data_dir, split)
    if name == "cifar100":
        return _load_cifar100(data_dir, split)
    if name == "svhn":
        return _load_svhn(data_dir, split)
    if name == "synthetic":
        return _synthetic(split, 1, 28)
    if name == "synthetic32":
        return _synthetic(split, 3, 32)
    raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")


# Training-time augmentation: "auto" is each data set's default (random crops for CIFAR and SVHN,
# flips for CIFAR, none for the 28x28 sets); "none", "crop" (pad 2 for 28x28, 4 otherwise, random
# crop back) and "crop-flip" (also horizontal flips) choose it explicitly.
AUGMENTATIONS = ("auto", "none", "crop", "crop-flip")


def _spec(name, train, augment="auto"):
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    x = train.images.double() / 255
    mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(x.std(dim=(0, 2, 3)).clamp(min=1e-6).tolist())
    classes = {"cifar100": 100}.get(name, 10)
    if augment == "auto":
        crop = 4 if name in ("cifar10", "cifar100", "svhn") else 0
        flip = name in ("cifar10", "cifar100")
    else:
        crop = 0 if augment == "none" else (2 if train.images.shape[-1] <= 28 else 4)
        flip = augment == "crop-flip"
    return DataSpec(name, classes, train.images.shape[1], train.images.shape[-1], mean, std,
                    crop_padding=crop, flip=flip)


def datasets(name, data_dir=None, val_split=0.0, seed=0, augment="auto"):
    """(train, val or None, test, DataSpec). ``val_split`` holds out that share of the training set
    (a seeded random subset) for validation; ``augment`` is one of AUGMENTATIONS."""
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    train, test = load(name, "train", data_dir), load(name, "test", data_dir)
    val = None
    if val_split > 0:
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(round(val_split * len(train))))
        val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
        val = ArrayDataset(train.images[val_idx], train.labels[val_idx])
        train = ArrayDataset(train.images[train_idx], train.labels[train_idx])
    return train, val, test, _spec(name, train, augment)


# -------------------------------------------------------------------------------------------- loader


class Loader:
    """Batches (x, y) of an ArrayDataset: float, augmented (when ``train``), normalised.

    The order comes from ``sampler`` (a torch DistributedSampler, which also serves a single
    process), reseeded by ``set_epoch``; augmentation is drawn per sample index from
    (seed, epoch), so it does not depend on batching or on the rank.
    """

    def __init__(self, dataset, spec, batch_size, train=False, sampler=None, seed=0, device="cpu"):
        from torch.utils.data import DistributedSampler

        self.dataset, self.spec, self.batch_size, self.train = dataset, spec, batch_size, train
        self.seed, self.device, self.epoch = seed, torch.device(device), 0
        self.sampler = sampler if sampler is not None else DistributedSampler(
            dataset, num_replicas=1, rank=0, shuffle=train, seed=seed)
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self):
        return -(-len(self.sampler) // self.batch_size)

    def _augmentation(self):
        n, p = len(self.dataset), self.spec.crop_padding
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=g) if p else None
        flips = torch.rand(n, generator=g) < 0.5 if self.spec.flip else None
        return offsets, flips

    def __iter__(self):
        indices = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        offsets, flips = self._augmentation() if self.train else (None, None)
        for start in range(0, len(indices), self.batch_size):
            idx = indices[start:start + self.batch_size]
            x = self.dataset.images[idx].float().div_(255)
            if offsets is not None:
                p, size = self.spec.crop_padding, x.shape[-1]
                padded = F.pad(x, (p, p, p, p))
                x = torch.stack([padded[i, :, oy:oy + size, ox:ox + size]
                                 for i, (oy, ox) in enumerate(offsets[idx].tolist())])
            if flips is not None:
                flip = flips[idx]
                x[flip] = x[flip].flip(-1)
            x = (x - self.mean) / self.std
            yield x.to(self.device, non_blocking=True), self.dataset.labels[idx].to(self.device, non_blocking=True)
