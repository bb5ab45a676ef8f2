"""The optimiser-spec refactor changes no bit: the engine gives exactly (torch.equal) what the
frozen pre-refactor copy in legacy_engine.py gives for the same inputs: sgd and adam, every
strategy, fresh and kept Adam state, float64 and float32, run_round, train_workers and
local_update. The `_new_*` adapters are the only place that knows the current signatures."""

import pytest
import torch
from federated_oracle import TinyScoreNet, tiny_loss
from legacy_engine import local_update as legacy_local_update
from legacy_engine import run_round as legacy_run_round
from legacy_engine import train_workers as legacy_train_workers

from fedscore import federated
from fedscore.federated import build_masks, make_loss_fn

DIM, B, S = 3, 5, 3
LR = {"sgd": 0.05, "adam": 0.02}


# --- the current API ------------------------------------------------------------------------

def _opt(optimizer):
    return federated.make_optimizer(optimizer, lr=LR[optimizer])


def _new_run_round(params, masks, batches, loss_fn, optimizer, state, strategy, chunk,
                   uncovered="keep"):
    return federated.run_round(params, masks, batches, loss_fn, _opt(optimizer), steps=S,
                               state=state, strategy=strategy, chunk_size=chunk,
                               uncovered=uncovered)


def _new_train_workers(params, masks, batches, loss_fn, optimizer, state, strategy, chunk):
    return federated.train_workers(params, masks, batches, loss_fn, _opt(optimizer), steps=S,
                                   state=state, strategy=strategy, chunk_size=chunk)


def _new_local_update(params, mask, batches, loss_fn, optimizer, state):
    return federated.local_update(params, mask, batches, loss_fn, _opt(optimizer), steps=S,
                                  state=state)


def _new_named(state, params):
    """The current state as {"m/<name>", "v/<name>", "step"} tensors ({} when stateless)."""
    return federated.state_to_tensors(state, params)


def _new_state_from_legacy(state, params):
    """A legacy state (dicts name -> tensor) in the current state's format."""
    return federated.state_from_tensors(_legacy_named(state), params)


# --- helpers --------------------------------------------------------------------------------

def _legacy_named(state):
    if not state:
        return {}
    return {**{f"m/{k}": v for k, v in state["m"].items()},
            **{f"v/{k}": v for k, v in state["v"].items()}, "step": state["step"]}


def _model(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    model = TinyScoreNet(DIM).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    return model


def _batches(q, n_workers, dtype):
    xs, ts, es = [], [], []
    for n in range(n_workers):
        g = torch.Generator().manual_seed(100 * q + n)
        xs.append(torch.randn(S, B, DIM, generator=g, dtype=dtype) + n)
        ts.append(torch.rand(S, B, generator=g, dtype=dtype) * 0.9 + 0.05)
        es.append(torch.randn(S, B, DIM, generator=g, dtype=dtype))
    return torch.stack(xs), torch.stack(ts), torch.stack(es)


def _masks(params, ratios, q, policy="random"):
    gens = [torch.Generator().manual_seed(10_000 + 100 * q + n) for n in range(len(ratios))]
    return build_masks(params, policy, ratios, gens)


def _noisy_state(params, n, seed=0):
    """Legacy-format stacked Adam state with large moments everywhere (kept from earlier
    rounds), so that a kept state really is exercised."""
    g = torch.Generator().manual_seed(seed)
    return {
        "m": {k: torch.randn(n, *v.shape, generator=g, dtype=v.dtype) for k, v in params.items()},
        "v": {k: torch.rand(n, *v.shape, generator=g, dtype=v.dtype) for k, v in params.items()},
        "step": torch.arange(n) + 3,
    }


def _assert_equal_dicts(got, want, what):
    assert list(got) == list(want), what
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), f"{what} {k}"


STRATEGIES = [("vmap", None), ("chunked", 2), ("sequential", None), ("auto", None)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize(("strategy", "chunk"), STRATEGIES)
def test_run_round_is_bit_identical_to_the_pre_refactor_engine(strategy, chunk, optimizer, keep,
                                                               dtype):
    model = _model(0, dtype)
    loss_fn = make_loss_fn(model, tiny_loss)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    ratios = [0.9, 0.75, 0.5, 0.3, 0.3]
    old_p, new_p, old_state, new_state = params, params, None, None
    uncovered = "zero" if keep else "keep"
    for q in range(3):
        masks = _masks(old_p, ratios, q, "topk" if q == 1 else "random")
        batches = _batches(q, len(ratios), dtype)
        old = legacy_run_round(old_p, masks, batches, loss_fn, lr=LR[optimizer], steps=S,
                               optimizer=optimizer, opt_state=old_state, strategy=strategy,
                               chunk_size=chunk, uncovered=uncovered)
        new = _new_run_round(new_p, masks, batches, loss_fn, optimizer, new_state, strategy,
                             chunk, uncovered)
        _assert_equal_dicts(new[0], old[0], f"round {q} params")
        _assert_equal_dicts(new[1], old[1], f"round {q} coverage")
        assert new[2] == old[2]
        _assert_equal_dicts(_new_named(new[3], params), _legacy_named(old[3]), f"round {q} state")
        assert torch.equal(new[4], old[4])
        old_p, new_p = old[0], new[0]
        if keep:
            old_state, new_state = old[3], new[3]
    if optimizer == "adam" and keep:
        assert int(old_state["step"][0]) == 3 * S  # the kept state really was carried


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize(("strategy", "chunk"), STRATEGIES)
def test_train_workers_with_a_leftover_state_is_bit_identical(strategy, chunk, optimizer, dtype):
    model = _model(1, dtype)
    loss_fn = make_loss_fn(model, tiny_loss)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    n = 3
    masks = _masks(params, [1.0, 0.5, 0.3], 0)
    batches = _batches(0, n, dtype)
    state = _noisy_state(params, n) if optimizer == "adam" else None
    old = legacy_train_workers(params, masks, batches, loss_fn, lr=LR[optimizer], steps=S,
                               optimizer=optimizer, opt_state=state, strategy=strategy,
                               chunk_size=chunk)
    new = _new_train_workers(params, masks, batches, loss_fn, optimizer,
                             state and _new_state_from_legacy(state, params), strategy, chunk)
    _assert_equal_dicts(new[0], old[0], "workers")
    _assert_equal_dicts(_new_named(new[1], params), _legacy_named(old[1]), "state")
    assert torch.equal(new[2], old[2])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_local_update_is_bit_identical(optimizer, with_state, dtype):
    model = _model(2, dtype)
    loss_fn = make_loss_fn(model, tiny_loss)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    mask = {k: v[0] for k, v in _masks(params, [0.6], 0).items()}
    batches = tuple(x[0] for x in _batches(0, 1, dtype))
    state = None
    if with_state and optimizer == "adam":
        state = {k: ({n: t[0] for n, t in v.items()} if isinstance(v, dict) else v[0])
                 for k, v in _noisy_state(params, 1).items()}
    old = legacy_local_update(params, mask, batches, loss_fn, lr=LR[optimizer], steps=S,
                              optimizer=optimizer, opt_state=state)
    new = _new_local_update(params, mask, batches, loss_fn, optimizer,
                            state and _new_state_from_legacy(state, params))
    _assert_equal_dicts(new[0], old[0], "theta")
    _assert_equal_dicts(_new_named(new[1], params), _legacy_named(old[1]), "state")
    assert torch.equal(new[2], old[2])


@pytest.mark.parametrize("strategy", ["vmap", "sequential"])
def test_a_dsm_round_of_the_score_mlp_is_bit_identical(strategy):
    """float32, a real score network and the DSM loss: the kernels of a practical run."""
    from fedscore import diffusion
    from fedscore.models import ScoreMLP

    model = ScoreMLP(dim=2, hidden=16, depth=1, time_dim=8)
    times = diffusion.time_grid("uniform", steps=20, T=1.0, delta=1e-2)

    def loss(net, batch):
        x0, t, eps = batch
        return diffusion.dsm_loss(lambda x, tt: net(x, tt), x0, t, eps)

    loss_fn = make_loss_fn(model, loss)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    n, g = 3, torch.Generator().manual_seed(0)
    x0 = torch.randn(n, S, 8, 2, generator=g)
    t, eps = diffusion.draw_noise(x0.reshape(-1, 2), times, generator=g)
    batches = (x0, t.reshape(n, S, 8), eps.reshape(n, S, 8, 2))
    masks = _masks(params, [1.0, 0.8, 0.75], 0, "topk")
    old = legacy_run_round(params, masks, batches, loss_fn, lr=1e-3, steps=S, optimizer="adam",
                           strategy=strategy)
    new = federated.run_round(params, masks, batches, loss_fn, federated.Adam(lr=1e-3),
                              steps=S, strategy=strategy)
    _assert_equal_dicts(new[0], old[0], "params")
    _assert_equal_dicts(_new_named(new[3], params), _legacy_named(old[3]), "state")
    assert torch.equal(new[4], old[4])

