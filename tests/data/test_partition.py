"""Partitions: disjoint, covering, seeded, with the FI paper's exact class proportions."""

import numpy as np
import pytest
import torch

from fedscore import data
from fedscore.errors import FedscoreError

BALANCED = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 400))  # 400 a class
# Unbalanced: 1,003 labels with class sizes from 40 to 160, as real datasets have.
UNBALANCED = np.random.default_rng(1).permutation(
    np.repeat(np.arange(10), [40, 160, 95, 101, 77, 120, 88, 130, 99, 93])
)
RANDOM_SCHEMES = ["iid", "dirichlet", "shards", "homogeneous", "dominant"]


def _is_partition_of_part(parts, n):
    allidx = np.concatenate(parts)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, unique
    assert len(allidx) == len(np.unique(allidx)), "a sample is given to two workers"
    assert allidx.min() >= 0 and allidx.max() < n
    return allidx


@pytest.mark.parametrize("labels", [BALANCED, UNBALANCED], ids=["balanced", "unbalanced"])
@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards", "homogeneous"])
def test_covering_schemes_give_every_sample_to_exactly_one_worker(scheme, labels):
    parts = data.partition(labels, scheme, n_workers=10, seed=0)
    assert len(parts) == 10
    assert len(_is_partition_of_part(parts, len(labels))) == len(labels)


def test_iid_workers_differ_in_size_by_at_most_one():
    sizes = [len(p) for p in data.partition(UNBALANCED, "iid", n_workers=7, seed=2)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(UNBALANCED)


def test_homogeneous_gives_every_worker_a_tenth_of_every_class():
    hist = data.class_histogram(BALANCED, data.partition(BALANCED, "homogeneous", 10, seed=0))
    assert (hist == 40).all()


def test_homogeneous_rounds_each_class_share_to_floor_or_ceil_and_sizes_within_one():
    hist = data.class_histogram(UNBALANCED, data.partition(UNBALANCED, "homogeneous", 7, seed=0))
    counts = np.bincount(UNBALANCED)
    assert (hist.sum(0) == counts).all()
    assert ((hist == counts // 7) | (hist == -(-counts // 7))).all()
    assert hist.sum(1).max() - hist.sum(1).min() <= 1


def test_dominant_gives_worker_j_half_of_class_j_and_the_rest_evenly():
    parts = data.partition(BALANCED, "dominant", n_workers=10, seed=0)
    _is_partition_of_part(parts, len(BALANCED))
    hist = data.class_histogram(BALANCED, parts)
    m = hist.sum(1)
    assert (m == 400).all()  # balanced classes, 10 workers: all 4,000 samples are used
    for j in range(10):
        assert hist[j, j] == 200
        others = np.delete(hist[j], j)
        assert others.sum() == 200 and others.max() - others.min() <= 1


@pytest.mark.parametrize("n_workers", [3, 10, 17])
def test_dominant_proportions_hold_on_unbalanced_classes_for_any_worker_count(n_workers):
    parts = data.partition(UNBALANCED, "dominant", n_workers=n_workers, seed=0)
    _is_partition_of_part(parts, len(UNBALANCED))
    hist = data.class_histogram(UNBALANCED, parts)
    m = hist.sum(1)
    assert (m == m[0]).all() and m[0] % 2 == 0 and m[0] > 0
    for j in range(n_workers):
        assert hist[j, j % 10] == m[0] // 2
        others = np.delete(hist[j], j % 10)
        assert others.max() - others.min() <= 1
    assert (hist.sum(0) <= np.bincount(UNBALANCED)).all()


def test_dominant_takes_the_largest_even_size_the_scarcest_class_allows():
    # Hand-computed: 3 workers, classes of 10, 10, 4. m = 6 would need 3 of class 2 for
    # worker 2 plus 1 or 2 for each of the others (> 4); m = 4 needs 2 + 1 + 1 = 4.
    labels = np.repeat([0, 1, 2], [10, 10, 4])
    hist = data.class_histogram(labels, data.partition(labels, "dominant", 3, seed=0))
    assert hist.tolist() == [[2, 1, 1], [1, 2, 1], [1, 1, 2]]


def test_shards_give_each_worker_exactly_c_classes_shared_evenly():
    for c in (1, 2, 3):
        parts = data.partition(UNBALANCED, "shards", 10, seed=0, classes_per_worker=c)
        hist = data.class_histogram(UNBALANCED, parts)
        assert ((hist > 0).sum(1) == c).all()
        holders = (hist > 0).sum(0)
        assert holders.max() - holders.min() <= 1
        for k in range(10):  # a class's holders split it to within one sample
            shares = hist[hist[:, k] > 0, k]
            assert shares.max() - shares.min() <= 1


def test_all_is_one_worker_holding_everything():
    (only,) = data.partition(UNBALANCED, "all")
    assert np.array_equal(only, np.arange(len(UNBALANCED)))
    assert len(data.partition(UNBALANCED, "all", n_workers=1)) == 1


@pytest.mark.parametrize(
    ("scheme", "kw"),
    [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("shards", {}), ("homogeneous", {}),
     ("dominant", {})],
)
def test_partitions_are_reproducible_by_seed(scheme, kw):
    a = data.partition(UNBALANCED, scheme, 5, seed=3, **kw)
    b = data.partition(UNBALANCED, scheme, 5, seed=3, **kw)
    c = data.partition(UNBALANCED, scheme, 5, seed=4, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_torch_labels_give_the_same_partition_as_numpy():
    a = data.partition(torch.from_numpy(UNBALANCED), "dirichlet", 4, seed=1)
    b = data.partition(UNBALANCED, "dirichlet", 4, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_dirichlet_skew_grows_as_alpha_falls():
    def mean_entropy(alpha):
        hist = data.class_histogram(
            BALANCED, data.partition(BALANCED, "dirichlet", 10, seed=0, alpha=alpha)
        ).astype(float)
        p = hist / np.maximum(hist.sum(1, keepdims=True), 1)
        return float(-(p * np.log(np.where(p > 0, p, 1))).sum(1).mean())

    entropies = [mean_entropy(a) for a in (100.0, 1.0, 0.1)]
    assert entropies[0] > entropies[1] > entropies[2]
    assert entropies[0] > 0.98 * np.log(10)  # alpha = 100 is nearly iid
    assert entropies[2] < 0.5 * np.log(10)  # alpha = 0.1: a worker sees few classes


def test_dirichlet_that_cannot_fill_every_worker_is_a_clear_error():
    # alpha -> 0 puts each of the 10 classes on one worker: 20 workers cannot all get data.
    with pytest.raises(FedscoreError, match="min_size"):
        data.partition(BALANCED, "dirichlet", 20, seed=0, alpha=1e-4, max_tries=5)
    parts = data.partition(BALANCED, "dirichlet", 20, seed=0, alpha=1e-4, min_size=0)
    assert sum(len(p) == 0 for p in parts) >= 10


def test_class_histogram_counts_by_hand():
    labels = np.array([0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5])]
    assert data.class_histogram(labels, parts).tolist() == [[1, 1, 0], [0, 1, 3]]
    assert data.class_histogram(labels, parts, n_classes=4).tolist() == [[1, 1, 0, 0],
                                                                          [0, 1, 3, 0]]


def test_partition_heatmap_is_written_as_png(tmp_path):
    parts = data.partition(BALANCED, "dominant", 10, seed=0)
    path = data.plot_partition(BALANCED, parts, tmp_path / "partition.png")
    assert path == tmp_path / "partition.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


@pytest.mark.parametrize(
    ("scheme", "kwargs", "message"),
    [
        ("pathological", {}, "unknown partition scheme.*dirichlet"),
        ("dirichlet", {"alpha": 0.0}, "alpha must be a positive number"),
        ("dirichlet", {"alpha": -1.0}, "alpha must be a positive number"),
        ("iid", {"n_workers": 0}, "n_workers must be a positive integer"),
        ("iid", {"n_workers": 5000}, "more than the 4000 samples"),
        ("shards", {"classes_per_worker": 11}, "classes_per_worker must be between 1 and"),
        ("shards", {"n_workers": 3, "classes_per_worker": 2}, "cannot hold all 10 classes"),
        ("all", {"n_workers": 3}, "n_workers must be 1"),
        ("iid", {"alpha": 0.5}, "takes no option 'alpha'"),
    ],
)
def test_bad_partition_arguments_are_clear_errors(scheme, kwargs, message):
    kwargs = {"n_workers": 10, **kwargs}
    with pytest.raises(FedscoreError, match=message):
        data.partition(BALANCED, scheme, **kwargs)


def test_labels_that_are_not_integer_vectors_are_refused():
    with pytest.raises(FedscoreError, match="1-D array of integers"):
        data.partition(BALANCED.astype(float), "iid")
    with pytest.raises(FedscoreError, match="1-D array of integers"):
        data.partition(BALANCED.reshape(40, 100), "iid")
