"""Eq. 7: S masked steps from theta_q ⊙ m; the masked-Adam variant keeps pruned coords at 0."""

import pytest
import torch
from federated_oracle import OracleWorker, TinyScoreNet, tiny_loss

from fedscore.errors import FedscoreError
from fedscore.federated import (
    Adam,
    local_update,
    make_loss_fn,
    make_mask,
    make_optimizer,
    state_from_tensors,
    state_to_tensors,
)

DIM, B, S = 3, 6, 4


def _setup(seed=0, dtype=torch.float64):
    torch_gen = torch.Generator().manual_seed(seed)
    model = TinyScoreNet(DIM).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch_gen, dtype=dtype))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    batches = (
        torch.randn(S, B, DIM, generator=torch_gen, dtype=dtype),
        torch.rand(S, B, generator=torch_gen, dtype=dtype) * 0.9 + 0.05,
        torch.randn(S, B, DIM, generator=torch_gen, dtype=dtype),
    )
    return model, params, batches, make_loss_fn(model, tiny_loss)


def _steps(batches):
    return [tuple(x[s] for x in batches) for s in range(S)]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("policy", ["random", "topk", "full"])
def test_local_update_equals_the_autograd_oracle(optimizer, policy):
    model, params, batches, loss_fn = _setup()
    mask = make_mask(params, policy, 0.6, torch.Generator().manual_seed(3))
    lr = 0.05 if optimizer == "sgd" else 0.01
    new, state, losses = local_update(params, mask, batches, loss_fn,
                                      make_optimizer(optimizer, lr=lr), steps=S)
    oracle = OracleWorker(params, optimizer, lr, keep_state=False)
    want_losses = oracle.train(params, mask, _steps(batches), loss_fn)
    for k in params:
        torch.testing.assert_close(new[k], oracle.params[k].detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses, torch.tensor(want_losses, dtype=torch.float64))
    assert losses.shape == (S,)
    assert (state == {}) == (optimizer == "sgd")
    if optimizer == "adam":
        assert int(state["step"]) == S


def test_sgd_is_eq7_step_by_step():
    _, params, batches, loss_fn = _setup(1)
    mask = make_mask(params, "random", 0.5, torch.Generator().manual_seed(0))
    theta = {k: v * mask[k] for k, v in params.items()}  # theta_{q,n,0} = theta_q ⊙ m
    for s in range(2):
        leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        grads = torch.autograd.grad(loss_fn(leaves, tuple(x[s] for x in batches)),
                                    list(leaves.values()))
        theta = {k: theta[k] - 0.1 * g * mask[k] for k, g in zip(theta, grads)}
    new, _, _ = local_update(params, mask, batches, loss_fn, make_optimizer("sgd", lr=0.1),
                             steps=2)
    for k in params:
        torch.testing.assert_close(new[k], theta[k], rtol=1e-12, atol=1e-12)


def _noisy_state(params, seed=0):
    """Adam state with large moments EVERYWHERE, as left over from earlier rounds in which
    coordinates now pruned were kept (built by name, as a checkpoint holds it)."""
    g = torch.Generator().manual_seed(seed)
    named = {f"m/{k}": torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    named |= {f"v/{k}": torch.rand(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    named["step"] = torch.tensor(7)
    return state_from_tensors(named, params)


def test_adam_keeps_pruned_coordinates_exactly_zero_even_with_leftover_moments():
    _, params, batches, loss_fn = _setup(2)
    mask = make_mask(params, "random", 0.5, torch.Generator().manual_seed(1))
    state = _noisy_state(params)
    theta = params
    for s in range(S):  # one step at a time: every intermediate model, not only the last
        theta, state, _ = local_update(theta, mask, tuple(x[s : s + 1] for x in batches),
                                       loss_fn, Adam(lr=0.1), state=state)
        moments = state_to_tensors(state, params)
        for k in params:
            assert bool((theta[k][~mask[k]] == 0).all()), k
            assert bool((theta[k][mask[k]] != params[k][mask[k]]).any()), k
            # the leftover moments of pruned coordinates decay as under a zero gradient
            assert bool((moments[f"m/{k}"][~mask[k]] != 0).all())
    assert int(state["step"]) == 7 + S


def test_kept_adam_state_continues_where_the_last_round_stopped():
    _, params, batches, loss_fn = _setup(4)
    mask = make_mask(params, "full", 1.0)
    adam = Adam(lr=0.01)
    first, state, _ = local_update(params, mask, batches, loss_fn, adam, steps=2)
    second, _, _ = local_update(first, mask, tuple(x[2:] for x in batches), loss_fn, adam,
                                state=state)
    straight, _, _ = local_update(params, mask, batches, loss_fn, adam, steps=4)
    for k in params:
        torch.testing.assert_close(second[k], straight[k], rtol=1e-12, atol=1e-12)


def test_results_carry_no_autograd_history_when_inputs_require_grad():
    model, _, batches, loss_fn = _setup(5)
    params = dict(model.named_parameters())  # live parameters, requires_grad=True
    mask = make_mask(params, "topk", 0.75)
    new, _, losses = local_update(params, mask, batches, loss_fn, make_optimizer("sgd", lr=0.1),
                                  steps=2)
    assert all(v.grad_fn is None and not v.requires_grad for v in new.values())
    assert losses.grad_fn is None


def test_make_loss_fn_evaluates_the_model_at_the_given_params():
    model, params, batches, loss_fn = _setup(6)
    batch = tuple(x[0] for x in batches)
    assert torch.equal(loss_fn(params, batch), tiny_loss(model, batch))
    shifted = {k: v + 1 for k, v in params.items()}
    assert not torch.equal(loss_fn(shifted, batch), tiny_loss(model, batch))


def test_bad_arguments_are_refused():
    _, params, batches, loss_fn = _setup()
    mask = make_mask(params, "full", 1.0)
    with pytest.raises(FedscoreError, match="unknown optimizer 'rmsprop'"):
        make_optimizer("rmsprop", lr=0.1)
    with pytest.raises(FedscoreError, match="between 1 and the 4 batches"):
        local_update(params, mask, batches, loss_fn, make_optimizer("sgd", lr=0.1), steps=5)
    with pytest.raises(FedscoreError, match="state_from_tensors"):  # a state keyed by name
        local_update(params, mask, batches, loss_fn, Adam(lr=0.1),
                     state={"m": dict(params), "v": dict(params), "step": torch.tensor(1)})
