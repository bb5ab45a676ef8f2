"""Partitions: disjoint, covering, seeded, with the FI paper's exact class proportions."""

import numpy as np
import pytest

from fedscore import data
from fedscore.errors import FedscoreError

LABELS = np.repeat(np.arange(10), 400)  # 4,000 samples, 400 per class
np.random.default_rng(0).shuffle(LABELS)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards", "homogeneous", "dominant"])
def test_parts_are_disjoint_and_the_covering_schemes_cover_everything(scheme):
    parts = data.partition(LABELS, scheme, n_workers=10, seed=0)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx))
    if scheme != "dominant":
        assert len(allidx) == len(LABELS)
    assert all(np.all(np.diff(p) > 0) for p in parts)


def test_homogeneous_gives_every_worker_a_tenth_of_every_class():
    hist = data.class_histogram(LABELS, data.partition(LABELS, "homogeneous", 10, seed=0))
    assert (hist == 40).all()


def test_dominant_gives_worker_j_half_of_class_j_and_the_rest_evenly():
    parts = data.partition(LABELS, "dominant", n_workers=10, seed=0)
    hist = data.class_histogram(LABELS, parts)
    sizes = hist.sum(1)
    assert (sizes == sizes[0]).all()
    m = sizes[0]
    for j in range(10):
        assert hist[j, j] == round(m / 2)
        others = np.delete(hist[j], j)
        assert others.max() - others.min() <= 1
    # class c feeds m/2 to worker c and m/18 to each of the 9 others: m = 400 uses all data
    assert m == 400


def test_partitions_are_reproducible_by_seed():
    a = data.partition(LABELS, "dirichlet", 5, seed=3, alpha=0.3)
    b = data.partition(LABELS, "dirichlet", 5, seed=3, alpha=0.3)
    c = data.partition(LABELS, "dirichlet", 5, seed=4, alpha=0.3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_skew_grows_as_alpha_falls():
    def mean_entropy(alpha):
        hist = data.class_histogram(LABELS, data.partition(LABELS, "dirichlet", 10, seed=0,
                                                           alpha=alpha)).astype(float)
        p = hist / np.maximum(hist.sum(1, keepdims=True), 1)
        return float(-(p * np.log(np.where(p > 0, p, 1))).sum(1).mean())

    entropies = [mean_entropy(a) for a in (100.0, 1.0, 0.1)]
    assert entropies[0] > entropies[1] > entropies[2]
    assert entropies[0] > 0.95 * np.log(10)


def test_shards_give_each_worker_few_classes_and_all_is_one_worker():
    hist = data.class_histogram(LABELS, data.partition(LABELS, "shards", 10, seed=0))
    assert ((hist > 0).sum(1) <= 2).all()
    (only,) = data.partition(LABELS, "all", n_workers=1)
    assert len(only) == len(LABELS)


def test_partition_heatmap_is_written(tmp_path):
    parts = data.partition(LABELS, "dominant", 10, seed=0)
    path = data.plot_partition(LABELS, parts, tmp_path / "p.png")
    assert path.stat().st_size > 1000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "pathological"}, "dirichlet"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha > 0"),
        ({"scheme": "iid", "n_workers": 0}, "positive integer"),
        ({"scheme": "iid", "n_workers": 5000}, "only 4000 samples"),
        ({"scheme": "shards", "classes_per_worker": 11}, "exceeds"),
        ({"scheme": "all", "n_workers": 3}, "exactly one worker"),
    ],
)
def test_bad_partition_arguments_are_clear_errors(kwargs, message):
    kwargs = {"n_workers": 10, **kwargs}
    scheme = kwargs.pop("scheme")
    with pytest.raises(FedscoreError, match=message):
        data.partition(LABELS, scheme, **kwargs)
