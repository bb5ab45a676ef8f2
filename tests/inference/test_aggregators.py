"""Federated inference with exact scores: the paper's mean puts mass between the agents'
modes; the mixture aggregator samples the pooled mixture."""

import math

import pytest
import torch

from fedscore import diffusion, inference, toy
from fedscore.errors import FedscoreError
from fedscore.metrics.toy import mmd2_rbf

GM = toy.preset("two-clients")  # client 0: components 0-1 (x = -3, pi 0.6); client 1: x = +3
A, B = GM.components([0, 1]), GM.components([2, 3])
PI = [0.6, 0.4]
N = 1500


def sample(score_fn, steps=100, method="exp-integrator", seed=0, n=N):
    times = diffusion.time_grid("exponential", steps, T=6.0, delta=1e-3)
    g = torch.Generator().manual_seed(seed)
    return diffusion.sample(score_fn, torch.randn(n, 2, generator=g), times, method, g)


def mmd2(x, y):
    """Unbiased squared MMD, RBF kernel, median bandwidth (fedscore.metrics)."""
    return mmd2_rbf(x, y)


def test_mixture_aggregator_samples_the_pooled_mixture():
    x = sample(inference.combine([A.score, B.score], "mixture", weights=PI))
    comp = GM.responsibilities(x, 0.0).argmax(1)
    freq = torch.bincount(comp, minlength=4).double() / N
    assert torch.allclose(freq, GM.weights, atol=0.03), freq
    exact = GM.sample(N, generator=torch.Generator().manual_seed(5))
    reference = sample(GM.score, seed=1)  # the sampler driven by the pooled exact score
    assert mmd2(x, exact) < mmd2(reference, exact) + 1e-3


def test_mean_aggregator_puts_most_samples_between_the_agents_modes():
    x = sample(inference.combine([A.score, B.score], "mean"))
    between = (x[:, 0].abs() < 1.5).double().mean()
    assert between > 0.9  # the geometric mean of the two clients' densities, not their mixture


def _tracking_error(steps, method="exp-integrator"):
    agg = inference.combine([A.score, B.score], "mixture", weights=PI)
    log_pi = torch.log(torch.tensor(PI, dtype=torch.float64))
    errors = []

    class Watch:
        def __call__(self, x, t):
            return agg(x, t)

        def observe(self, x_prev, x_next, t_prev, t_next):
            agg.observe(x_prev, x_next, t_prev, t_next)
            t = float(t_next[0])
            if math.isclose(t, 1.0, rel_tol=1e-6):
                exact = (A.log_prob(x_next.double(), t) + log_pi[0]
                         - B.log_prob(x_next.double(), t) - log_pi[1])
                tracked = agg.log_w[:, 0] - agg.log_w[:, 1]
                errors.append(float((tracked - exact).abs().mean()))

    sample(Watch(), steps=steps, method=method, n=500)
    assert len(errors) == 1  # the exponential grid has a point at forward time 1
    return errors[0]


@pytest.mark.parametrize("method", ["exp-integrator", "euler-maruyama"])
def test_tracked_log_density_ratio_follows_the_exact_one_and_improves_with_steps(method):
    errs = [_tracking_error(k, method) for k in (50, 100, 200)]
    assert all(b < 0.65 * a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.25, errs


@pytest.mark.parametrize("name", sorted(inference.AGGREGATORS))
def test_identical_agents_give_the_single_agents_samples(name):
    single = sample(GM.score, steps=40, n=300)
    combined = sample(inference.combine([GM.score] * 3, name, weights=[0.5, 0.3, 0.2]),
                      steps=40, n=300)
    assert torch.allclose(single, combined, atol=1e-4)


def test_hybrid_uses_only_the_heaviest_agent_early_and_all_late():
    agg = inference.combine([A.score, B.score], "hybrid", weights=PI,
                            schedule=inference.step_schedule(switch_time=1.0, early=1))
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    early, late = torch.full((8,), 3.0), torch.full((8,), 0.5)
    assert torch.allclose(agg(x, early), A.score(x, early))
    assert torch.allclose(agg(x, late), 0.6 * A.score(x, late) + 0.4 * B.score(x, late))


def test_weighted_accepts_per_sample_weights():
    x = torch.randn(2, 2, generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), 0.3)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = inference.combine([A.score, B.score], "weighted", weights=w)(x, t)
    assert torch.allclose(out[0], A.score(x, t)[0]) and torch.allclose(out[1], B.score(x, t)[1])


def test_bad_aggregator_inputs_are_clear_errors():
    with pytest.raises(FedscoreError, match="mixture"):
        inference.combine([A.score], "median")
    with pytest.raises(FedscoreError, match="shape"):
        inference.combine([A.score, B.score], "weighted", weights=[1.0, 2.0, 3.0])(
            torch.zeros(1, 2), torch.ones(1))
    with pytest.raises(FedscoreError, match="at least one agent"):
        inference.combine([], "mean")


def test_a_wrapped_callable_of_agents_needs_no_n_agents_and_a_bad_shape_is_refused():
    def stacked(x, t):  # (K, B, D) without an n_agents attribute (e.g. clip_denoised's)
        return torch.stack([A.score(x, t), B.score(x, t)])

    x, t = torch.randn(5, 2), torch.full((5,), 0.5)
    agg = inference.combine(stacked, "weighted", weights=PI)
    assert torch.allclose(agg(x, t), 0.6 * A.score(x, t) + 0.4 * B.score(x, t))
    assert agg.n_agents == 2
    with pytest.raises(FedscoreError, match="pass separate score functions as a list"):
        inference.combine(A.score, "mean")(x, t)  # one score function is not K agents
