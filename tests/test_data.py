"""Data sets (npz, IDX / Fashion-MNIST, synthetic), shards and batched augmentation."""
import gzip
import os

import numpy as np
import pytest
import torch

from tdconv.apps.data import (DEBIAN_FASHION_MNIST, DatasetError, augment, batch_seed, epoch_order, load_dataset,
                         normalize)


def _write_npz(folder, n_train=20, n_test=10, shape=(8, 8, 3)):
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        np.savez(os.path.join(folder, f"{split}.npz"), x=rng.integers(0, 256, (n, *shape), dtype=np.uint8),
                 y=rng.integers(0, 4, n))


def test_npz_round_trip(tmp_path):
    _write_npz(tmp_path)
    d = load_dataset(f"npz:{tmp_path}")
    raw = np.load(tmp_path / "train.npz")
    assert d.x_train.dtype == torch.uint8 and d.x_train.shape == (20, 3, 8, 8) and d.shape == (3, 8, 8)
    assert torch.equal(d.x_train, torch.from_numpy(raw["x"]).permute(0, 3, 1, 2))
    assert torch.equal(d.y_train, torch.from_numpy(raw["y"]).long())
    assert d.num_classes == int(max(raw["y"].max(), np.load(tmp_path / "test.npz")["y"].max())) + 1
    assert np.allclose(d.mean, raw["x"].reshape(-1, 3).mean(0) / 255)
    sub = d.subset(train=5, test=3, seed=1)
    assert sub.x_train.shape[0] == 5 and sub.x_test.shape[0] == 3
    assert torch.equal(sub.x_train, d.subset(train=5, seed=1).x_train)  # a fixed subset


def test_npz_grayscale(tmp_path):
    _write_npz(tmp_path, shape=(6, 5))
    assert load_dataset(f"npz:{tmp_path}").shape == (1, 6, 5)


@pytest.mark.parametrize("spec, match", [("imagenet", "unknown dataset 'imagenet'"),
                                         ("npz:", "needs a folder"),
                                         ("npz:/nonexistent/folder", "train.npz does not exist")])
def test_bad_dataset_names(spec, match):
    with pytest.raises(DatasetError, match=match):
        load_dataset(spec)


def test_npz_bad_contents(tmp_path):
    os.makedirs(tmp_path, exist_ok=True)
    for split in ("train", "test"):
        np.savez(tmp_path / f"{split}.npz", x=np.zeros((4, 8, 8, 3), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(DatasetError, match="must be uint8"):
        load_dataset(f"npz:{tmp_path}")
    for split in ("train", "test"):
        np.savez(tmp_path / f"{split}.npz", x=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"lacks \['y'\]"):
        load_dataset(f"npz:{tmp_path}")


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    os.makedirs(raw)
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (12, 28, 28)), "t10k": rng.integers(0, 256, (6, 28, 28))}
    for split, x in images.items():
        _write_idx(raw / f"{split}-images-idx3-ubyte.gz", x)
        _write_idx(raw / f"{split}-labels-idx1-ubyte.gz", np.arange(len(x)) % 10)
    d = load_dataset("fashion-mnist", str(tmp_path), download=False)
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (6, 1, 28, 28) and d.num_classes == 10
    assert torch.equal(d.x_test[:, 0], torch.from_numpy(images["t10k"].astype(np.uint8)))


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr("tdconv.apps.data.DEBIAN_FASHION_MNIST", str(tmp_path / "none"))
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", str(tmp_path), download=False)


@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_debian_package(tmp_path):
    d = load_dataset("fashion-mnist", str(tmp_path), download=False)
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.num_classes == 10 and torch.bincount(d.y_test).tolist() == [1000] * 10


def test_synthetic_is_fixed():
    a, b = load_dataset("synthetic"), load_dataset("synthetic")
    assert torch.equal(a.x_train, b.x_train) and a.shape == (3, 32, 32) and a.num_classes == 10


def test_epoch_order_shards():
    n, world = 103, 4
    train = [epoch_order(n, 0, 3, r, world) for r in range(world)]
    assert len({len(t) for t in train}) == 1 and set(torch.cat(train).tolist()) == set(range(n))
    test = [epoch_order(n, 0, 3, r, world, pad=False) for r in range(world)]
    assert sorted(torch.cat(test).tolist()) == list(range(n))  # disjoint, exactly once
    assert not torch.equal(epoch_order(n, 0, 3), epoch_order(n, 0, 4))  # a new order every epoch
    assert torch.equal(epoch_order(n, 0, 3), epoch_order(n, 0, 3))
    assert batch_seed(0, 1, 2) != batch_seed(0, 1, 3) != batch_seed(1, 1, 3)


def test_augment_crops_and_flips():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.int32).reshape(2, 3, 5, 6).to(torch.uint8)
    assert torch.equal(augment(x, 0, padding=0, flip=False), x)
    flipped = augment(x, 0, padding=0, flip=True)
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    y = augment(x, 5, padding=2, flip=False)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):  # every output is a window of the zero-padded input
        windows = [padded[i, :, a:a + 5, b:b + 6] for a in range(5) for b in range(5)]
        assert any(torch.equal(y[i], w) for w in windows)
    assert torch.equal(augment(x, 7), augment(x, 7))
    z = normalize(x, (0.5,) * 3, (0.25,) * 3)
    assert z.dtype == torch.float32 and z.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(z, (x.float() / 255 - 0.5) / 0.25)
