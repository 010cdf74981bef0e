"""slimcore.data: the loaders parse real IDX files, CIFAR pickles and SVHN .mat files; bad or
missing files get errors naming what is expected; batches are deterministic per sample."""

import gzip
import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from slimcore.pipeline import data

needs_fashion = pytest.mark.skipif(
    not os.path.exists(os.path.join(data.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason=f"Fashion-MNIST not installed (apt-get install dataset-fashion-mnist -> {data.FASHION_MNIST_DIR})")


@needs_fashion
def test_fashion_mnist_idx_files_parse():
    train, test = data.load("fashion-mnist", "train"), data.load("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    assert torch.bincount(train.labels).tolist() == [6000] * 10  # the published class balance
    # First training label of Fashion-MNIST is 9 (ankle boot), per the data set's documentation.
    assert train.labels[0].item() == 9


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_mnist(directory, n=20):
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("t10k", n // 2)):
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, count))


def test_idx_round_trip_and_errors(tmp_path):
    fake_mnist(tmp_path)
    train = data.load("mnist", "train", str(tmp_path))
    assert train.images.shape == (20, 1, 28, 28)
    raw = gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])  # truncated payload
    with pytest.raises(data.DataError, match="truncated or corrupted"):
        data.load("mnist", "train", str(tmp_path))
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x12\x34" + raw[2:])
    with pytest.raises(data.DataError, match="bad magic number"):
        data.load("mnist", "train", str(tmp_path))
    with pytest.raises(data.DataError, match=r"no t10k-images-idx3-ubyte\[\.gz\] in .*train-images-idx3-ubyte"):
        data.load("mnist", "test", str(tmp_path / "nowhere"))
    with pytest.raises(data.DataError, match="pass --data-dir"):
        data.load("mnist", "train", None)


def fake_cifar(directory):
    d = directory / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 4))}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    return d


def test_cifar_batches_parse_and_code_in_pickles_is_refused(tmp_path):
    d = fake_cifar(tmp_path)
    train = data.load("cifar10", "train", str(tmp_path))
    assert train.images.shape == (20, 3, 32, 32)
    with open(d / "test_batch", "rb") as f:
        batch = pickle.load(f)
    test = data.load("cifar10", "test", str(d))  # the folder itself works too
    assert torch.equal(test.images[0], torch.from_numpy(batch[b"data"][0].reshape(3, 32, 32)))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(data.DataError, match="refusing to load"):
        data.load("cifar10", "test", str(tmp_path))
    with pytest.raises(data.DataError, match="cifar.html"):
        data.load("cifar100", "train", str(tmp_path))


def test_svhn_mat_files(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(2)
    scipy_io.savemat(tmp_path / "train_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, 6), dtype=np.uint8),
                                                   "y": np.array([[10], [1], [2], [3], [10], [9]])})
    ds = data.load("svhn", "train", str(tmp_path))
    assert ds.images.shape == (6, 3, 32, 32) and ds.labels.tolist() == [0, 1, 2, 3, 0, 9]
    with pytest.raises(data.DataError, match="test_32x32.mat"):
        data.load("svhn", "test", str(tmp_path))


def test_validation_split_and_normalisation():
    train, val, test, spec = data.datasets("synthetic", val_split=0.1, seed=3)
    assert len(train) + len(val) == 2000 and len(val) == 200
    loader = data.Loader(train, spec, 500)
    x = torch.cat([b for b, _ in loader])
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2
    with pytest.raises(ValueError, match="val_split"):
        data.datasets("synthetic", val_split=1.0)


def test_augmentation_is_per_sample_not_per_batch():
    train, _, _, spec = data.datasets("synthetic32")
    spec.crop_padding, spec.flip = 4, True
    ordered = DistributedSampler(train, num_replicas=1, rank=0, shuffle=False)

    def images(batch_size):
        loader = data.Loader(train, spec, batch_size, train=True, sampler=ordered, seed=7)
        loader.set_epoch(2)
        return torch.cat([x for x, _ in loader])

    assert torch.equal(images(64), images(100))  # same sample, same crop and flip, any batching
    loader = data.Loader(train, spec, 64, train=True, sampler=ordered, seed=7)
    loader.set_epoch(3)
    assert not torch.equal(torch.cat([x for x, _ in loader]), images(64))  # a new epoch draws anew


def test_augment_choices():
    """augment="auto" keeps each data set's default; the explicit choices set crop and flip (a
    2-pixel pad on 28x28 images, 4 on 32x32); augmented batches differ from plain ones only by
    moving or mirroring pixels."""
    def spec(name, augment):
        s = data.datasets(name, augment=augment)[3]
        return s.crop_padding, s.flip

    assert spec("synthetic", "auto") == (0, False) and spec("synthetic32", "auto") == (0, False)
    assert spec("synthetic", "none") == (0, False)
    assert spec("synthetic", "crop") == (2, False) and spec("synthetic", "crop-flip") == (2, True)
    assert spec("synthetic32", "crop-flip") == (4, True)
    train, _, _, plain = data.datasets("synthetic")
    augmented = data.datasets("synthetic", augment="crop-flip")[3]
    ordered = DistributedSampler(train, num_replicas=1, rank=0, shuffle=False)
    x0 = next(iter(data.Loader(train, plain, 256, train=True, sampler=ordered)))[0]
    x1 = next(iter(data.Loader(train, augmented, 256, train=True, sampler=ordered)))[0]
    assert x0.shape == x1.shape and not torch.equal(x0, x1)
    # a crop of the zero-padded image: every augmented pixel row is a (shifted, maybe mirrored)
    # piece of the plain one, so the multiset of values per image can only lose pixels to padding
    assert (x1.amax(dim=(1, 2, 3)) <= x0.amax(dim=(1, 2, 3)) + 1e-6).all()
    with pytest.raises(ValueError, match="augment must be one of"):
        data.datasets("synthetic", augment="mixup")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown data set 'imagenet'"):
        data.load("imagenet", "train")
