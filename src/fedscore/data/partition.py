"""Worker partitions (issue 3; SPEC §2 and FI §4.1): one disjoint index set per worker.

`partition(labels, scheme, n_workers, seed, **kw)` returns a list of sorted int64 index
arrays, one per worker. Schemes are plain functions in SCHEMES:

- "iid": a seeded shuffle cut into n_workers near-equal slices (sizes differ by <= 1);
- "dirichlet" (alpha=0.5): per class, proportions p_c ~ Dir(alpha 1_N) over the workers
  (Hsu et al. 2019); small alpha -> each class concentrated on few workers;
- "shards" (classes_per_worker=c): the pathological split of McMahan et al. 2017, made exact:
  every worker holds exactly c distinct classes, every class is held by floor or ceil of
  N c / K workers, which share its samples evenly;
- "homogeneous": FI §4.1 HOMOGENEOUS — every worker holds floor or ceil of n_c / N of every
  class c (10% of every digit for 10 workers);
- "dominant": FI §4.1 HETEROGENEOUS — every worker holds m samples, exactly m/2 of class
  j mod K and the rest evenly (to within 1) over the other K - 1 classes (see `_dominant`);
- "all": FI §4.1 CONTROL — one worker holds everything;
- "natural" (groups=...): the silos the data give, one per worker (`data.groups`).

Why not flwr-datasets' partitioners: they partition Hugging Face `datasets.Dataset` objects
(pulling in `datasets`/pyarrow, absent here), they have no exact homogeneous or
dominant-class schemes (the FI paper's regimes), and their Dirichlet partitioner's
resampling rule differs from run to run of its versions. The schemes are ~20 lines each
of numpy on the label vector, exactly specified, and tested for the properties we rely on.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np

from fedscore.errors import FedscoreError, unknown

# A scheme: scheme(labels (n,) int, n_workers, rng, **options) -> list of index arrays.
Scheme = Callable[..., list[np.ndarray]]


def _split_sizes(idx: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    return np.split(idx, np.cumsum(sizes)[:-1])


def _iid(labels: np.ndarray, n_workers: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(len(labels)), n_workers)


def _dirichlet(
    labels: np.ndarray,
    n_workers: int,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Per class c: p_c ~ Dir(alpha, ..., alpha) over workers; the shuffled samples of c are
    cut at round(cumsum(p_c) n_c). Redrawn (same rng stream, so still reproducible) until
    every worker holds >= min_size samples, at most max_tries times."""
    if not np.isfinite(alpha) or alpha <= 0:
        raise FedscoreError(f"dirichlet: alpha must be a positive number, got {alpha}")
    classes = np.unique(labels)
    for _ in range(max_tries):
        chunks: list[list[np.ndarray]] = [[] for _ in range(n_workers)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(n_workers, float(alpha)))
            cuts = np.clip(np.round(np.cumsum(p)[:-1] * len(idx)).astype(np.int64), 0, len(idx))
            for w, piece in enumerate(np.split(idx, cuts)):
                chunks[w].append(piece)
        parts = [np.concatenate(ch) for ch in chunks]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise FedscoreError(
        f"dirichlet: after {max_tries} draws some worker still held fewer than min_size="
        f"{min_size} samples (alpha={alpha}, {n_workers} workers, {len(labels)} samples); "
        f"raise alpha, use fewer workers, or pass min_size=0 to allow empty workers"
    )


def _shards(
    labels: np.ndarray, n_workers: int, rng: np.random.Generator, *, classes_per_worker: int = 2
) -> list[np.ndarray]:
    """Worker j holds classes perm[(j c + i) mod K], i < c (perm a seeded permutation of
    the K classes): c distinct classes each, every class held by floor/ceil(N c / K) workers.
    A class's shuffled samples are cut into near-equal shards, one per holder."""
    classes = np.unique(labels)
    k, c = len(classes), int(classes_per_worker)
    if not 1 <= c <= k:
        raise FedscoreError(
            f"shards: classes_per_worker must be between 1 and the number of classes ({k}), "
            f"got {classes_per_worker}"
        )
    if n_workers * c < k:
        raise FedscoreError(
            f"shards: {n_workers} workers x {c} classes each cannot hold all {k} classes; "
            f"use classes_per_worker >= {-(-k // n_workers)} or more workers"
        )
    perm = rng.permutation(k)
    holders: list[list[int]] = [[] for _ in range(k)]
    for j in range(n_workers):
        for i in range(c):
            holders[perm[(j * c + i) % k]].append(j)
    chunks: list[list[np.ndarray]] = [[] for _ in range(n_workers)]
    for ci, cls in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        if len(idx) < len(holders[ci]):
            raise FedscoreError(
                f"shards: class {cls} has {len(idx)} samples for {len(holders[ci])} workers "
                f"that should hold it; use fewer workers or fewer classes per worker"
            )
        for j, piece in zip(holders[ci], np.array_split(idx, len(holders[ci]))):
            chunks[j].append(piece)
    return [np.concatenate(ch) for ch in chunks]


def _homogeneous(labels: np.ndarray, n_workers: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Class c's n_c shuffled samples: floor(n_c / N) to every worker, and the n_c mod N
    left over go one each to the next workers in a cycle that runs on across classes, so
    worker sizes also differ by at most 1."""
    chunks: list[list[np.ndarray]] = [[] for _ in range(n_workers)]
    offset = 0
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        q, r = divmod(len(idx), n_workers)
        sizes = np.full(n_workers, q)
        sizes[(offset + np.arange(r)) % n_workers] += 1
        offset = (offset + r) % n_workers
        for j, piece in enumerate(_split_sizes(idx, sizes)):
            chunks[j].append(piece)
    return [np.concatenate(ch) for ch in chunks]


def _dominant_extras(m: int, dom: np.ndarray, counts: np.ndarray) -> np.ndarray | None:
    """For workers of size m (even): the (N, K) 0/1 matrix of which non-dominant classes give
    worker j one sample above q = floor((m/2) / (K - 1)), each worker e = (m/2) mod (K - 1)
    of them, within what every class can supply; None if impossible. A bipartite
    degree-constrained assignment, solved exactly as a max-flow problem."""
    n, k = len(dom), len(counts)
    a = m // 2
    q, e = divmod(a, k - 1)
    h = np.bincount(dom, minlength=k)
    cap = counts - a * h - q * (n - h)  # what class c has left after the floors
    if (cap < 0).any() or cap.sum() < n * e:
        return None
    if e == 0:
        return np.zeros((n, k), dtype=np.int64)
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_flow

    # nodes: 0 source, 1..n workers, n+1..n+k classes, n+k+1 sink
    src, dst, w = [0] * n, list(range(1, n + 1)), [e] * n
    for j in range(n):
        for c in range(k):
            if c != dom[j]:
                src.append(1 + j)
                dst.append(1 + n + c)
                w.append(1)
    src += [1 + n + c for c in range(k)]
    dst += [1 + n + k] * k
    w += [int(min(cap[c], n)) for c in range(k)]
    size = n + k + 2
    graph = csr_array((np.array(w, dtype=np.int32), (src, dst)), shape=(size, size))
    flow = maximum_flow(graph, 0, size - 1)
    if flow.flow_value < n * e:
        return None
    return flow.flow.toarray()[1 : n + 1, n + 1 : n + k + 1].clip(min=0).astype(np.int64)


def _dominant(labels: np.ndarray, n_workers: int, rng: np.random.Generator) -> list[np.ndarray]:
    """FI §4.1 heterogeneous regime: worker j holds 50% class j, 50% evenly the others.

    Worker j's dominant class is the (j mod K)-th smallest label (worker j <-> digit j).
    Every worker gets the same number m of samples, m even: exactly m/2 of its dominant
    class, and of each of the K - 1 other classes q = floor((m/2) / (K - 1)) or q + 1
    (e = (m/2) mod (K - 1) of them get q + 1; which ones is chosen so that every class can
    supply its share). m is the largest even size for which this is possible, scanned down
    from 2 floor(n / 2N); with balanced classes (n_c = n / K, N = K) it uses all the data.
    Samples beyond N m are left out; which ones is drawn by the seed."""
    classes = np.unique(labels)
    k = len(classes)
    if k < 2:
        raise FedscoreError("dominant: the labels need at least 2 classes")
    dom = np.arange(n_workers) % k
    counts = np.array([np.sum(labels == cls) for cls in classes])
    for m in range(len(labels) // n_workers // 2 * 2, 0, -2):
        extras = _dominant_extras(m, dom, counts)
        if extras is not None:
            break
    else:
        raise FedscoreError(
            f"dominant: too few samples for {n_workers} workers over {k} classes (class counts "
            f"{counts.tolist()}): use fewer workers or more data"
        )
    take = np.where(dom[:, None] == np.arange(k), m // 2, (m // 2) // (k - 1) + extras)
    chunks: list[list[np.ndarray]] = [[] for _ in range(n_workers)]
    for ci, cls in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        sizes = take[:, ci]
        for j, piece in enumerate(_split_sizes(idx[: sizes.sum()], sizes)):
            chunks[j].append(piece)
    return [np.concatenate(ch) for ch in chunks]


def _all(labels: np.ndarray, n_workers: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.arange(len(labels))]


def _natural(labels: np.ndarray, n_workers: int, rng: np.random.Generator, *,
             groups=None) -> list[np.ndarray]:
    """The silos the data give (issue 18, the real-silo case): worker j holds every sample
    of the j-th silo, silos in sorted order of their id (`fedscore.data.groups`: a folder
    level or an .npz `group` array). Nothing is drawn."""
    if groups is None:
        raise FedscoreError(
            "partition scheme 'natural' takes the silos from the data, and these data give "
            "none: use an image folder DIR/<silo>/<class>/<image> (or DIR/<silo>/<image>) or "
            "an .npz with a `group` array (one silo per image), or another scheme")
    g = np.asarray(groups)
    if g.shape != labels.shape:
        raise FedscoreError(f"natural: groups has shape {g.shape}, labels {labels.shape}; "
                            "one silo per sample")
    silos = np.unique(g)
    if len(silos) != n_workers:
        raise FedscoreError(
            f"partition scheme 'natural': the data give {len(silos)} silos but the run has "
            f"{n_workers} workers; set federation.workers: {len(silos)}")
    return [np.flatnonzero(g == s) for s in silos]


SCHEMES: dict[str, Scheme] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "shards": _shards,
    "homogeneous": _homogeneous,
    "dominant": _dominant,
    "all": _all,
    "natural": _natural,
}
"""Plug-in point: name -> scheme(labels, n_workers, rng, **options) -> list of index arrays."""


def _as_labels(labels) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise FedscoreError(
            f"labels must be a 1-D array of integers, got shape {y.shape} dtype {y.dtype}"
        )
    if len(y) == 0:
        raise FedscoreError("labels is empty: there is nothing to partition")
    return y.astype(np.int64, copy=False)


def partition(
    labels, scheme: str, n_workers: int | None = None, seed: int = 0, **options
) -> list[np.ndarray]:
    """Split sample indices among workers: list of n_workers sorted int64 index arrays,
    pairwise disjoint.

    labels: (n,) integer class labels (numpy or torch). scheme: a key of SCHEMES; options
    are the scheme's keyword arguments (dirichlet: alpha, min_size; shards:
    classes_per_worker; natural: groups, the (n,) silo of each sample). n_workers defaults
    to 10, and to 1 for "all", which takes no other value (one worker holds everything:
    asking for more is an error, not a silent change).
    The same (labels, scheme, n_workers, seed, options) always gives the same partition.
    """
    if scheme not in SCHEMES:
        raise unknown("partition scheme", scheme, SCHEMES)
    y = _as_labels(labels)
    if n_workers is None:
        n_workers = 1 if scheme == "all" else 10
    if not isinstance(n_workers, int | np.integer) or n_workers < 1:
        raise FedscoreError(f"n_workers must be a positive integer, got {n_workers!r}")
    if scheme == "all" and n_workers != 1:
        raise FedscoreError(
            f"partition scheme 'all' gives all data to one worker; n_workers must be 1, got "
            f"{n_workers} (set the number of workers to 1, or choose another scheme)"
        )
    if n_workers > len(y):
        raise FedscoreError(f"n_workers={n_workers} is more than the {len(y)} samples")
    fn = SCHEMES[scheme]
    allowed = [
        p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    extra = sorted(set(options) - set(allowed))
    if extra:
        raise FedscoreError(
            f"partition scheme {scheme!r} takes no option {', '.join(map(repr, extra))}; "
            f"its options: {', '.join(allowed) or 'none'}"
        )
    rng = np.random.default_rng(seed)
    return [np.sort(p).astype(np.int64) for p in fn(y, int(n_workers), rng, **options)]


def class_histogram(labels, parts, n_classes: int | None = None) -> np.ndarray:
    """(n_workers, n_classes) int64: counts[j, c] = #{i in parts[j] : labels[i] = c}.
    n_classes defaults to max(labels) + 1."""
    y = _as_labels(labels)
    if n_classes is None:
        n_classes = int(y.max()) + 1
    if y.min() < 0 or y.max() >= n_classes:
        raise FedscoreError(f"labels must lie in [0, {n_classes}) for n_classes={n_classes}")
    return np.stack(
        [np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=n_classes) for p in parts]
    ).astype(np.int64)
