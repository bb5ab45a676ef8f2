"""One contract test runs over every sampler: driven by the EXACT mixture score it
reproduces the data; a wrong sign, a wrong variance or a missing e^gamma factor breaks it."""

import math

import pytest
import torch

from fedscore import diffusion, toy
from fedscore.diffusion import samplers
from fedscore.errors import FedscoreError
from fedscore.metrics.toy import mmd2_rbf
from fedscore.toy.exact import sampler_kl

N = 1500
MMD_TOL = 2e-3  # exact-vs-exact MMD^2 noise at N=1500 is ~5e-4; a variance x1.3 gives ~8e-3
# The median bandwidth (~ the ring's diameter) cannot see a mode's width, so the ring is also
# checked by the mean squared distance to the nearest mode (exact: 2 * 0.25^2 = 0.125).
SPREAD_TOL = 0.3


def mmd2(x, y):
    """Unbiased squared MMD, RBF kernel, median bandwidth (fedscore.metrics)."""
    return mmd2_rbf(x, y)


@pytest.fixture(scope="module")
def ring():
    gm = toy.preset("ring8")
    return gm, gm.sample(N, generator=torch.Generator().manual_seed(123))


def spread(x, gm):
    return float((torch.cdist(x.double(), gm.means) ** 2).min(1).values.mean())


def ring_check(x, ref, gm):
    """Both statistics of the ring within tolerance."""
    return mmd2(x, ref) < MMD_TOL and abs(spread(x, gm) / spread(ref, gm) - 1) < SPREAD_TOL


def run(score_fn, method, steps=100, seed=7):
    times = diffusion.time_grid("exponential", steps, T=6.0, delta=1e-3)
    g = torch.Generator().manual_seed(seed)
    return diffusion.sample(score_fn, torch.randn(N, 2, generator=g), times, method, generator=g)


@pytest.mark.parametrize("method", sorted(diffusion.SAMPLERS))
def test_sampler_with_exact_score_reproduces_the_ring(ring, method):
    gm, ref = ring
    assert ring_check(run(gm, method), ref, gm)


def test_the_ring_check_catches_a_wrong_sign_or_a_scaled_score(ring):
    gm, ref = ring
    assert not ring_check(run(lambda x, t: -gm(x, t), "exp-integrator"), ref, gm)
    assert not ring_check(run(lambda x, t: 0.8 * gm(x, t), "exp-integrator"), ref, gm)


def test_the_ring_check_catches_a_missing_exponential_factor(ring, monkeypatch):
    gm, ref = ring

    def no_exp_factor(score_fn, x, s, s_next, noise):  # e^h Y replaced by Y
        h = s - s_next
        score = score_fn(x, samplers._t(x, s))
        return x + 2 * math.expm1(h) * score + math.sqrt(math.expm1(2 * h)) * noise(), score

    monkeypatch.setitem(samplers.SAMPLERS, "exp-integrator", no_exp_factor)
    assert not ring_check(run(gm, "exp-integrator"), ref, gm)


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_the_ring_check_catches_a_wrong_noise_variance(ring, monkeypatch, factor):
    gm, ref = ring

    def wrong_variance(score_fn, x, s, s_next, noise):
        h = s - s_next
        score = score_fn(x, samplers._t(x, s))
        std = math.sqrt(factor * math.expm1(2 * h))
        return math.exp(h) * x + 2 * math.expm1(h) * score + std * noise(), score

    monkeypatch.setitem(samplers.SAMPLERS, "exp-integrator", wrong_variance)
    assert not ring_check(run(gm, "exp-integrator"), ref, gm)


def test_the_ring_check_catches_a_rescaled_sample(ring):
    gm, ref = ring
    assert not ring_check(run(gm, "exp-integrator") * math.sqrt(1.3), ref, gm)


GAUSS = toy.GaussianMixture([1.0], [[1.0, -2.0]], [[[0.5, 0.2], [0.2, 0.3]]])


@pytest.mark.parametrize("method", sorted(diffusion.SAMPLERS))
def test_discretisation_error_shrinks_as_steps_grow(method):
    # Gaussian data: the sampler's output law is computed exactly (no Monte Carlo noise).
    kls = [
        sampler_kl(method, GAUSS, diffusion.time_grid("exponential", k, T=8.0, delta=1e-3))
        for k in (20, 40, 80, 160)
    ]
    assert all(b < 0.6 * a for a, b in zip(kls, kls[1:], strict=False)), kls
    assert kls[-1] < 2e-3


def test_exponential_integrator_is_first_order_and_heun_second_order():
    def kl(method, k):
        return sampler_kl(method, GAUSS, diffusion.time_grid("exponential", k, T=8.0, delta=1e-3))

    # KL ~ (error)^2: first order -> KL / 4 per doubling, second order -> KL / 16
    assert 2.5 < kl("exp-integrator", 80) / kl("exp-integrator", 160) < 6
    assert kl("pf-ode-heun", 80) / kl("pf-ode-heun", 160) > 10


def test_observe_hook_sees_every_step_in_order():
    gm = toy.preset("ring8")
    seen = []

    class Watched:
        def __call__(self, x, t):
            return gm(x, t)

        def observe(self, x_prev, x_next, t_prev, t_next):
            seen.append((float(t_prev[0]), float(t_next[0]), x_prev.shape, x_next.shape))

    times = diffusion.time_grid("uniform", 5, T=2.0, delta=0.01)
    diffusion.sample(Watched(), torch.randn(4, 2), times, "euler-maruyama")
    assert [s[:2] for s in seen] == [
        (pytest.approx(float(a)), pytest.approx(float(b))) for a, b in zip(times, times[1:])
    ]


def test_same_generator_seed_gives_the_same_samples_and_pf_ode_is_deterministic():
    gm = toy.preset("ring8")
    times = diffusion.time_grid("uniform", 10, T=3.0, delta=0.01)
    x_t = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    a = diffusion.sample(gm, x_t, times, "ancestral", torch.Generator().manual_seed(1))
    b = diffusion.sample(gm, x_t, times, "ancestral", torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c = diffusion.sample(gm, x_t, times, "pf-ode", torch.Generator().manual_seed(1))
    d = diffusion.sample(gm, x_t, times, "pf-ode", torch.Generator().manual_seed(2))
    assert torch.equal(c, d)


def test_unknown_sampler_and_bad_grid_are_clear_errors():
    gm = toy.preset("ring8")
    with pytest.raises(FedscoreError, match="exp-integrator"):
        diffusion.sample(gm, torch.randn(2, 2), diffusion.time_grid("uniform", 3), "heun")
    with pytest.raises(FedscoreError, match="descending"):
        diffusion.sample(gm, torch.randn(2, 2), torch.tensor([0.1, 1.0]))


class _Counter:
    def __init__(self):
        self.steps = []

    def observe(self, x_prev, x_next, t_prev, t_next):
        self.steps.append((float(t_prev[0]), float(t_next[0])))


@pytest.mark.parametrize("method", sorted(diffusion.SAMPLERS))
def test_an_explicit_observer_sees_each_step_once_and_replaces_the_score_fns_own(method):
    gm = toy.preset("ring8")
    times = diffusion.time_grid("uniform", 6, T=2.0, delta=0.01)
    pairs = [(pytest.approx(float(a)), pytest.approx(float(b))) for a, b in zip(times, times[1:])]
    own, explicit = _Counter(), _Counter()

    class Watched:  # a score function with its own observe (SPEC §6)
        def __call__(self, x, t):
            return gm(x, t)

        observe = own.observe

    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    diffusion.sample(Watched(), x_T, times, method, torch.Generator().manual_seed(1))
    assert own.steps == pairs  # the default observer: the score function itself
    own.steps.clear()
    diffusion.sample(Watched(), x_T, times, method, torch.Generator().manual_seed(1),
                     observer=explicit)
    assert explicit.steps == pairs and own.steps == []  # replaced, not added
    with pytest.raises(FedscoreError, match="observe"):
        diffusion.sample(gm, x_T, times, method, observer=object())
