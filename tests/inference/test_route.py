"""`route`: each sample follows one agent, drawn once with probability pi — the exact
mixture at one agent evaluation per sample per step (issue 17, item 1)."""

import pytest
import torch

from fedscore import diffusion, inference, toy
from fedscore.errors import FedscoreError
from fedscore.inference.agents import StackedAgents
from fedscore.inference.sampling import agents_score_fn
from fedscore.models.mlp import ScoreMLP

GM = toy.preset("two-clients")  # client 0: modes at x = -3; client 1: modes at x = +3
A, B = GM.components([0, 1]), GM.components([2, 3])


class Counted:
    """A score function that counts the samples it is evaluated on (and remembers which
    batch it saw, by its x's rows)."""

    def __init__(self, fn):
        self.fn, self.samples, self.calls = fn, 0, 0

    def __call__(self, x, t):
        self.samples += x.shape[0]
        self.calls += 1
        return self.fn(x, t)


def draw(score_fn, n, steps=40, method="exp-integrator", seed=0):
    times = diffusion.time_grid("exponential", steps, T=6.0, delta=1e-3)
    g = torch.Generator().manual_seed(seed)
    return diffusion.sample(score_fn, torch.randn(n, 2, generator=g), times, method, g)


def test_route_puts_each_clients_share_in_its_modes_at_one_evaluation_per_sample_step():
    n, steps = 3000, 40
    a, b = Counted(A.score), Counted(B.score)
    route = inference.combine([a, b], "route", weights=[0.7, 0.3],
                              generator=torch.Generator().manual_seed(1))
    x = draw(route, n, steps)
    in_a = float((x[:, 0] < 0).double().mean())
    assert abs(in_a - 0.70) <= 0.03, in_a
    assert abs(1 - in_a - 0.30) <= 0.03
    # every sample evaluated by exactly one agent at every step: n * steps in all
    assert a.samples + b.samples == n * steps == route.evaluations
    assert a.samples == int((route.assignment == 0).sum()) * steps
    # and the samples routed to A are where A's data are
    assert bool((x[route.assignment == 0, 0] < 0).all())
    assert bool((x[route.assignment == 1, 0] > 0).all())


def test_route_samples_the_pooled_mixture_with_a_deterministic_sampler_too():
    # routing needs no noise to track anything: pf-ode-heun (two evaluations per step) keeps
    # each sample on its agent, the corrector's evaluation included
    seen = {0: [], 1: []}

    def watch(i, fn):
        def f(x, t):
            seen[i].append(x.shape[0])
            return fn(x, t)
        return f

    route = inference.combine([watch(0, A.score), watch(1, B.score)], "route",
                              weights=[0.6, 0.4], generator=torch.Generator().manual_seed(2))
    x = draw(route, 2000, steps=30, method="pf-ode-heun")
    n_a = int((route.assignment == 0).sum())
    assert seen[0] == [n_a] * 60 and seen[1] == [2000 - n_a] * 60
    freq = torch.bincount(GM.responsibilities(x, 0.0).argmax(1), minlength=4).double() / 2000
    assert torch.allclose(freq, GM.weights, atol=0.03), freq


def test_per_sample_weights_route_each_sample_by_its_own_row():
    w = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5)  # e.g. per-class counts of a label
    route = inference.combine([A.score, B.score], "route", weights=w,
                              generator=torch.Generator().manual_seed(0))
    x = draw(route, 10, steps=20)
    assert route.assignment.tolist() == [0] * 5 + [1] * 5
    assert bool((x[:5, 0] < 0).all()) and bool((x[5:, 0] > 0).all())


def test_the_assignment_is_redrawn_per_sampling_call_and_kept_within_one():
    route = inference.combine([A.score, B.score], "route", weights=[0.5, 0.5],
                              generator=torch.Generator().manual_seed(3))
    draw(route, 50, steps=5)
    first = route.assignment.clone()
    draw(route, 80, steps=5)  # another sampling call, another batch size: a fresh draw
    assert route.assignment.shape == (80,)
    assert not torch.equal(route.assignment[:50], first)
    with pytest.raises(FedscoreError, match="evaluate the whole batch at once"):
        route(torch.zeros(7, 2), torch.ones(7))  # a chunk of the batch, outside a sampler
    route.reset()
    assert route(torch.zeros(7, 2), torch.ones(7)).shape == (7, 2)


def test_a_stacked_callable_is_evaluated_whole_and_counted_so():
    def stacked(x, t):
        return torch.stack([A.score(x, t), B.score(x, t)])

    route = inference.combine(stacked, "route", weights=[0.7, 0.3],
                              generator=torch.Generator().manual_seed(0))
    x, t = torch.randn(6, 2), torch.full((6,), 0.5)
    route.assign(2)
    with pytest.raises(FedscoreError, match="assigned 2 samples"):
        route(x, t)
    route.assign(6)
    out = route(x, t)
    pick = torch.stack([A.score(x, t), B.score(x, t)])[route.assignment, torch.arange(6)]
    assert torch.allclose(out, pick)
    assert route.evaluations == 2 * 6  # K agents on every sample: pass a list to save that


def test_agents_score_fn_routes_stacked_networks_one_agent_per_sample_with_its_label():
    torch.manual_seed(0)
    nets = [ScoreMLP(dim=2, hidden=16, depth=2, num_classes=4) for _ in range(3)]
    counts = torch.tensor([[5, 5, 0, 0], [0, 5, 5, 0], [0, 0, 5, 5]])
    agents = StackedAgents(nets[0], nets, "eps", counts=counts)
    labels = torch.tensor([0, 1, 2, 3, 1, 2, 0, 3])
    route = agents_score_fn(agents, labels, "route",
                            generator=torch.Generator().manual_seed(0))
    x, t = torch.randn(8, 2), torch.full((8,), 0.7)
    route.assign(8)
    out = route(x, t)
    # a label held by one agent only goes to that agent; label 1 to agent 0 or 1
    assert route.assignment[[0, 6]].tolist() == [0, 0]
    assert route.assignment[[3, 7]].tolist() == [2, 2]
    assert set(route.assignment[[1, 4]].tolist()) <= {0, 1}
    every = agents.with_labels(labels)(x, t)  # (K, B, 2): all agents on all rows
    assert torch.allclose(out, every[route.assignment, torch.arange(8)], atol=1e-6)
    assert route.evaluations == 8
