"""The optimiser spec of eq. 7: one contract every optimiser in OPTIMIZERS passes, SGD is eq. 7
by hand, masked Adam is torch's Adam where nothing is pruned, and the state's one shape
converts to and from tensors named by parameter (the checkpoint format)."""

import pytest
import torch
from torch.func import vmap

from fedscore.errors import FedscoreError
from fedscore.federated import (
    OPTIMIZERS,
    SGD,
    Adam,
    make_optimizer,
    state_from_tensors,
    state_to_tensors,
)
from fedscore.federated.optim import check_state

N, D = 3, 7


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(N, D, generator=g, dtype=torch.float64)
    grad = torch.randn(N, D, generator=g, dtype=torch.float64)
    mask = torch.rand(N, D, generator=g) < 0.6
    return torch.where(mask, theta, 0), grad, mask


def _steps(opt, theta, grad, mask, state, k=3):
    for i in range(k):
        theta, state = opt.update(theta, grad * (i + 1), mask, state)
    return theta, state


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_serves_one_worker_stacked_workers_and_vmap_alike(name):
    opt = make_optimizer(name, lr=0.1)
    theta, grad, mask = _inputs()
    stacked = _steps(opt, theta, grad, mask, opt.init(theta))
    for n in range(N):  # one worker at a time: lead = ()
        alone = _steps(opt, theta[n], grad[n], mask[n], opt.init(theta[n]))
        assert torch.equal(alone[0], stacked[0][n])
        assert all(torch.equal(alone[1][k], stacked[1][k][n]) for k in alone[1])
    mapped = vmap(lambda th, g, m: _steps(opt, th, g, m, opt.init(th)))(theta, grad, mask)
    assert torch.equal(mapped[0], stacked[0])
    assert all(torch.equal(mapped[1][k], stacked[1][k]) for k in stacked[1])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_keeps_pruned_coordinates_zero_and_its_state_shape(name):
    opt = make_optimizer(name, lr=0.1)
    theta, grad, mask = _inputs(1)
    grad[~mask] = float("nan")  # a non-finite gradient where pruned must not leak in
    state = opt.init(theta)
    shapes = {k: v.shape for k, v in state.items()}
    new, state = _steps(opt, theta, grad, mask, state)
    assert bool((new[~mask] == 0).all()) and bool((new[mask] != theta[mask]).all())
    assert {k: v.shape for k, v in state.items()} == shapes
    # moments of pruned coordinates see a zero gradient, never the NaN
    assert all(bool(torch.isfinite(v).all()) for v in state.values())
    check_state(opt, state, theta)


def test_sgd_is_eq7_by_hand():
    theta = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 6.0]])
    grad = torch.tensor([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    new, state = SGD(lr=0.1).update(theta, grad, mask, {})
    assert torch.equal(new, torch.tensor([[0.0, 0.0, 0.0], [3.9, 0.0, 5.7]]))
    assert state == {}


def test_masked_adam_with_nothing_pruned_is_torch_adam():
    theta, grad, _ = _inputs(2)
    full = torch.ones_like(theta, dtype=torch.bool)
    opt = Adam(lr=0.05, betas=(0.8, 0.99), eps=1e-6)
    leaf = theta.clone().requires_grad_(True)
    ref = torch.optim.Adam([leaf], lr=0.05, betas=(0.8, 0.99), eps=1e-6)
    ours, state = theta, opt.init(theta)
    for i in range(4):
        leaf.grad = grad * (i + 1)
        ref.step()
        ours, state = opt.update(ours, grad * (i + 1), full, state)
    torch.testing.assert_close(ours, leaf.detach(), rtol=1e-12, atol=1e-14)
    assert state["step"].tolist() == [4] * N


def test_make_optimizer_resolves_names_and_refuses_what_it_does_not_know():
    assert make_optimizer("sgd", lr=0.1) == SGD(lr=0.1)
    assert make_optimizer("adam", lr=0.1, eps=1e-6) == Adam(lr=0.1, eps=1e-6)
    with pytest.raises(FedscoreError, match="unknown optimizer 'rmsprop'; choose one of: adam"):
        make_optimizer("rmsprop", lr=0.1)
    with pytest.raises(FedscoreError, match="'sgd' takes no option"):
        make_optimizer("sgd", lr=0.1, betas=(0.9, 0.999))


def test_the_state_converts_to_tensors_named_by_parameter_and_back():
    like = {"fc.weight": torch.zeros(2, 2), "scale": torch.zeros(()), "fc.bias": torch.zeros(2)}
    d = 7  # sorted names: fc.bias (2), fc.weight (4), scale (1)
    state = {"m": torch.arange(N * d, dtype=torch.float32).reshape(N, d),
             "v": torch.ones(N, d), "step": torch.tensor([1, 2, 3])}
    named = state_to_tensors(state, like)
    assert sorted(named) == ["m/fc.bias", "m/fc.weight", "m/scale", "step",
                             "v/fc.bias", "v/fc.weight", "v/scale"]
    assert named["m/fc.weight"].shape == (N, 2, 2) and named["m/scale"].shape == (N,)
    assert named["m/fc.bias"][1].tolist() == [7.0, 8.0]  # worker 1, first in sorted order
    back = state_from_tensors(named, like)
    assert all(torch.equal(back[k], state[k]) for k in state)
    one = state_from_tensors(state_to_tensors({k: v[2] for k, v in state.items()}, like), like)
    assert all(torch.equal(one[k], state[k][2]) for k in state)
    assert state_to_tensors({}, like) == {} and state_from_tensors({}, like) == {}
    with pytest.raises(FedscoreError, match="disagree on parameters"):
        state_from_tensors({k: v for k, v in named.items() if k != "v/scale"}, like)


def test_a_state_of_another_optimizer_or_shape_is_refused():
    theta = torch.zeros(N, D)
    state = Adam(lr=0.1).init(theta)
    check_state(Adam(lr=0.1), state, theta)
    with pytest.raises(FedscoreError, match="saved by another optimiser"):
        check_state(SGD(lr=0.1), state, theta)
    with pytest.raises(FedscoreError, match=r"'step' has shape \(3,\), expected \(2,\)"):
        check_state(Adam(lr=0.1), {"m": state["m"][:2], "v": state["v"][:2],
                                   "step": state["step"]}, theta[:2])
