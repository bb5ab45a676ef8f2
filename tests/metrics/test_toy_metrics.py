"""Exact metrics on Gaussian-mixture toys rank exact < slightly wrong < very wrong samples."""

import math

import pytest
import torch

from fedscore import diffusion, toy
from fedscore.errors import FedscoreError
from fedscore.metrics import (
    component_frequency_error,
    kl_estimate,
    mmd2_rbf,
    score_error,
    sliced_wasserstein,
)


def _variants(name):
    """(exact, slightly wrong: every covariance x2, very wrong: every mean shifted by 1)."""
    gm = toy.preset(name)
    slight = toy.GaussianMixture(gm.weights, gm.means, gm.covs * 2.0)
    shifted = toy.GaussianMixture(gm.weights, gm.means + 1.0, gm.covs)
    return gm, slight, shifted


def _samples(models, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [m.sample(n, generator=g) for m in models]


def test_kl_estimate_ranks_exact_below_wider_below_shifted():
    gm, slight, shifted = _variants("ring8")
    exact, wide, far = (kl_estimate(x, gm) for x in _samples((gm, slight, shifted), 3000, 0))
    # well-separated modes: KL(wider || exact) ~ per-component Gaussian KL
    # 2 dims * 0.5 (2 - 1 - ln 2) = 0.307; the k-NN entropy is good to ~0.05 here
    assert abs(exact) < 0.07
    assert wide == pytest.approx(2 * 0.5 * (2 - 1 - math.log(2)), abs=0.07)
    assert exact < wide < far


def test_kl_estimate_matches_the_closed_form_for_one_gaussian():
    # q_hat = N(0, 1.5^2 I_3) samples against p = N(0, I_3): KL = 1.5 * (2.25 - 1 - ln 2.25)
    p = toy.GaussianMixture([1.0], torch.zeros(1, 3), torch.eye(3)[None])
    q = toy.GaussianMixture([1.0], torch.zeros(1, 3), 2.25 * torch.eye(3)[None])
    x = q.sample(4000, generator=torch.Generator().manual_seed(1))
    exact = 1.5 * (2.25 - 1 - math.log(2.25))
    assert kl_estimate(x, p) == pytest.approx(exact, abs=0.05)


def test_mmd_ranks_exact_below_wider_below_shifted():
    gm, slight, shifted = _variants("ring8")
    ref, exact, wide, far = _samples((gm, gm, slight, shifted), 1500, 2)
    # the median heuristic (h ~ 4) sees the shift; the modes' width needs h near 0.25
    values = [mmd2_rbf(ref, x, bandwidth=0.5) for x in (exact, wide, far)]
    assert values[0] < values[1] < values[2]
    assert mmd2_rbf(ref, exact) < mmd2_rbf(ref, far) / 10


def test_mmd_of_a_hand_computed_pair():
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]])
    e = math.exp
    kxy_mean = (1 + e(-2) + 2 * e(-0.5)) / 4
    assert mmd2_rbf(x, y, bandwidth=1.0) == pytest.approx(e(-0.5) + e(-2) - 2 * kxy_mean)
    # a list of bandwidths sums the kernels, so MMD^2 adds up
    both = mmd2_rbf(x, y, bandwidth=[1.0, 2.0])
    assert both == pytest.approx(mmd2_rbf(x, y, bandwidth=1.0) + mmd2_rbf(x, y, bandwidth=2.0))


def test_sliced_wasserstein_ranks_exact_below_wider_below_shifted():
    gm, slight, shifted = _variants("gmm16")
    ref, exact, wide, far = _samples((gm, gm, slight, shifted), 2000, 3)
    values = [
        sliced_wasserstein(ref, x, generator=torch.Generator().manual_seed(0))
        for x in (exact, wide, far)
    ]
    assert values[0] < values[1] < values[2]
    # shifting every coordinate by 1 moves each unit direction theta by theta.1: SW_2 ~ 1
    assert values[2] == pytest.approx(1.0, abs=0.15)


def test_sliced_wasserstein_is_exact_in_one_dimension():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 1, generator=g, dtype=torch.float64)
    assert sliced_wasserstein(x, x + 0.7, n_proj=4, generator=g) == pytest.approx(0.7, rel=1e-9)
    # unequal sizes: quantile functions of {0, 1} and {0, .5, 1} differ by .5 on 1/3 of (0, 1)
    a, b = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [0.5], [1.0]])
    assert sliced_wasserstein(a, b, n_proj=3, generator=g) == pytest.approx(math.sqrt(1 / 12))


def test_component_frequency_error_ranks_exact_below_reweighted_below_dropped_modes():
    gm = toy.preset("ring8")
    tilt = gm.weights * torch.linspace(0.8, 1.2, 8, dtype=torch.float64)
    reweighted = toy.GaussianMixture(tilt / tilt.sum(), gm.means, gm.covs)  # TV 0.05
    dropped = gm.components([0, 1, 2, 3, 4, 5])  # two of eight modes lost
    errs = [
        component_frequency_error(x, gm)[0] for x in _samples((gm, reweighted, dropped), 4000, 5)
    ]
    assert errs[0] < errs[1] < errs[2]
    assert errs[2] == pytest.approx(0.25, abs=0.03)  # TV of dropping 2/8 of the mass


def test_component_frequencies_of_points_at_the_means_are_their_counts():
    gm = toy.preset("ring8")
    x = gm.means[[0, 0, 1, 7]].float()
    tv, freqs = component_frequency_error(x, gm)
    expected = torch.tensor([0.5, 0.25, 0, 0, 0, 0, 0, 0.25], dtype=torch.float64)
    assert torch.allclose(freqs, expected)
    assert tv == pytest.approx(0.5 * float((expected - 1 / 8).abs().sum()))


def test_score_error_is_zero_for_the_exact_score_and_grows_with_the_error():
    gm, slight, shifted = _variants("two-clients")
    times = diffusion.time_grid("exponential", steps=20, T=3.0, delta=1e-2)

    def err(fn):
        return score_error(fn, gm, times, n=500, generator=torch.Generator().manual_seed(6))

    assert err(gm.score) == 0.0
    assert 0 < err(slight.score) < err(shifted.score)


def test_score_error_matches_the_closed_form_for_a_scaled_gaussian_score():
    # data N(0, I_2) is stationary under OU: q_t = N(0, I), score -x. For s(x) = -0.5 x the
    # error at every time is E||0.5 x||^2 = 0.25 * 2, and the gammas sum to T - delta.
    gm = toy.GaussianMixture([1.0], torch.zeros(1, 2), torch.eye(2)[None])
    times = diffusion.time_grid("uniform", steps=10, T=2.0, delta=0.1)
    value = score_error(
        lambda x, t: -0.5 * x, gm, times, n=20_000, generator=torch.Generator().manual_seed(7)
    )
    assert value == pytest.approx(0.5 * (2.0 - 0.1), rel=0.03)


def test_toy_metrics_reject_bad_input():
    gm = toy.preset("ring8")
    with pytest.raises(FedscoreError, match="dimension"):
        kl_estimate(torch.zeros(10, 3), gm)
    with pytest.raises(FedscoreError, match="duplicate"):
        kl_estimate(torch.zeros(10, 2), gm)
    with pytest.raises(FedscoreError, match="shape"):
        mmd2_rbf(torch.zeros(10), torch.zeros(10, 1))
    with pytest.raises(FedscoreError, match="descending"):
        score_error(gm.score, gm, torch.tensor([0.1, 1.0]), n=10)
