"""The OU process (eq. 1) and the time grids satisfy their definitions."""

import math

import pytest
import torch

from fedscore import diffusion
from fedscore.diffusion import grids, sde
from fedscore.errors import FedscoreError


def test_conditional_score_is_minus_eps_over_sigma():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    t = torch.rand(8, generator=g) + 0.01
    xt = sde.perturb(x0, t, eps)
    expected = -eps / sde.sigma(t)[:, None]
    assert torch.allclose(sde.conditional_score(xt, x0, t), expected, rtol=1e-4, atol=1e-4)
    s = float(sde.sigma(torch.tensor(1e-3, dtype=torch.float64)))
    assert math.isclose(s, math.sqrt(1 - math.exp(-2e-3)), rel_tol=1e-12)


@pytest.mark.parametrize("name", ["uniform", "exponential"])
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_grids_run_from_T_down_to_delta(name, steps):
    times = diffusion.time_grid(name, steps, T=4.0, delta=1e-3)
    assert times.shape == (steps + 1,)
    assert math.isclose(float(times[0]), 4.0) and math.isclose(float(times[-1]), 1e-3)
    assert bool((diffusion.step_sizes(times) > 0).all())
    assert math.isclose(float(diffusion.step_sizes(times).sum()), 4.0 - 1e-3)


def test_exponential_grid_meets_corollary_2_condition_with_kappa_of_order_log_over_k():
    T, delta = 5.0, 1e-3
    for steps in [20, 100, 400]:
        times = diffusion.time_grid("exponential", steps, T=T, delta=delta)
        kappa = diffusion.kappa(times)
        gammas = diffusion.step_sizes(times)
        assert bool((gammas <= kappa * torch.clamp(times[1:], max=1.0) + 1e-12).all())
        # Benton et al.: kappa = Theta((T + log(1/delta)) / K)
        assert kappa <= 1.5 * (T + math.log(1 / delta)) / steps
        # uniform above forward time 1, geometric below
        upper = gammas[times[:-1] > 1.0 + 1e-9]
        assert torch.allclose(upper, upper[0].expand_as(upper))
        below = times[times <= 1.0 + 1e-12]
        ratios = below[:-1] / below[1:]
        assert torch.allclose(ratios, ratios[0].expand_as(ratios))
    # the uniform grid needs a much larger kappa for the same K
    uni = diffusion.kappa(diffusion.time_grid("uniform", 100, T=T, delta=delta))
    assert uni > 10 * diffusion.kappa(diffusion.time_grid("exponential", 100, T=T, delta=delta))


def test_ddpm_linear_grid_round_trips_to_the_linear_betas():
    times = diffusion.time_grid("ddpm-linear", 999)
    ab = sde.alpha_bar(times.flip(0))  # alpha_bar_1 .. alpha_bar_1000
    betas = torch.cat([1 - ab[:1], 1 - ab[1:] / ab[:-1]])
    assert torch.allclose(betas, grids.ddpm_betas(), atol=1e-10)
    assert math.isclose(float(times[-1]), 0.5e-4, rel_tol=1e-3)
    coarse = diffusion.time_grid("ddpm-linear", 50)
    assert coarse.shape == (51,) and float(coarse[0]) == float(times[0])
    assert set(coarse.tolist()) <= set(times.tolist())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: diffusion.time_grid("cosine", 10), "uniform"),
        (lambda: diffusion.time_grid("uniform", 10, T=1.0, delta=1.0), "delta must be smaller"),
        (lambda: diffusion.time_grid("uniform", 0), "steps must be"),
        (lambda: diffusion.time_grid("exponential", 10, delta=-1.0), "delta"),
        (lambda: diffusion.time_grid("ddpm-linear", 10, T=3.0), "ddpm-linear"),
    ],
)
def test_bad_grid_arguments_name_the_field(call, message):
    with pytest.raises(FedscoreError, match=message):
        call()
