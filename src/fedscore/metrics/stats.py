"""Mergeable feature statistics: federated evaluation without sharing images.

A silo summarises its features f_1..f_n as the sums (n, sum_i f_i, sum_i f_i f_i^T) in
float64 (EDM's FID statistics, fedjax's mergeable `Stat`s). Sums add exactly, so the
statistics of the union of silos' data are the sum of the silos' statistics, and

    mean = (1/n) sum_i f_i,      cov = (sum_i f_i f_i^T - n mean mean^T) / (n - 1)

(the unbiased covariance) of the union follow without any silo sending a feature vector.
Never average per-silo FIDs: FID is not linear in the data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from fedscore.errors import FedscoreError

FORMAT = "fedscore-feature-stats-v1"


@dataclass(frozen=True)
class FeatureStats:
    """n feature vectors of dimension k summarised as n, sum f (k,), sum f f^T (k, k)."""

    n: int
    sum: Tensor  # (k,) float64
    outer: Tensor  # (k, k) float64

    def __post_init__(self) -> None:
        if self.sum.ndim != 1 or self.outer.shape != (self.dim, self.dim):
            raise FedscoreError(
                f"feature statistics need sum (k,) and outer (k, k); got "
                f"{tuple(self.sum.shape)} and {tuple(self.outer.shape)}"
            )
        if self.n < 0:
            raise FedscoreError(f"feature statistics: n must be >= 0, got {self.n}")

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        """The statistics of no data: the identity of `merge`."""
        z = torch.zeros(dim, dtype=torch.float64)
        return cls(0, z, torch.zeros(dim, dim, dtype=torch.float64))

    @classmethod
    def from_features(cls, feats: Tensor) -> FeatureStats:
        """Statistics of features (n, k), accumulated in float64."""
        feats = as_features(feats, "features")
        f = feats.detach().to(torch.float64)
        return cls(f.shape[0], f.sum(0), f.T @ f)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """The statistics of the union of both data sets: the sums add."""
        if not isinstance(other, FeatureStats):
            return NotImplemented
        if other.dim != self.dim:
            raise FedscoreError(
                f"cannot merge feature statistics of dimension {self.dim} and {other.dim}: "
                f"they come from different feature extractors"
            )
        return FeatureStats(self.n + other.n, self.sum + other.sum, self.outer + other.outer)

    __add__ = merge

    def update(self, feats: Tensor) -> FeatureStats:
        """These statistics plus those of another batch of features (n, k)."""
        return self.merge(FeatureStats.from_features(feats))

    def mean(self) -> Tensor:
        """(k,) float64 mean of the features."""
        if self.n < 1:
            raise FedscoreError("feature statistics of no data have no mean")
        return self.sum / self.n

    def cov(self) -> Tensor:
        """(k, k) float64 unbiased covariance (sum f f^T - n mu mu^T) / (n - 1)."""
        if self.n < 2:
            raise FedscoreError(f"a covariance needs at least 2 feature vectors, got n={self.n}")
        mu = self.mean()
        c = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return 0.5 * (c + c.T)  # symmetric to the last bit, for eigh downstream

    def save(self, path: str | os.PathLike) -> None:
        """Write as safetensors (tensors n, sum, outer; format tag in the metadata)."""
        tensors = {
            "n": torch.tensor([self.n], dtype=torch.int64),
            "sum": self.sum.contiguous(),
            "outer": self.outer.contiguous(),
        }
        save_file(tensors, str(path), metadata={"format": FORMAT})

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read statistics written by `save`; a file that is not one is a FedscoreError."""
        path = Path(path)
        if not path.is_file():
            raise FedscoreError(f"feature statistics file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                keys = set(fh.keys())
                if meta.get("format") != FORMAT or keys != {"n", "sum", "outer"}:
                    raise FedscoreError(
                        f"{str(path)!r} is not a fedscore feature-statistics file "
                        f"(format {meta.get('format')!r}, tensors {sorted(keys)})"
                    )
                n, s, o = (fh.get_tensor(k) for k in ("n", "sum", "outer"))
        except FedscoreError:
            raise
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise FedscoreError(
                f"cannot read feature statistics from {str(path)!r}: {err}"
            ) from None
        return cls(int(n[0]), s.to(torch.float64), o.to(torch.float64))


def as_features(feats: Tensor, name: str) -> Tensor:
    """Validate a feature matrix (n, k): 2-D, non-empty, finite."""
    feats = torch.as_tensor(feats)
    if feats.ndim != 2:
        raise FedscoreError(f"{name} must have shape (n, k), got {tuple(feats.shape)}")
    if feats.shape[1] == 0:
        raise FedscoreError(f"{name} has no feature dimensions (shape {tuple(feats.shape)})")
    if not torch.isfinite(feats).all():
        raise FedscoreError(f"{name} contains NaN or infinite values")
    return feats
