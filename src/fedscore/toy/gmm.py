"""Gaussian mixtures in R^d with exact OU-noised densities and scores (SPEC §1).

Under dX = -X dt + sqrt(2) dB a mixture sum_j pi_j N(mu_j, S_j) stays a mixture:

    q_t = sum_j pi_j N(e^{-t} mu_j, e^{-2t} S_j + sigma_t^2 I),   sigma_t^2 = 1 - e^{-2t},

so log q_t(x), grad log q_t(x) and the responsibilities are exact at every forward time t.
This is the ground truth that samplers, losses, aggregators and estimators are tested on.
Everything is computed in float64 (Cholesky + logsumexp) and returned in x's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fedscore.errors import FedscoreError, unknown


class GaussianMixture:
    """sum_j pi_j N(mu_j, S_j): weights (k,), means (k, d), covs (k, d, d)."""

    def __init__(self, weights, means, covs):
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        cov = torch.as_tensor(covs, dtype=torch.float64)
        if mu.ndim != 2:
            raise FedscoreError(f"means must have shape (k, d), got {tuple(mu.shape)}")
        k, d = mu.shape
        if w.shape != (k,) or cov.shape != (k, d, d):
            raise FedscoreError(
                f"weights (k,), means (k, d), covs (k, d, d) must agree; got "
                f"{tuple(w.shape)}, {tuple(mu.shape)}, {tuple(cov.shape)}"
            )
        if (w < 0).any() or not math.isclose(float(w.sum()), 1.0, rel_tol=1e-6):
            raise FedscoreError(f"weights must be non-negative and sum to 1 (sum={float(w.sum())})")
        try:
            torch.linalg.cholesky(cov)
        except RuntimeError as err:
            raise FedscoreError("every covariance must be symmetric positive definite") from err
        self.weights, self.means, self.covs = w / w.sum(), mu, cov

    @classmethod
    def isotropic(cls, weights, means, std) -> GaussianMixture:
        """Components N(mu_j, std_j^2 I); `std` a float or (k,)."""
        mu = torch.as_tensor(means, dtype=torch.float64)
        k, d = mu.shape
        s = torch.as_tensor(std, dtype=torch.float64).expand(k)
        return cls(weights, mu, s[:, None, None] ** 2 * torch.eye(d, dtype=torch.float64))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def components(self, idx: Sequence[int]) -> GaussianMixture:
        """The sub-mixture of components `idx`, weights renormalised: one "client"'s data."""
        idx = torch.as_tensor(list(idx), dtype=torch.long)
        w = self.weights[idx]
        return GaussianMixture(w / w.sum(), self.means[idx], self.covs[idx])

    def sample(
        self, n: int, generator: torch.Generator | None = None, return_labels: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """n draws from the data distribution (t = 0), float32 (n, d) [, component (n,)]."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs)[comp]
        x = (self.means[comp] + (chol @ z[:, :, None])[:, :, 0]).float()
        return (x, comp) if return_labels else x

    def _noised(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Means (..., k, d) and Cholesky factors (..., k, d, d) of q_t for t of shape (...)."""
        a = torch.exp(-t)[..., None, None]
        s2 = (-torch.expm1(-2.0 * t))[..., None, None, None]
        eye = torch.eye(self.dim, dtype=torch.float64)
        cov = a[..., None] ** 2 * self.covs + s2 * eye
        return a * self.means, torch.linalg.cholesky(cov)

    def _terms(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        """log(pi_j N_j(x)) (n, k) and the per-component scores (n, k, d) at time t."""
        x64 = x.to(torch.float64)
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.ndim == 1 and bool((t == t[0]).all()):
            t = t[0]  # one shared time: one Cholesky per component instead of one per sample
        mean, chol = self._noised(t)  # (k, d), (k, d, d)  or (n, k, d), (n, k, d, d)
        diff = x64[:, None, :] - mean  # (n, k, d)
        if chol.ndim == 3:
            chol = chol.expand(x64.shape[0], *chol.shape)
        white = torch.linalg.solve_triangular(chol, diff[..., None], upper=False)[..., 0]
        logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        logn = -0.5 * (white**2).sum(-1) - logdet - 0.5 * self.dim * math.log(2 * math.pi)
        # score of component j: -Sigma_j^{-1} (x - m_j) = -L^{-T} L^{-1} (x - m_j)
        comp_scores = -torch.linalg.solve_triangular(
            chol.transpose(-1, -2), white[..., None], upper=True
        )[..., 0]
        return torch.log(self.weights) + logn, comp_scores

    def log_prob(self, x: Tensor, t: float | Tensor = 0.0) -> Tensor:
        """Exact log q_t(x), (n,), for x (n, d) and forward time t (float or (n,))."""
        logp, _ = self._terms(x, t)
        return torch.logsumexp(logp, -1).to(x.dtype)

    def responsibilities(self, x: Tensor, t: float | Tensor = 0.0) -> Tensor:
        """P(component j | x_t = x), (n, k)."""
        logp, _ = self._terms(x, t)
        return torch.softmax(logp, -1).to(x.dtype)

    def score(self, x: Tensor, t: float | Tensor = 0.0) -> Tensor:
        """Exact grad log q_t(x) = sum_j r_j(x) * (-Sigma_j(t)^{-1} (x - e^{-t} mu_j)), (n, d)."""
        logp, comp_scores = self._terms(x, t)
        r = torch.softmax(logp, -1)
        return (r[..., None] * comp_scores).sum(-2).to(x.dtype)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """A GaussianMixture is a score function: gm(x, t) == gm.score(x, t)."""
        return self.score(x, t)

    def __repr__(self) -> str:
        return f"GaussianMixture(k={self.n_components}, d={self.dim})"


def _ring8() -> GaussianMixture:
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = 3.0 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    return GaussianMixture.isotropic(torch.full((8,), 1 / 8), means, 0.25)


def _two_clients() -> GaussianMixture:
    # Client 0 holds components 0-1 (left, weight 0.6), client 1 components 2-3 (right, 0.4):
    # disjoint supports, unequal sizes, so the mixture weights matter for federated inference.
    means = [[-3.0, 1.5], [-3.0, -1.5], [3.0, 1.5], [3.0, -1.5]]
    return GaussianMixture.isotropic([0.3, 0.3, 0.2, 0.2], means, 0.4)


def _gmm16() -> GaussianMixture:
    g = torch.Generator().manual_seed(16)
    k, d = 5, 16
    means = 2.0 * torch.randn(k, d, generator=g, dtype=torch.float64)
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    covs = 0.3 * (a @ a.transpose(-1, -2)) + 0.05 * torch.eye(d, dtype=torch.float64)
    w = torch.softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
    return GaussianMixture(w, means, covs)


PRESETS = {"ring8": _ring8, "two-clients": _two_clients, "gmm16": _gmm16}

# Which components each "client" of a preset holds (federated toys split by component).
CLIENTS = {"two-clients": [[0, 1], [2, 3]]}


def preset(name: str) -> GaussianMixture:
    """A named mixture: "ring8" (8 modes on a circle of radius 3, std 0.25), "two-clients"
    (2-D, two clients with disjoint modes, weights 0.6 / 0.4), "gmm16" (16-D, 5 full-covariance
    components)."""
    if name not in PRESETS:
        raise unknown("Gaussian-mixture preset", name, PRESETS)
    return PRESETS[name]()
