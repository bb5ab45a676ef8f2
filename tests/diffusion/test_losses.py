"""Eq. 9 and DDPM's simple loss against the Gaussian-mixture ground truth (Appendix B)."""

import pytest
import torch

from fedscore import diffusion, toy
from fedscore.diffusion import sde
from fedscore.errors import FedscoreError


def test_appendix_b_eq9_at_the_exact_score_equals_the_constant_term():
    # At s = grad log q_t, eq. 9 (conditional target) equals
    #   sum_k gamma_k (E||grad log q(Y|X0)||^2 - E||grad log q_t(Y)||^2)
    #   = sum_k gamma_k (d / sigma_{s_k}^2 - E||grad log q_{s_k}(Y)||^2),
    # the first part in closed form, the second from fresh samples of q_t: independent of
    # eq9_value's own Monte Carlo.
    gm = toy.preset("ring8")
    times = diffusion.time_grid("exponential", 30, T=5.0, delta=1e-2)
    g = torch.Generator().manual_seed(0)
    x0 = gm.sample(20_000, generator=g).double()
    lhs = diffusion.eq9_value(gm.score, x0, times, generator=g)
    gammas = diffusion.step_sizes(times)
    rhs = 0.0
    for k in range(len(gammas)):
        t = float(times[k])
        y = gm.sample(20_000, generator=g).double()
        yt = sde.perturb(y, t, torch.randn(y.shape, generator=g, dtype=torch.float64))
        e_score2 = gm.score(yt, t).pow(2).sum(1).mean()
        rhs += float(gammas[k]) * (2 / float(sde.sigma(torch.tensor(t))) ** 2 - float(e_score2))
    assert lhs == pytest.approx(rhs, rel=0.03)
    # and any other score function pays more than the exact one
    worse = diffusion.eq9_value(lambda x, t: 0.9 * gm.score(x, t), x0, times, generator=g)
    assert worse > lhs * 1.02


def test_paper_weighted_minibatch_loss_is_an_unbiased_estimate_of_eq9():
    gm = toy.preset("ring8")
    times = diffusion.time_grid("exponential", 20, T=4.0, delta=1e-2)
    g = torch.Generator().manual_seed(1)
    x0 = gm.sample(4000, generator=g).double()

    def net(x, t):  # a deliberately imperfect "network" in the score parameterisation
        return 0.8 * gm.score(x, t)

    def score(x, t):
        return 0.8 * gm.score(x, t)

    exact = diffusion.eq9_value(score, x0, times, generator=g, repeats=2)
    draws = []
    for _ in range(40):
        t, eps = diffusion.draw_noise(x0, times, "paper", g)
        draws.append(
            float(
                diffusion.dsm_loss(
                    net, x0, t, eps, weighting="paper", parameterisation="score",
                    total_time=float(times[0] - times[-1]),
                )
            )
        )
    mean = sum(draws) / len(draws)
    assert mean == pytest.approx(exact, rel=0.05)


def test_eps_and_score_parameterisations_describe_the_same_model():
    gm = toy.preset("two-clients")
    times = diffusion.time_grid("uniform", 10, T=3.0, delta=1e-3)
    g = torch.Generator().manual_seed(2)
    x0 = gm.sample(256, generator=g)
    t, eps = diffusion.draw_noise(x0, times, "paper", g)

    def score_net(x, tt):
        return gm.score(x, tt)

    def eps_net(x, tt):  # eps = -sigma_t * score
        return -sde.sigma(tt)[:, None] * gm.score(x, tt)

    for weighting in ["paper", "eps"]:
        a = diffusion.dsm_loss(score_net, x0, t, eps, weighting=weighting, parameterisation="score")
        b = diffusion.dsm_loss(eps_net, x0, t, eps, weighting=weighting, parameterisation="eps")
        assert torch.allclose(a, b, rtol=1e-4)


def test_eps_loss_of_an_oracle_that_knows_the_noise_is_zero():
    x0 = torch.randn(32, 3)
    times = diffusion.time_grid("uniform", 5)
    t, eps = diffusion.draw_noise(x0, times, "eps", torch.Generator().manual_seed(0))
    loss = diffusion.dsm_loss(lambda x, tt: eps, x0, t, eps, weighting="eps")
    assert float(loss) == 0.0


def test_paper_weighting_draws_grid_points_in_proportion_to_their_steps():
    times = diffusion.time_grid("exponential", 10, T=3.0, delta=1e-2)
    t, _ = diffusion.draw_noise(torch.zeros(100_000, 1), times, "paper",
                                torch.Generator().manual_seed(0))
    gammas = diffusion.step_sizes(times)
    freq = torch.stack([(t.double() == times[k].float().double()).double().mean()
                        for k in range(10)])
    assert torch.allclose(freq, gammas / gammas.sum(), atol=0.01)
    # delta itself is not a training time: eq. 9 sums k = 0..K-1
    assert not bool((t.double() == times[-1].float().double()).any())


def test_unknown_weighting_or_parameterisation_is_a_clear_error():
    x0 = torch.randn(4, 2)
    times = diffusion.time_grid("uniform", 3)
    with pytest.raises(FedscoreError, match="paper"):
        diffusion.draw_noise(x0, times, "snr")
    with pytest.raises(FedscoreError, match="eps"):
        diffusion.to_score(x0, torch.ones(4), "v")
