"""diffusion.ScoreModel: one network read as a score function, the same numbers as the
paths it replaces (eps and score parameterisations, labels bound, functional parameters)."""

import copy

import pytest
import torch
from torch.func import functional_call, grad, stack_module_state, vmap

from fedscore import diffusion
from fedscore.diffusion.sde import sigma
from fedscore.errors import FedscoreError
from fedscore.models import ScoreMLP


def _net(seed=0):
    torch.manual_seed(seed)
    return ScoreMLP(dim=3, hidden=16, depth=2, num_classes=4)


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g)
    t = torch.rand(6, generator=g) * 2 + 0.05
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    return x, t, y


@pytest.mark.parametrize("parameterisation", ["eps", "score"])
def test_the_score_is_the_old_paths_score_with_labels_bound(parameterisation):
    net, (x, t, y) = _net(), _batch()
    old = diffusion.score_fn_of(lambda xx, tt: net(xx, tt, y), parameterisation)
    new = diffusion.ScoreModel(net, parameterisation, labels=y)
    with torch.no_grad():
        out = net(x, t, y)
        assert torch.equal(new(x, t), old(x, t))
        assert torch.equal(new.net_fn(x, t), out)
        expect = -out / sigma(t)[:, None] if parameterisation == "eps" else out
        assert torch.allclose(new(x, t), expect)
        # the labels matter, and rebinding them gives the unconditional (null-label) score
        assert not torch.allclose(new(x, t), new.with_labels(y.roll(1))(x, t))
        assert torch.equal(new.with_labels(None)(x, t),
                           diffusion.ScoreModel(net, parameterisation)(x, t))


def test_functional_params_replace_the_modules_own_without_touching_it():
    net, other, (x, t, y) = _net(0), _net(1), _batch()
    before = {k: v.clone() for k, v in net.named_parameters()}
    params = dict(other.named_parameters())
    with torch.no_grad():
        assert torch.equal(diffusion.ScoreModel(net, labels=y, params=params)(x, t),
                           diffusion.ScoreModel(other, labels=y)(x, t))
    assert all(torch.equal(v, before[k]) for k, v in net.named_parameters())


def test_it_runs_under_vmap_and_grad_over_stacked_parameters():
    nets = [_net(s) for s in range(3)]
    (x, t, y) = _batch()
    stacked, _ = stack_module_state(nets)
    base = copy.deepcopy(nets[0]).to("meta")
    score = diffusion.ScoreModel(base, "eps", labels=y)

    scores = vmap(lambda p: score.with_params(p)(x, t))(stacked)
    for i, n in enumerate(nets):
        assert torch.allclose(scores[i], diffusion.ScoreModel(n, labels=y)(x, t), atol=1e-6)

    eps = torch.randn_like(x)
    g = grad(lambda p: diffusion.dsm_loss(score.with_params(p).net_fn, x, t, eps))(
        {k: v[0] for k, v in stacked.items()})
    nets[0].zero_grad()
    diffusion.dsm_loss(lambda xx, tt: functional_call(nets[0], dict(nets[0].named_parameters()),
                                                      (xx, tt, y)), x, t, eps).backward()
    for k, p in nets[0].named_parameters():
        assert torch.allclose(g[k], p.grad, atol=1e-6)


def test_an_unknown_parameterisation_is_refused_when_bound():
    with pytest.raises(FedscoreError, match="parameterisation"):
        diffusion.ScoreModel(_net(), "v-prediction")
