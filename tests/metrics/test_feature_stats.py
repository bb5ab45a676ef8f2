"""Mergeable feature statistics: silos share (n, sum f, sum f f^T), never images."""

import pytest
import torch

from fedscore.errors import FedscoreError
from fedscore.metrics import FeatureStats, fid_from_features, fid_from_stats


def _features(seed, n, k=24, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    return (torch.randn(n, k, generator=g) @ mix + shift).float()


def test_merged_silo_statistics_give_the_centralised_fid():
    real = _features(0, 1500, shift=2.0)
    fake = _features(1, 800, shift=2.3)
    silos = [real[:100], real[100:700], real[700:]]  # unequal silos, as workers' partitions
    merged = sum((FeatureStats.from_features(s) for s in silos), FeatureStats.empty(24))
    fake_stats = FeatureStats.from_features(fake[:500]) + FeatureStats.from_features(fake[500:])
    central = fid_from_features(real, fake)
    assert merged.n == 1500
    assert fid_from_stats(merged, fake_stats) == pytest.approx(central, rel=1e-8)


def test_merged_statistics_stay_exact_with_low_rank_features_and_a_large_mean():
    # Features spanning 8 of 32 dimensions around a large mean (like a network's dead or
    # redundant units): raw sums leave ~1e-13 noise in the 24 null directions of the
    # covariance, which the square root in FID must not amplify to ~1e-6.
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 32, generator=g, dtype=torch.float64)
    real = torch.randn(2000, 8, generator=g, dtype=torch.float64) @ w + 10.0
    fake = torch.randn(1000, 8, generator=g, dtype=torch.float64) @ w + 10.2
    merged = FeatureStats.from_features(real[:1234]) + FeatureStats.from_features(real[1234:])
    central = fid_from_features(real, fake)
    assert fid_from_stats(merged, FeatureStats.from_features(fake)) == pytest.approx(
        central, rel=1e-8
    )


def test_mean_and_unbiased_covariance_match_torch():
    x = _features(2, 300, k=5, shift=-1.0).double()
    s = FeatureStats.from_features(x)
    assert torch.allclose(s.mean(), x.mean(0), rtol=1e-12, atol=1e-12)
    assert torch.allclose(s.cov(), torch.cov(x.T, correction=1), rtol=1e-10, atol=1e-12)


def test_merge_is_associative_and_order_free_and_empty_is_its_identity():
    a, b, c = (FeatureStats.from_features(_features(i, 50 + i, k=3)) for i in range(3))
    left, right = (a + b) + c, a + (c + b)
    assert left.n == right.n == 153
    assert torch.allclose(left.sum, right.sum, rtol=1e-12)
    assert torch.allclose(left.outer, right.outer, rtol=1e-12)
    e = FeatureStats.empty(3) + a
    assert e.n == a.n and torch.equal(e.sum, a.sum) and torch.equal(e.outer, a.outer)
    streamed = FeatureStats.empty(3).update(_features(0, 50, k=3)).update(_features(1, 51, k=3))
    assert torch.allclose(streamed.outer, (a + b).outer, rtol=1e-12)


def test_save_and_load_round_trip_exactly(tmp_path):
    s = FeatureStats.from_features(_features(3, 40, k=7))
    s.save(tmp_path / "silo.safetensors")
    back = FeatureStats.load(tmp_path / "silo.safetensors")
    assert back.n == s.n and torch.equal(back.sum, s.sum) and torch.equal(back.outer, s.outer)


def test_loading_something_that_is_not_statistics_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FedscoreError, match="does not exist"):
        FeatureStats.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(FedscoreError, match="cannot read"):
        FeatureStats.load(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(FedscoreError, match="not a fedscore feature-statistics file"):
        FeatureStats.load(tmp_path / "other.safetensors")


def test_statistics_of_different_extractors_do_not_merge():
    with pytest.raises(FedscoreError, match="different feature extractors"):
        FeatureStats.empty(3) + FeatureStats.empty(4)
    with pytest.raises(FedscoreError, match="at least 2"):
        FeatureStats.from_features(torch.zeros(1, 3)).cov()
