"""The mixture aggregator made safe and accurate (issue 17, item 3): deterministic samplers
refused, clipping outside the mixture, each sampler's own transition in the increments."""

import math

import pytest
import torch

from fedscore import diffusion, inference, toy
from fedscore.diffusion.samplers import KERNELS, SAMPLERS
from fedscore.errors import FedscoreError
from fedscore.inference.sampling import draw

GM = toy.preset("two-clients")
A, B = GM.components([0, 1]), GM.components([2, 3])
PI = [0.6, 0.4]


def exact_log_ratio(a, b, pi, x, t):
    """log(pi_A q_t^A(x)) - log(pi_B q_t^B(x)), (n,)."""
    return (a.log_prob(x.double(), t) + math.log(pi[0])
            - b.log_prob(x.double(), t) - math.log(pi[1]))


@pytest.mark.parametrize("method", ["pf-ode", "pf-ode-heun"])
def test_a_deterministic_sampler_is_refused_with_the_fix_named(method):
    mix = inference.combine([A.score, B.score], "mixture", weights=PI)
    times = diffusion.time_grid("exponential", 10, T=6.0, delta=1e-3)
    with pytest.raises(FedscoreError, match="deterministic sampler.*route"):
        diffusion.sample(mix, torch.randn(4, 2), times, method)
    # also when the mixture is the observer of a wrapping score function, and through the
    # experiments' one sampling driver
    with pytest.raises(FedscoreError, match="stochastic"):
        diffusion.sample(diffusion.clip_denoised(mix), torch.randn(4, 2), times, method,
                         observer=mix)
    with pytest.raises(FedscoreError, match="deterministic"):
        draw(mix, 4, (2,), times, method, seed=0)


@pytest.mark.parametrize("method", sorted(KERNELS))
def test_each_stochastic_step_is_the_gaussian_transition_its_kernel_names(method):
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    for s, s_next in [(3.0, 2.5), (0.4, 0.25), (0.01, 0.006)]:
        out, score = SAMPLERS[method](GM.score, x, s, s_next, lambda: eps)
        a, c, v = KERNELS[method](s, s_next)
        assert torch.allclose(out, a * x + c * score + math.sqrt(v) * eps, atol=1e-5)
    assert set(KERNELS) == diffusion.samplers.STOCHASTIC


def _clipped_tracking_error(mix_and_observer, steps=100):
    """Mean |tracked - exact| log ratio at forward time 1 along a trajectory whose drift is
    clipped (x0-hat in [-1, 1]: active everywhere, the clients' modes lie at x = +-3)."""
    score_fn, mix = mix_and_observer
    errors = []

    class Watch:
        def observe(self, x_prev, x_next, t_prev, t_next):
            mix.observe(x_prev, x_next, t_prev, t_next)
            if math.isclose(float(t_next[0]), 1.0, rel_tol=1e-6):
                tracked = mix.log_w[:, 0] - mix.log_w[:, 1]
                exact = exact_log_ratio(A, B, PI, x_next, 1.0)
                errors.append(float((tracked - exact).abs().mean()))

        def begin_sampling(self, *args):
            mix.begin_sampling(*args)

    times = diffusion.time_grid("exponential", steps, T=6.0, delta=1e-3)
    g = torch.Generator().manual_seed(0)
    diffusion.sample(score_fn, torch.randn(500, 2, generator=g), times, "exp-integrator", g,
                     observer=Watch())
    assert len(errors) == 1
    return errors[0]


def test_clipping_outside_the_mixture_keeps_the_tracked_densities_right():
    def stacked(x, t):
        return torch.stack([A.score(x, t), B.score(x, t)])

    errors = {}
    for steps in (100, 200):
        # new: the combined score clipped, the weights tracked with the agents' own scores
        outside = inference.combine([A.score, B.score], "mixture", weights=PI, clip=True)
        # old (the demo's): each agent clipped before mixing; its field is no gradient
        inside = inference.combine(diffusion.clip_denoised(stacked), "mixture", weights=PI)
        errors[steps] = (_clipped_tracking_error((outside, outside), steps),
                         _clipped_tracking_error((inside, inside), steps))
    (out_100, in_100), (out_200, in_200) = errors[100], errors[200]
    assert out_200 < 0.6 * out_100, errors  # converges with the step, clipped drift or not
    assert in_200 > 0.8 * in_100 and in_200 > 4 * out_200, errors  # does not


def test_the_clipped_mixture_returns_the_clipped_combination_of_unclipped_agents():
    mix = inference.combine([A.score, B.score], "mixture", weights=PI, clip=True)
    x = 3 * torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    t = torch.full((16,), 0.2)
    combined = 0.6 * A.score(x, t) + 0.4 * B.score(x, t)
    expected = diffusion.clip_denoised(lambda _x, _t: combined)(x, t)
    assert torch.allclose(mix(x, t), expected, atol=1e-5)
    assert torch.equal(mix._cache[1][0], A.score(x, t))  # tracked: the agents' own scores


# the test: d = 32, A = N(mu, 0.09 I) with pi 0.7, B = N(-mu, 0.36 I) with pi 0.3
MU = 0.2 * torch.ones(1, 32, dtype=torch.float64)
A32 = toy.GaussianMixture.isotropic([1.0], MU, 0.3)
B32 = toy.GaussianMixture.isotropic([1.0], -MU, 0.6)
PI32 = [0.7, 0.3]


def _weight_run(method, steps, own_kernel, n=400):
    """(worst-time mean |w_A - w*_A|, fraction of samples in A's part) as in
    benchmarks/mixture_weights.py; own_kernel False gives the previous (Itô) increments."""
    mix = inference.combine([A32.score, B32.score], "mixture", weights=PI32)
    errors = []

    class Watch:
        def __call__(self, x, t):
            return mix(x, t)

        def observe(self, x_prev, x_next, t_prev, t_next):
            mix.observe(x_prev, x_next, t_prev, t_next)
            w_star = torch.sigmoid(exact_log_ratio(A32, B32, PI32, x_next, float(t_next[0])))
            errors.append(float((mix.weights_now()[:, 0] - w_star).abs().mean()))

        def begin_sampling(self, *args):
            if own_kernel:
                mix.begin_sampling(*args)

    times = diffusion.time_grid("exponential", steps, T=5.0, delta=1e-3)
    g = torch.Generator().manual_seed(0)
    x = diffusion.sample(Watch(), torch.randn(n, 32, generator=g), times, method, g)
    in_a = float((exact_log_ratio(A32, B32, PI32, x, 1e-3) > 0).double().mean())
    return max(errors), in_a


def test_the_exponential_integrators_own_kernel_tracks_better_than_the_ito_increment():
    before_err, before_in_a = _weight_run("exp-integrator", 25, own_kernel=False)
    after_err, after_in_a = _weight_run("exp-integrator", 25, own_kernel=True)
    assert after_err < 0.85 * before_err, (after_err, before_err)
    # the Itô increment over-weights A (too much noise taken for 2h): too many samples there
    assert abs(after_in_a - 0.7) < 0.5 * abs(before_in_a - 0.7), (after_in_a, before_in_a)


@pytest.mark.parametrize("method", sorted(KERNELS))
def test_the_weight_error_falls_at_first_order_in_the_step(method):
    coarse, _ = _weight_run(method, 25, own_kernel=True)
    fine, _ = _weight_run(method, 100, own_kernel=True)
    assert fine < 0.5 * coarse, (method, coarse, fine)  # first order: ~1/4 for 4x the steps
