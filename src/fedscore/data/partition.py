"""Worker partitions: which sample indices each worker holds (seeded, disjoint).

Why our own and not flwr-datasets' partitioners: those work on Hugging Face `datasets`
objects (another large dependency, and a hub loader we may not call here), and neither of
the FI paper's regimes (`homogeneous`, `dominant`) is among them; on an in-memory label
array each scheme below is a few lines of numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedscore.errors import FedscoreError, unknown


def _classes(labels: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]


def iid(labels: np.ndarray, n_workers: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A uniformly random split into near-equal parts."""
    return list(np.array_split(rng.permutation(len(labels)), n_workers))


def dirichlet(labels, n_workers, rng, alpha: float = 0.5) -> list[np.ndarray]:
    """Each class split across workers by proportions ~ Dirichlet(alpha): small alpha, skewed
    workers (Hsu et al. 2019)."""
    if alpha <= 0:
        raise FedscoreError(f"dirichlet partitions need alpha > 0 (got {alpha})")
    parts: list[list[int]] = [[] for _ in range(n_workers)]
    for idx in _classes(labels):
        idx = rng.permutation(idx)
        p = rng.dirichlet(np.full(n_workers, alpha))
        cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
        for w, chunk in enumerate(np.split(idx, cuts)):
            parts[w].extend(chunk.tolist())
    return [np.array(p, dtype=np.int64) for p in parts]


def shards(labels, n_workers, rng, classes_per_worker: int = 2) -> list[np.ndarray]:
    """Pathological non-iid (McMahan et al. 2017): sort by label, cut into
    n_workers * classes_per_worker shards, give each worker classes_per_worker shards."""
    n_classes = int(labels.max()) + 1
    if classes_per_worker > n_classes:
        raise FedscoreError(
            f"classes_per_worker={classes_per_worker} exceeds the {n_classes} classes"
        )
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, n_workers * classes_per_worker)
    assignment = rng.permutation(len(pieces))
    return [np.concatenate([pieces[j] for j in assignment[w::n_workers]])
            for w in range(n_workers)]


def homogeneous(labels, n_workers, rng) -> list[np.ndarray]:
    """The FI paper's homogeneous regime: every worker holds 1/n_workers of every class
    (class c's samples split into near-equal shares; remainders go to the first workers)."""
    parts: list[list[int]] = [[] for _ in range(n_workers)]
    for idx in _classes(labels):
        for w, chunk in enumerate(np.array_split(rng.permutation(idx), n_workers)):
            parts[w].extend(chunk.tolist())
    return [np.array(p, dtype=np.int64) for p in parts]


def dominant(labels, n_workers, rng) -> list[np.ndarray]:
    """The FI paper's heterogeneous regime: worker j holds m samples, round(m/2) of class
    j mod C and the rest spread evenly over the other C - 1 classes (counts differ by at most
    one; the extra ones go to the classes after j).

    m is the largest size every worker can get without reusing a sample: class c must cover
    its dominant workers' halves plus its share of everyone else's other half.
    """
    n_classes = int(labels.max()) + 1
    pools = [list(rng.permutation(idx)) for idx in _classes(labels)]
    dominant_of = [j % n_classes for j in range(n_workers)]

    def plan(m: int) -> list[np.ndarray]:
        half = int(round(m / 2))
        rest = m - half
        counts = np.zeros((n_workers, n_classes), dtype=np.int64)
        for j, d in enumerate(dominant_of):
            counts[j, d] = half
            others = [(d + 1 + i) % n_classes for i in range(n_classes - 1)]
            base, extra = divmod(rest, n_classes - 1)
            for i, c in enumerate(others):
                counts[j, c] = base + (1 if i < extra else 0)
        return counts

    sizes = np.array([len(p) for p in pools])
    lo, hi = 0, len(labels) // n_workers
    while lo < hi:  # the largest feasible m (feasibility is monotone in m)
        mid = (lo + hi + 1) // 2
        if (plan(mid).sum(0) <= sizes).all():
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        raise FedscoreError("too few samples per class for the dominant partition")
    counts = plan(lo)
    parts = []
    for j in range(n_workers):
        take = []
        for c in range(n_classes):
            take.extend(pools[c][: counts[j, c]])
            del pools[c][: counts[j, c]]
        parts.append(np.array(take, dtype=np.int64))
    return parts


def everything(labels, n_workers, rng) -> list[np.ndarray]:
    """The FI paper's CONTROL: one worker holds all the data (n_workers must be 1)."""
    if n_workers != 1:
        raise FedscoreError(
            f"the 'all' partition has exactly one worker (got n_workers={n_workers})"
        )
    return [np.arange(len(labels), dtype=np.int64)]


SCHEMES: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "shards": shards,
    "homogeneous": homogeneous,
    "dominant": dominant,
    "all": everything,
}


def partition(labels, scheme: str, n_workers: int = 10, seed: int = 0, **kw) -> list[np.ndarray]:
    """Disjoint, sorted int64 index arrays, one per worker, by a named scheme (seeded)."""
    labels = np.asarray(labels)
    if scheme not in SCHEMES:
        raise unknown("partition scheme", scheme, SCHEMES)
    if not isinstance(n_workers, int) or n_workers < 1:
        raise FedscoreError(f"n_workers must be a positive integer (got {n_workers!r})")
    if n_workers > len(labels):
        raise FedscoreError(f"{n_workers} workers but only {len(labels)} samples")
    rng = np.random.default_rng(seed)
    parts = SCHEMES[scheme](labels, n_workers, rng, **kw)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def class_histogram(labels, parts, n_classes: int | None = None) -> np.ndarray:
    """(n_workers, n_classes) counts of each class held by each worker."""
    labels = np.asarray(labels)
    n_classes = n_classes or int(labels.max()) + 1
    return np.stack([np.bincount(labels[p], minlength=n_classes) for p in parts])


def plot_partition(labels, parts, path: Path) -> Path:
    """A heat-map PNG of class_histogram, counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = class_histogram(labels, parts)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * hist.shape[1], 1 + 0.4 * hist.shape[0]))
    ax.imshow(hist, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(hist):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                color="white" if v < hist.max() / 2 else "black")
    ax.set_xlabel("class")
    ax.set_ylabel("worker")
    ax.set_title("samples per worker and class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
