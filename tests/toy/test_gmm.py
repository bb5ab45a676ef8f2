"""The Gaussian-mixture ground truth is itself checked against autograd and closed forms."""

import math

import pytest
import torch

from fedscore import toy
from fedscore.errors import FedscoreError


@pytest.mark.parametrize("name", ["ring8", "two-clients", "gmm16"])
def test_exact_score_is_the_gradient_of_the_exact_log_density(name):
    gm = toy.preset(name)
    g = torch.Generator().manual_seed(0)
    x = gm.sample(64, generator=g).double()
    for t in [0.0, 1e-3, 0.3, 2.0, torch.rand(64, generator=g, dtype=torch.float64)]:
        xx = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(gm.log_prob(xx, t).sum(), xx)
        assert torch.allclose(grad, gm.score(x, t), atol=1e-9, rtol=1e-9)


def test_noised_mixture_is_the_ou_marginal_of_its_samples():
    # q_t = sum pi_j N(e^{-t} mu_j, e^{-2t} S_j + sigma_t^2 I): check mean and covariance of
    # e^{-t} X0 + sigma_t Z against the mixture's moments at time t.
    gm = toy.preset("two-clients")
    g = torch.Generator().manual_seed(1)
    t = 0.7
    x0 = gm.sample(200_000, generator=g).double()
    xt = math.exp(-t) * x0 + math.sqrt(1 - math.exp(-2 * t)) * torch.randn(x0.shape, generator=g)
    mean_t = math.exp(-t) * (gm.weights[:, None] * gm.means).sum(0)
    assert torch.allclose(xt.mean(0), mean_t, atol=0.01)
    # the density integrates to one on a grid (2-D)
    lin = torch.linspace(-8, 8, 321, dtype=torch.float64)
    grid = torch.cartesian_prod(lin, lin)
    mass = gm.log_prob(grid, t).exp().sum() * (lin[1] - lin[0]) ** 2
    assert abs(float(mass) - 1.0) < 1e-3


def test_at_large_t_the_mixture_forgets_its_data():
    gm = toy.preset("ring8")
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(gm.score(x, 20.0), -x, atol=1e-6)


def test_components_is_a_renormalised_sub_mixture():
    gm = toy.preset("two-clients")
    left = gm.components([0, 1])
    assert torch.allclose(left.weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    x, comp = gm.sample(5000, generator=torch.Generator().manual_seed(0), return_labels=True)
    freq = torch.bincount(comp, minlength=4).double() / 5000
    assert torch.allclose(freq, gm.weights, atol=0.02)
    r = gm.responsibilities(x, 0.0)
    assert (r.argmax(1) == comp).double().mean() > 0.95


def test_bad_mixtures_and_names_get_clear_errors():
    with pytest.raises(FedscoreError, match="sum to 1"):
        toy.GaussianMixture([0.5, 0.2], [[0.0], [1.0]], [[[1.0]], [[1.0]]])
    with pytest.raises(FedscoreError, match="positive definite"):
        toy.GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(FedscoreError, match="ring8"):
        toy.preset("ring9")
