"""Fréchet distance between feature distributions (FID, Heusel et al. 2017).

Both feature sets are summarised by a Gaussian N(mu, S) (unbiased covariance) and

    FID = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2}).

tr((S_1 S_2)^{1/2}) is computed by the symmetric eigenvalue method: S_1 S_2 is similar to
the symmetric PSD matrix M = S_1^{1/2} S_2 S_1^{1/2}, so the trace is sum_i sqrt(lambda_i(M)).
`eigh` on a symmetric matrix is stable and exact to rounding, unlike a general `sqrtm` or
`eigvals(S_1 S_2)`, which return spurious complex parts when S is (near) singular. Rounding
leaves the zero eigenvalues of a singular M at +-1e-13 or so; every eigenvalue below
k * eps * lambda_max (negative ones included) is set to 0. Everything runs in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedscore.errors import FedscoreError
from fedscore.metrics.stats import FeatureStats, as_features


def _psd_sqrt(s: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix (negative rounding clamped)."""
    evals, evecs = torch.linalg.eigh(s)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, cov1) and N(mu2, cov2).

    mu: (k,), cov: (k, k) symmetric PSD. Returns a float >= 0 (up to rounding)."""
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    cov1, cov2 = cov1.to(torch.float64), cov2.to(torch.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (*mu1.shape, *mu1.shape):
        raise FedscoreError(
            f"Fréchet distance needs means (k,) and covariances (k, k) of one dimension; got "
            f"{tuple(mu1.shape)}, {tuple(cov1.shape)}, {tuple(mu2.shape)}, {tuple(cov2.shape)}"
        )
    root1 = _psd_sqrt(0.5 * (cov1 + cov1.T))
    m = root1 @ (0.5 * (cov2 + cov2.T)) @ root1
    evals = torch.linalg.eigvalsh(0.5 * (m + m.T))
    # Eigenvalues below the rounding level k * eps * lambda_max are zero in exact arithmetic
    # (dead ReLU features, n < k): their noise, ~1e-13, would add ~3e-7 each under the sqrt.
    tol = evals.shape[0] * torch.finfo(torch.float64).eps * evals.max().clamp_min(0)
    tr_sqrt = torch.where(evals > tol, evals, 0.0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt)


def fid_from_stats(stats_a: FeatureStats, stats_b: FeatureStats) -> float:
    """FID between two sets of mergeable feature statistics (e.g. merged over silos)."""
    if stats_a.dim != stats_b.dim:
        raise FedscoreError(
            f"FID needs features of one dimension; got {stats_a.dim} and {stats_b.dim}"
        )
    return frechet_distance(stats_a.mean(), stats_a.cov(), stats_b.mean(), stats_b.cov())


def fid_from_features(real_feats: Tensor, fake_feats: Tensor) -> float:
    """FID between two feature sets, real (n1, k) and fake (n2, k), n1, n2 >= 2."""
    real = as_features(real_feats, "real features")
    fake = as_features(fake_feats, "fake features")
    if real.shape[1] != fake.shape[1]:
        raise FedscoreError(
            f"real and fake features must have the same dimension; got {real.shape[1]} "
            f"and {fake.shape[1]}"
        )
    for name, f in (("real", real), ("fake", fake)):
        if f.shape[0] < 2:
            raise FedscoreError(f"FID needs at least 2 {name} feature vectors, got {f.shape[0]}")
    # Centred two-pass covariance: more accurate than the raw sums when features have a
    # large mean; the merged-statistics path (fid_from_stats) agrees to ~1e-10 relative.
    (mu_r, cov_r), (mu_f, cov_f) = _gaussian(real), _gaussian(fake)
    return frechet_distance(mu_r, cov_r, mu_f, cov_f)


def _gaussian(feats: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (k,) and unbiased covariance (k, k) in float64."""
    f = feats.to(torch.float64)
    mu = f.mean(0)
    c = f - mu
    return mu, (c.T @ c) / (f.shape[0] - 1)
