"""Kernel Inception Distance (Bińkowski et al. 2018).

The squared MMD between real and fake features under the cubic polynomial kernel

    k(x, y) = (x . y / d + 1)^3,        d = feature dimension,

estimated without bias (the U-statistic: diagonal terms of the within-set kernels dropped)
on `subsets` random subsets of `subset_size` real and fake features, reported as the mean
and (population) standard deviation over subsets, as in the paper and torchmetrics.
Unbiased means it can be slightly negative when the two sets share a distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedscore.errors import FedscoreError
from fedscore.metrics.stats import as_features


def _poly_kernel(x: Tensor, y: Tensor, degree: int, gamma: float, coef: float) -> Tensor:
    return (gamma * (x @ y.T) + coef) ** degree


def mmd2_unbiased(kxx: Tensor, kyy: Tensor, kxy: Tensor) -> Tensor:
    """Unbiased MMD^2 from kernel matrices K_xx (m, m), K_yy (n, n), K_xy (m, n):
    sum_{i!=j} K_xx/(m(m-1)) + sum_{i!=j} K_yy/(n(n-1)) - 2 mean K_xy."""
    m, n = kxx.shape[0], kyy.shape[0]
    xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return xx + yy - 2 * kxy.mean()


def kid(
    real_feats: Tensor,
    fake_feats: Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial-kernel MMD^2 over random subsets.

    real (n1, k), fake (n2, k); subset_size is capped at min(n1, n2) (>= 2 needed);
    gamma defaults to 1/k. Subsets are drawn without replacement with `generator`."""
    real = as_features(real_feats, "real features").to(torch.float64)
    fake = as_features(fake_feats, "fake features").to(torch.float64)
    if real.shape[1] != fake.shape[1]:
        raise FedscoreError(
            f"real and fake features must have the same dimension; got {real.shape[1]} "
            f"and {fake.shape[1]}"
        )
    if subsets < 1:
        raise FedscoreError(f"subsets must be >= 1, got {subsets}")
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise FedscoreError(f"KID needs subsets of at least 2 features each, got {m}")
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(real.shape[0], generator=generator)[:m]]
        y = fake[torch.randperm(fake.shape[0], generator=generator)[:m]]
        values.append(
            mmd2_unbiased(
                _poly_kernel(x, x, degree, gamma, coef),
                _poly_kernel(y, y, degree, gamma, coef),
                _poly_kernel(x, y, degree, gamma, coef),
            )
        )
    v = torch.stack(values)
    return float(v.mean()), float(v.std(correction=0))
