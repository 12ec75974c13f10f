"""Image classification data kept as uint8 tensors, with augmentation done on whole batches.

A data set is a pair of uint8 image tensors ``[N, C, H, W]`` (train, test) with int64 labels. It is
moved to the training device once; every batch is cropped, flipped and normalised there, so loading
never limits training speed (no worker processes, no PIL). Every random choice of an epoch is drawn
from generators seeded by ``(seed, epoch, batch)``: a run resumed in the middle of an epoch sees
exactly the batches an uninterrupted run would have seen.

Sources (``load_dataset(spec)``):

- ``"cifar10"``: torchvision's CIFAR-10 under ``root`` (downloaded where the official host can be
  reached);
- ``"fashion-mnist"``: torchvision's Fashion-MNIST files under ``root``, else Debian's
  ``dataset-fashion-mnist`` package, else a torchvision download;
- ``"npz:DIR"``: ``DIR/train.npz`` and ``DIR/test.npz``, each with ``x`` (uint8 ``[N, H, W, C]`` or
  ``[N, H, W]``) and ``y`` (integer labels);
- ``"synthetic"``: a small generated 10-class problem (3x32x32) for tests and smoke runs.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ImageDataset", "DatasetError", "load_dataset", "batch_seed", "epoch_order", "augment", "normalize",
           "DEBIAN_FASHION_MNIST"]

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class DatasetError(ValueError):
    """A data set that cannot be found or read; the message says how to get it."""


@dataclass
class ImageDataset:
    """Train and test images as uint8 ``[N, C, H, W]`` tensors with int64 labels ``[N]``."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple
    std: tuple

    @property
    def shape(self) -> tuple:
        """``(C, H, W)`` of one image."""
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "ImageDataset":
        return ImageDataset(self.name, self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                            self.y_test.to(device), self.num_classes, self.mean, self.std)

    def subset(self, train: int | None = None, test: int | None = None, seed: int = 0) -> "ImageDataset":
        """The first ``train`` / ``test`` images of a fixed shuffle (``seed``), class balance kept by chance."""
        def take(x, y, n, what):
            if n is None:
                return x, y
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"{what} must be a positive int, got {n!r}")
            idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n].to(y.device)
            return x[idx], y[idx]

        x_train, y_train = take(self.x_train, self.y_train, train, "train_subset")
        x_test, y_test = take(self.x_test, self.y_test, test, "test_subset")
        return ImageDataset(self.name, x_train, y_train, x_test, y_test, self.num_classes, self.mean, self.std)


def _from_arrays(name, x_train, y_train, x_test, y_test) -> ImageDataset:
    def images(x, what):
        x = np.asarray(x)
        if x.dtype != np.uint8:
            raise DatasetError(f"{name}: {what} images must be uint8, got {x.dtype}")
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise DatasetError(f"{name}: {what} images must be [N, H, W, C] or [N, H, W], got shape {x.shape}")
        return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    def labels(y, n, what):
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
            raise DatasetError(f"{name}: {what} labels must be {n} integers, got {y.dtype} of shape {y.shape}")
        if n and y.min() < 0:
            raise DatasetError(f"{name}: {what} labels must be >= 0, got {int(y.min())}")
        return torch.from_numpy(y.astype(np.int64))

    xt, xv = images(x_train, "train"), images(x_test, "test")
    if xt.shape[1:] != xv.shape[1:]:
        raise DatasetError(f"{name}: train images are {tuple(xt.shape[1:])} but test images {tuple(xv.shape[1:])}")
    if len(xt) == 0 or len(xv) == 0:
        raise DatasetError(f"{name}: the train and test sets must not be empty")
    yt, yv = labels(y_train, len(xt), "train"), labels(y_test, len(xv), "test")
    num_classes = int(max(yt.max(), yv.max())) + 1
    scaled = xt.to(torch.float64) / 255.0
    mean = tuple(scaled.mean((0, 2, 3)).tolist())
    std = tuple(scaled.std((0, 2, 3)).clamp_min(1e-3).tolist())
    return ImageDataset(name, xt, yt, xv, yv, num_classes, mean, std)


def _read_npz(directory: str) -> ImageDataset:
    arrays = {}
    for split in ("train", "test"):
        path = os.path.join(directory, f"{split}.npz")
        if not os.path.isfile(path):
            raise DatasetError(f"npz:{directory}: {path} does not exist; the folder must hold train.npz and test.npz, "
                               "each with 'x' (uint8 [N, H, W, C] or [N, H, W]) and 'y' (integer labels)")
        with np.load(path) as f:
            missing = {"x", "y"} - set(f.files)
            if missing:
                raise DatasetError(f"npz:{directory}: {path} lacks {sorted(missing)} (has {sorted(f.files)})")
            arrays[split] = (f["x"], f["y"])
    return _from_arrays(f"npz:{directory}", *arrays["train"], *arrays["test"])


def _read_idx(path: str) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DatasetError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"{path} is truncated: {body.size} values for shape {dims}")
    return body.reshape(dims)


def _find_idx(folder: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _fashion_mnist(root: str | None, download: bool) -> ImageDataset:
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    folders = ([os.path.join(root, "FashionMNIST", "raw"), root] if root else []) + [DEBIAN_FASHION_MNIST]
    for folder in folders:
        paths = [_find_idx(folder, s) for s in stems]
        if all(paths):
            return _from_arrays("fashion-mnist", *[_read_idx(p) for p in paths])
    if download and root:
        try:
            import torchvision
            torchvision.datasets.FashionMNIST(root, train=True, download=True)
            torchvision.datasets.FashionMNIST(root, train=False, download=True)
            return _fashion_mnist(root, download=False)
        except Exception as exc:  # no network, no torchvision: say how to get the files instead
            reason = f" (download failed: {type(exc).__name__}: {exc})"
    else:
        reason = "" if root else " (no --data-root to download into)"
    raise DatasetError(f"fashion-mnist: no data set found in {', '.join(folders)}{reason}. Get it with "
                       f"'apt-get install dataset-fashion-mnist' (Debian, Ubuntu), or let torchvision download "
                       f"it into --data-root where the internet can be reached")


def _cifar10(root: str | None, download: bool) -> ImageDataset:
    root = root or "data"
    try:
        import torchvision
        train = torchvision.datasets.CIFAR10(root, train=True, download=download)
        test = torchvision.datasets.CIFAR10(root, train=False, download=download)
    except Exception as exc:
        raise DatasetError(
            f"cifar10: could not {'download or ' if download else ''}read CIFAR-10 in {root!r} "
            f"({type(exc).__name__}: {exc}). Where the official host cannot be reached, copy torchvision's "
            f"'cifar-10-batches-py' folder into that directory, or write the data set as DIR/train.npz and "
            f"DIR/test.npz (x: uint8 [N, 32, 32, 3], y: labels) and pass --dataset npz:DIR") from None
    return _from_arrays("cifar10", train.data, np.asarray(train.targets), test.data, np.asarray(test.targets))


def _synthetic(n_train: int = 2000, n_test: int = 500, classes: int = 10, size: int = 32) -> ImageDataset:
    """Ten classes of smooth random colour patterns, shifted and noisy: learnable in one epoch, far from trivial."""
    g = torch.Generator().manual_seed(1234)
    templates = F.interpolate(torch.rand(classes, 3, 4, 4, generator=g), size=(size + 8, size + 8),
                              mode="bicubic", align_corners=False)

    def draw(n):
        y = torch.randint(0, classes, (n,), generator=g)
        dy, dx = torch.randint(0, 9, (2, n), generator=g)
        rows = (dy[:, None] + torch.arange(size))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(size))[:, None, None, :]
        x = templates[y[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
        x = x + 0.35 * torch.randn(x.shape, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), y.numpy()

    return _from_arrays("synthetic", *draw(n_train), *draw(n_test))


DATASETS = ("cifar10", "fashion-mnist", "npz:DIR", "synthetic")


def load_dataset(spec: str, root: str | None = None, *, download: bool = True) -> ImageDataset:
    """Load a data set by name (see the module docstring): ``cifar10``, ``fashion-mnist``, ``npz:DIR``
    or ``synthetic``. Raises :class:`DatasetError` saying how to get a data set that is missing."""
    if not isinstance(spec, str):
        raise TypeError(f"dataset must be a string, got {type(spec).__name__}")
    if spec == "cifar10":
        return _cifar10(root, download)
    if spec in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return _fashion_mnist(root, download)
    if spec.startswith("npz:"):
        if not spec[4:]:
            raise DatasetError("dataset 'npz:' needs a folder: npz:DIR")
        return _read_npz(spec[4:])
    if spec == "synthetic":
        return _synthetic()
    raise DatasetError(f"unknown dataset {spec!r}; expected one of {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------------------------- batches
def batch_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """The seed of one batch's random choices: a pure function of its position in the run."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    # epoch and batch may be small negative tags (-1: an epoch's permutation, -2: BatchNorm re-estimation)
    words = [seed, epoch + 8, batch + 8, rank]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1, *, pad: bool = True) -> torch.Tensor:
    """This process's indices of an epoch: one permutation shared by all processes, split round robin.
    ``pad`` repeats the first indices so every process gets the same count (training); without it the
    shards are disjoint and cover the data exactly once (evaluation)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(batch_seed(seed, epoch, -1)))
    if pad and n % world:
        perm = torch.cat([perm, perm[:world - n % world]])
    return perm[rank::world]


def augment(x: torch.Tensor, seed: int, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop (zero padding ``padding``) and horizontal flip of a uint8 batch ``[B, C, H, W]``,
    done on ``x``'s device; the choices come from ``seed`` (drawn on the CPU: the same on every device)."""
    b, c, h, w = x.shape
    g = torch.Generator().manual_seed(seed)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, b), generator=g)
    flips = torch.rand(b, generator=g) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    rows = dy[:, None] + torch.arange(h)
    dev = x.device
    padded = F.pad(x, (padding,) * 4) if padding else x
    return padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows.to(dev)[:, None, :, None], cols.to(dev)[:, None, None, :]]


def normalize(x: torch.Tensor, mean: tuple, std: tuple, dtype=torch.float32) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> ``dtype``, scaled to [0, 1] and standardised per channel, channels_last."""
    m = torch.tensor(mean, dtype=dtype, device=x.device)[None, :, None, None]
    s = torch.tensor(std, dtype=dtype, device=x.device)[None, :, None, None]
    y = (x.to(dtype) / 255.0 - m) / s
    return y.contiguous(memory_format=torch.channels_last)


def calibration_images(data: ImageDataset, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` training images, normalised as the model sees them at test time (no augmentation, no
    labels): the first ``n`` of a fixed shuffle of the training set (``seed``), float32 ``[n, C, H, W]``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of calibration images must be a positive int, got {n!r}")
    if n > len(data.y_train):
        raise ValueError(f"{n} calibration images asked for, the training set has {len(data.y_train)}")
    g = torch.Generator().manual_seed(seed + 7919)  # not the subset's or the epochs' shuffle
    idx = torch.randperm(len(data.y_train), generator=g)[:n].to(data.x_train.device)
    return normalize(data.x_train[idx], data.mean, data.std).contiguous()
