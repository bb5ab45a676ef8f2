"""Datasets load bundled data in [-1, 1] with stable splits; missing folders are clear."""

import pytest
import torch

from fedscore import data
from fedscore.errors import FedscoreError


@pytest.mark.parametrize(("name", "shape", "n"), [("digits", (1, 8, 8), 1797),
                                                  ("mnist5k", (1, 28, 28), 5000)])
def test_bundled_images_are_in_range_with_disjoint_stable_splits(name, shape, n):
    train_x, train_y = data.load(name, "train")
    test_x, test_y = data.load(name, "test")
    assert train_x.shape[1:] == shape and train_x.dtype == torch.float32
    assert train_y.dtype == torch.int64 and len(train_x) + len(test_x) == n
    assert float(train_x.min()) >= -1 and float(train_x.max()) <= 1
    assert float(train_x.min()) == -1 and float(train_x.max()) > 0.9
    assert abs(len(test_x) / n - 0.2) < 0.01
    assert torch.equal(torch.bincount(test_y) > 0, torch.ones(10, dtype=torch.bool))
    again, _ = data.load(name, "test")
    assert torch.equal(again, test_x)
    # no test image is also a training image
    flat_train = {tuple(r.tolist()) for r in train_x.flatten(1)[:400]}
    assert not any(tuple(r.tolist()) in flat_train for r in test_x.flatten(1))


def test_gaussian_mixture_data_come_with_component_labels():
    x, comp = data.load("gmm:ring8", "train")
    assert x.shape == (4000, 2) and comp.max() == 7
    assert data.info("gmm:ring8").classes == 8


def test_a_missing_data_root_says_which_files_and_how_to_fetch_them(tmp_path):
    with pytest.raises(FedscoreError, match="--data-root"):
        data.load("mnist", "train")
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "MNIST" / "raw" / "junk.txt").write_text("not mnist")
    with pytest.raises(FedscoreError) as err:
        data.load("mnist", "train", data_root=tmp_path)
    assert "train-images-idx3-ubyte" in str(err.value) and "data.download=true" in str(err.value)


def test_unknown_dataset_and_split_are_clear_errors():
    with pytest.raises(FedscoreError, match="mnist5k"):
        data.load("mnist6k")
    with pytest.raises(FedscoreError, match="train"):
        data.load("digits", "validation")
