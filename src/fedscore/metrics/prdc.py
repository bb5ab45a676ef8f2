"""Improved precision and recall with k-NN manifolds (Kynkäänniemi et al. 2019).

Each real feature x_i gets a ball of radius r_i = distance to its k-th nearest other real
feature; the union of balls estimates the real manifold (likewise for fake). Then

    precision = fraction of fake samples inside the real manifold   (fidelity)
    recall    = fraction of real samples inside the fake manifold   (diversity),

and, from the same balls, density and coverage (Naeem et al. 2020):

    density  = (1 / (k m)) sum_j #{i : fake_j in B(x_i, r_i)}
    coverage = fraction of real balls B(x_i, r_i) holding at least one fake sample.

Distances are computed in float64 in row blocks, so memory stays O(block * n).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedscore.errors import FedscoreError
from fedscore.metrics.stats import as_features

BLOCK = 1024


def _check(real_feats: Tensor, fake_feats: Tensor, k: int) -> tuple[Tensor, Tensor]:
    real = as_features(real_feats, "real features").to(torch.float64)
    fake = as_features(fake_feats, "fake features").to(torch.float64)
    if real.shape[1] != fake.shape[1]:
        raise FedscoreError(
            f"real and fake features must have the same dimension; got {real.shape[1]} "
            f"and {fake.shape[1]}"
        )
    if not isinstance(k, int) or k < 1:
        raise FedscoreError(f"k must be a positive integer, got {k!r}")
    for name, f in (("real", real), ("fake", fake)):
        if f.shape[0] <= k:
            raise FedscoreError(
                f"k-NN manifolds with k={k} need more than k {name} samples, got {f.shape[0]}"
            )
    return real, fake


def knn_radii(feats: Tensor, k: int) -> Tensor:
    """(n,) distance from each row of feats (n, d) to its k-th nearest other row."""
    radii = []
    for start in range(0, feats.shape[0], BLOCK):
        d = torch.cdist(feats[start : start + BLOCK], feats)
        # the k+1-th smallest includes the point itself at distance 0
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside_counts(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """(n_points,) number of balls B(centre_i, radius_i) containing each point."""
    counts = []
    for start in range(0, points.shape[0], BLOCK):
        d = torch.cdist(points[start : start + BLOCK], centres)
        counts.append((d <= radii).sum(1))
    return torch.cat(counts)


def precision_recall(real_feats: Tensor, fake_feats: Tensor, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of fake (m, d) against real (n, d) with k-NN manifolds."""
    real, fake = _check(real_feats, fake_feats, k)
    precision = (_inside_counts(fake, real, knn_radii(real, k)) > 0).double().mean()
    recall = (_inside_counts(real, fake, knn_radii(fake, k)) > 0).double().mean()
    return float(precision), float(recall)


def density_coverage(real_feats: Tensor, fake_feats: Tensor, k: int = 5) -> tuple[float, float]:
    """(density, coverage) of fake (m, d) against real (n, d) (Naeem et al. 2020)."""
    real, fake = _check(real_feats, fake_feats, k)
    radii = knn_radii(real, k)
    density = _inside_counts(fake, real, radii).double().sum() / (k * fake.shape[0])
    # coverage: real ball i is covered when its nearest fake sample lies inside it
    nearest = torch.cat(
        [
            torch.cdist(real[s : s + BLOCK], fake).min(1).values
            for s in range(0, real.shape[0], BLOCK)
        ]
    )
    coverage = (nearest <= radii).double().mean()
    return float(density), float(coverage)
