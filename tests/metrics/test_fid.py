"""FID: the Fréchet distance of Gaussians fitted to features (float64, symmetric eigh)."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from fedscore.errors import FedscoreError
from fedscore.metrics import fid_from_features, frechet_distance


def _gaussian(n, mean, cov_root, g):
    z = torch.randn(n, mean.shape[0], generator=g, dtype=torch.float64)
    return mean + z @ cov_root.T


def _random_spd(d, g, scale=1.0):
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return scale * (a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64))


def test_fid_of_a_set_with_itself_is_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 32, generator=g) * 3 + 5
    assert abs(fid_from_features(x, x)) < 1e-9 * float(x.var(0).sum())


def test_fid_is_zero_for_the_same_set_even_with_singular_covariance():
    # n < k: the covariance has rank n - 1; the eigenvalue method must not return
    # negative or complex garbage, and the rounding noise on the 45 null eigenvalues of
    # S^{1/2} S S^{1/2} must not survive the square root (it would add ~1e-7 each).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 64, generator=g, dtype=torch.float64)
    assert abs(fid_from_features(x, x)) < 1e-10 * float(x.var(0).sum())
    y = torch.randn(20, 64, generator=g, dtype=torch.float64) + 0.5
    value = fid_from_features(x, y)
    assert math.isfinite(value) and value > 0


def test_frechet_distance_matches_scipy_sqrtm_closed_form():
    g = torch.Generator().manual_seed(2)
    d = 6
    mu1 = torch.randn(d, generator=g, dtype=torch.float64)
    mu2 = torch.randn(d, generator=g, dtype=torch.float64)
    s1, s2 = _random_spd(d, g), _random_spd(d, g, scale=2.0)
    # independent reference: the matrix square root of the non-symmetric product S1 S2
    root = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy())
    ref = float(
        ((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * np.trace(root).real
    )
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-9)  # symmetric


def test_fid_of_two_gaussians_samples_matches_the_closed_form():
    # Diagonal covariances commute: tr sqrt(S1 S2) = sum_i sqrt(a_i b_i), a hand formula.
    g = torch.Generator().manual_seed(3)
    d, n = 4, 200_000
    mu1 = torch.zeros(d, dtype=torch.float64)
    mu2 = torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64)
    a = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    b = torch.tensor([2.0, 1.0, 0.5, 3.0], dtype=torch.float64)
    exact = float((mu1 - mu2).square().sum() + (a + b - 2 * (a * b).sqrt()).sum())
    x = _gaussian(n, mu1, torch.diag(a.sqrt()), g)
    y = _gaussian(n, mu2, torch.diag(b.sqrt()), g)
    # sampling error of the estimate: std ~0.02 over seeds at this n, so 0.1 is 5 sigma;
    # a missing factor 2 on the cross term would be off by ~5.
    assert fid_from_features(x, y) == pytest.approx(exact, abs=0.1)
    # and a rotated copy of both sets: FID depends only on the two distributions
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    assert fid_from_features(x @ q, y @ q) == pytest.approx(fid_from_features(x, y), rel=1e-9)


def test_fid_uses_the_unbiased_covariance():
    # Two points per set: mean 0.5 (both), unbiased variances 0.5 and 2 (biased: 0.25, 1).
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[-0.5], [1.5]])
    exact = 0.5 + 2.0 - 2 * math.sqrt(0.5 * 2.0)
    assert fid_from_features(x, y) == pytest.approx(exact, rel=1e-12)


def test_fid_equals_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        """A custom torchmetrics feature module: the 'images' already are the features."""

        def __init__(self, k):
            super().__init__()
            self.num_features = k

        def forward(self, x):
            return x

    g = torch.Generator().manual_seed(4)
    k = 16
    real = torch.randn(600, k, generator=g, dtype=torch.float64) @ _random_spd(k, g)
    fake = 0.8 * torch.randn(400, k, generator=g, dtype=torch.float64) + 0.3
    metric = FrechetInceptionDistance(feature=Identity(k), normalize=False)
    metric.update(real[:300], real=True)  # several updates: torchmetrics also sums
    metric.update(real[300:], real=True)
    metric.update(fake, real=False)
    theirs = float(metric.compute())
    assert fid_from_features(real, fake) == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize(
    "real, fake, match",
    [
        (torch.zeros(10), torch.zeros(10, 1), "shape"),
        (torch.zeros(10, 3), torch.zeros(10, 4), "same dimension"),
        (torch.zeros(1, 3), torch.zeros(10, 3), "at least 2"),
        (torch.full((10, 3), float("nan")), torch.zeros(10, 3), "NaN"),
    ],
)
def test_fid_rejects_bad_features_with_a_clear_message(real, fake, match):
    with pytest.raises(FedscoreError, match=match):
        fid_from_features(real, fake)
