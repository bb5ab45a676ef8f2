"""Datasets: bundled images in [-1, 1] with fixed stratified splits, Gaussian-mixture draws
with component labels, local torchvision folders read (never fetched) with clear errors."""

import struct

import numpy as np
import pytest
import torch

from fedscore import data, toy
from fedscore.data import sources
from fedscore.errors import FedscoreError


@pytest.mark.parametrize(
    ("name", "shape", "n"), [("digits", (1, 8, 8), 1797), ("mnist5k", (1, 28, 28), 5000)]
)
def test_bundled_images_are_float_in_minus_one_one_with_int_labels(name, shape, n):
    x, y = data.load(name, "all")
    assert x.shape == (n, *shape) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    # the darkest pixel maps to -1 and the brightest to +1 exactly (0..16 resp. 0..255 input)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10))
    info = data.info(name)
    assert info.shape == shape and info.classes == 10 and sum(info.n.values()) == n


RAW = {"digits": sources._digits_arrays, "mnist5k": sources._mnist5k_arrays}


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_bundled_split_is_a_fixed_stratified_80_20_that_ignores_the_seed(name):
    raw_x, raw_y = RAW[name]()
    train, test = sources.split_indices(raw_y, "train"), sources.split_indices(raw_y, "test")
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(raw_y)
    assert (np.bincount(raw_y[test]) == np.round(0.2 * np.bincount(raw_y))).all()
    x_tr, y_tr = data.load(name, "train")
    x_te, y_te = data.load(name, "test", seed=123)  # the seed does not move the split
    assert torch.equal(x_tr, torch.from_numpy(raw_x[train]))
    assert torch.equal(y_te, torch.from_numpy(raw_y[test]))
    assert torch.equal(data.load(name, "test")[0], x_te)
    x_all, y_all = data.load(name, "all")  # train then test
    assert torch.equal(x_all, torch.cat([x_tr, x_te]))
    assert torch.equal(y_all, torch.cat([y_tr, y_te]))
    # Golden values recorded when the split was fixed: a change to the rule (seed, shuffle,
    # rounding) would silently change every reported test metric, so it must fail here.
    golden = {"digits": ([0, 2, 7, 18, 20, 22], 299917), "mnist5k": ([1, 2, 7, 36, 41, 44],
                                                                    2490612)}[name]
    assert (test[:6].tolist(), int(test.sum())) == golden


def test_mnist5k_split_is_400_train_and_100_test_images_per_digit():
    _, y_tr = data.load("mnist5k", "train")
    _, y_te = data.load("mnist5k", "test")
    assert torch.bincount(y_tr).tolist() == [400] * 10
    assert torch.bincount(y_te).tolist() == [100] * 10


def test_loaded_tensors_do_not_alias_the_cache():
    x, _ = data.load("digits", "train")
    x.fill_(5.0)
    assert float(data.load("digits", "train")[0].max()) == 1.0


def test_gaussian_mixture_data_come_with_component_labels_and_fixed_draws():
    x, comp = data.load("gmm:ring8", "train")
    x_te, comp_te = data.load("gmm:ring8", "test")
    assert x.shape == (4000, 2) and x.dtype == torch.float32 and comp.dtype == torch.int64
    assert x_te.shape == (1000, 2) and len(comp_te) == 1000
    assert sorted(set(comp.tolist())) == list(range(8))
    # ring8: 8 modes on a circle of radius 3 with std 0.25 (not rescaled to [-1, 1])
    assert abs(float(x.norm(dim=1).mean()) - 3.0) < 0.05
    # each sample lies nearest the mean of the component it is labelled with
    means = toy.preset("ring8").means.float()
    assert (torch.cdist(x, means).argmin(1) == comp).float().mean() > 0.99
    assert not torch.equal(x[:1000], x_te)
    assert torch.equal(data.load("gmm:ring8", "train")[0], x)
    assert not torch.equal(data.load("gmm:ring8", "train", seed=1)[0], x)
    x_all, _ = data.load("gmm:ring8", "all")
    assert torch.equal(x_all, torch.cat([x, x_te]))
    info = data.info("gmm:ring8")
    assert info.shape == (2,) and info.classes == 8 and info.n == {"train": 4000, "test": 1000}


def test_unknown_names_splits_and_presets_are_clear_errors():
    with pytest.raises(FedscoreError, match=r"unknown dataset 'mnist6k'.*gmm:<preset>.*mnist5k"):
        data.load("mnist6k")
    with pytest.raises(FedscoreError, match="unknown split 'validation'.*train"):
        data.load("digits", "validation")
    with pytest.raises(FedscoreError, match="ring8"):
        data.load("gmm:nope")
    with pytest.raises(FedscoreError, match="needs a preset"):
        data.load("gmm")
    with pytest.raises(FedscoreError, match=r"variant is a resolution HxW.*'digits:14x14'"):
        data.load("digits:big")


def test_an_image_dataset_reads_at_a_lower_resolution_as_exact_block_means():
    full, y_full = data.load("mnist5k", "train")
    half, y_half = data.load("mnist5k:14x14", "train")
    assert half.shape == (len(full), 1, 14, 14) and torch.equal(y_half, y_full)
    # pixel (i, j) is the mean of the 2x2 block (2i..2i+1, 2j..2j+1): an exact average
    block = full[:, :, 2 * 3:2 * 3 + 2, 2 * 5:2 * 5 + 2].mean(dim=(2, 3))
    torch.testing.assert_close(half[:, :, 3, 5], block)
    assert float(half.min()) >= -1.0 and float(half.max()) <= 1.0
    info = data.info("mnist5k:14x14")
    assert info.shape == (1, 14, 14) and info.n == data.info("mnist5k").n
    assert data.family("mnist5k:14x14") == "mnist5k"
    assert data.info("cifar10:16x16").shape == (3, 16, 16)  # described without its files
    with pytest.raises(FedscoreError, match=r"10x10 must divide the images' 28x28.*14x14"):
        data.load("mnist5k:10x10")
    with pytest.raises(FedscoreError, match=r"must divide the images' 32x32"):
        data.info("cifar10:10x10")


def test_local_datasets_are_described_without_their_files():
    info = data.info("cifar10")
    assert info.shape == (3, 32, 32) and info.n == {"train": 50000, "test": 10000}


def test_no_data_root_says_to_pass_one_and_how_to_fetch():
    with pytest.raises(FedscoreError) as err:
        data.load("mnist", "train")
    msg = str(err.value)
    assert "--data-root" in msg and "MNIST/raw/train-images-idx3-ubyte" in msg
    assert "torchvision.datasets.MNIST" in msg and "data.download=true" in msg
    with pytest.raises(FedscoreError, match="'/no/such/dir' does not exist"):
        data.load("svhn", "test", data_root="/no/such/dir")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("fashion-mnist", "FashionMNIST/raw/train-labels-idx1-ubyte"),
        ("cifar10", "cifar-10-batches-py/data_batch_5"),
        ("svhn", "train_32x32.mat"),
    ],
)
def test_an_empty_data_root_lists_the_missing_files_and_touches_nothing(tmp_path, name, expected):
    with pytest.raises(FedscoreError) as err:
        data.load(name, "train", data_root=tmp_path)
    msg = str(err.value)
    assert f"missing: {expected}" in msg or f", {expected}" in msg
    assert str(tmp_path) in msg and "download=True" in msg
    assert list(tmp_path.iterdir()) == []  # nothing downloaded, no folder created


def test_a_data_root_with_wrong_files_is_one_clear_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):  # right names, foreign contents (a saved error page)
        for f in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
            (raw / f).write_bytes(b"<html>not found</html>")
    with pytest.raises(FedscoreError, match="could not be read") as err:
        data.load("mnist", "train", data_root=tmp_path)
    assert "MNIST/raw/train-images-idx3-ubyte" in str(err.value)
    # CIFAR-10 batches with the right names but foreign contents fail torchvision's md5 check
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (batches / f).write_bytes(b"junk")
    with pytest.raises(FedscoreError, match="could not be read"):
        data.load("cifar10", "test", data_root=tmp_path)


def _write_idx(path, array: np.ndarray):
    """The big-endian idx format of MNIST: magic 0x0800 | ndim, the dims, then uint8 data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")]
)
def test_a_local_folder_in_torchvisions_layout_is_read_and_scaled(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (6, 28, 28)), "t10k": rng.integers(0, 256, (4, 28, 28))}
    images["train"][0, 0, 0], images["train"][0, 0, 1] = 0, 255
    labels = {"train": np.arange(6) % 10, "t10k": np.array([9, 8, 7, 6])}
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[prefix])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[prefix])
    x, y = data.load(name, "train", data_root=tmp_path)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = torch.from_numpy(images["train"]).float()[:, None] / 127.5 - 1
    assert torch.allclose(x, expected) and float(x.min()) == -1 and float(x.max()) == 1
    assert y.tolist() == labels["train"].tolist()
    x_all, y_all = data.load(name, "all", data_root=str(tmp_path))
    assert x_all.shape == (10, 1, 28, 28) and y_all[6:].tolist() == [9, 8, 7, 6]


def test_images_and_labels_of_different_lengths_are_refused(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n_labels in (("train", 3), ("t10k", 2)):  # 5 train images, 3 labels
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", np.zeros((5, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.zeros(n_labels))
    with pytest.raises(FedscoreError, match="5 images but 3 labels"):
        data.load("mnist", "train", data_root=tmp_path)
