"""The one round loop (`federated.loop.run_rounds`): over the in-process transport it is the
engine's `run_round` repeated; it tracks Gamma*, leaves the model alone on a round without
enough replies, calls its hooks in order and refuses a non-finite model."""

import math

import pytest
import torch

from fedscore import federated
from fedscore.errors import DivergenceError
from fedscore.federated.inprocess import InProcessTransport
from fedscore.federated.loop import RoundOutcome, run_rounds


def quadratic_loss(params, batch):
    """f_n(theta) = mean ||theta - x||^2 over the batch rows x."""
    return ((params["w"][None] - batch) ** 2).sum(-1).mean() + (params["b"] ** 2).sum()


def setup(n=4, steps=3, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(d, generator=g), "b": torch.randn(2, generator=g)}
    ratios = [1.0, 1.0, 0.5, 0.5][:n]

    def masks_for(q, theta):
        gens = [torch.Generator().manual_seed(100 * q + i) for i in range(n)]
        return federated.build_masks(theta, "topk", ratios, gens)

    def batches_for(q):
        return torch.randn(n, steps, 5, d, generator=torch.Generator().manual_seed(q))

    return params, masks_for, batches_for


def test_in_process_rounds_equal_the_engines_round_repeated():
    params, masks_for, batches_for = setup()
    sgd = federated.SGD(lr=0.1)
    transport = InProcessTransport(masks_for, batches_for, quadratic_loss, sgd, steps=3,
                                   strategy="vmap")
    out = run_rounds(params, transport, rounds=3)
    theta, gamma = params, None
    for q in range(3):
        theta, _, stats, _, _ = federated.run_round(
            theta, masks_for(q, theta), batches_for(q), quadratic_loss, sgd, steps=3,
            strategy="vmap")
        gamma = stats["min_coverage"] if gamma is None else min(gamma, stats["min_coverage"])
    for k in params:
        assert torch.equal(out.params[k], theta[k]), k  # the same sums, finish and bits
    assert out.gamma_star == gamma == 2  # two workers keep everything
    assert out.last["round"] == 3 and len(out.last["worker_loss"]) == 4


def test_hooks_see_every_round_in_order_and_may_add_to_the_record():
    params, masks_for, batches_for = setup()
    transport = InProcessTransport(masks_for, batches_for, quadratic_loss,
                                   federated.SGD(lr=0.1), steps=3)
    seen = []

    def first(e):
        e.record["mark"] = e.q

    def second(e):
        seen.append((e.q, e.record["mark"], e.record["round"], e.before is not e.params))

    run_rounds(params, transport, rounds=4, start=1, hooks=[first, second])
    assert seen == [(1, 1, 2, True), (2, 2, 3, True), (3, 3, 4, True)]


class Scripted:
    """A transport whose rounds are given: a normal round, a round without replies."""

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)

    def run_round(self, q, params):
        return self.outcomes[q]


def full_round(params, value, loss=1.0, workers=(0, 1)):
    n = len(workers)
    return RoundOutcome(
        sums={k: torch.full_like(v, value * n) for k, v in params.items()},
        counts={k: torch.full(v.shape, n, dtype=torch.long) for k, v in params.items()},
        masks={k: torch.ones((n, *v.shape), dtype=torch.bool) for k, v in params.items()},
        workers=list(workers), worker_loss=[loss] * n)


def test_a_round_without_enough_replies_leaves_the_model_and_gamma_star_alone():
    params = {"w": torch.zeros(3)}
    empty = RoundOutcome(sums=None, counts=None, masks=[], workers=[], worker_loss=[],
                         record={"replies": 0})
    out = run_rounds(params, Scripted([full_round(params, 2.0), empty]), rounds=2)
    assert torch.equal(out.params["w"], torch.full((3,), 2.0))
    assert out.gamma_star == 2
    assert math.isnan(out.last["loss"]) and out.last["replies"] == 0
    assert "model unchanged" in out.last["note"]


def test_a_non_finite_worker_loss_stops_the_run_with_the_hint():
    params = {"w": torch.zeros(3)}
    bad = full_round(params, 1.0, loss=float("nan"))
    with pytest.raises(DivergenceError, match=r"round 1: worker\(s\) \[0, 1\].*lower the lr"):
        run_rounds(params, Scripted([bad]), rounds=1, diverged_hint="lower the lr")
