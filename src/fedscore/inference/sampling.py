"""One sampling driver for every experiment: a score function (one model, or K agents
combined by an aggregator) run from seeded noise.

Every sample set of an experiment starts from the same initial noise and generator state
for the same seed, so sets drawn from different models or aggregators are paired (their
differences are the models', not the noise's).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from fedscore import diffusion
from fedscore.errors import FedscoreError
from fedscore.inference.agents import StackedAgents
from fedscore.inference.aggregators import combine


def agents_score_fn(agents, labels: Tensor, aggregator: str, *, clip: bool = False,
                    generator: torch.Generator | None = None):
    """The score of K agents (StackedAgents) combined by `aggregator` (FI paper; SPEC §3)
    with `labels` (B,) bound. Weighted aggregators (all but `mean`) use the agents' per-class
    counts of each sample's label. clip: the denoised estimate clipped to [-1, 1]
    (diffusion.clip_denoised): for `mixture` the combined score is clipped and the weights
    are tracked with the unclipped agents' scores (a clipped field is not a gradient, so
    tracking it would not give log q_t^i); for `route` each sample's one agent is clipped;
    for the others each agent is clipped, and their combination stays in range. `route`
    evaluates each agent only on the samples routed to it (its labels with them), drawing
    the routes from `generator`. The returned callable is the aggregator (the mixture's
    weights are read from it with `weights_now()`, route's assignment from `assignment`).

    labels None (unconditional agents): `mean`, `mixture` and `route` need no label; the
    latter two take the agents' sizes (their class counts summed) as prior weights pi, or
    uniform ones when the agents carry no counts. `weighted` and `hybrid` weight each
    sample by the agents' counts of its label, so they refuse unconditional agents."""
    weights = label_free_weights(agents, aggregator) if labels is None else (
        agents.weights_for(labels) if aggregator != "mean" else None)
    if aggregator == "route":
        singles = _single_agents(agents)
        fns = (agents.with_labels(labels) if singles is None
               else [_OneAgent(one, labels) for one in singles])
        return combine(fns, "route", weights=weights, generator=generator, clip=clip)
    bound = agents.with_labels(labels)
    if aggregator == "mixture":
        return combine(bound, "mixture", weights=weights, clip=clip)
    if clip:
        bound = diffusion.clip_denoised(bound)
    return combine(bound, aggregator, weights=weights)


def label_free_weights(agents, aggregator: str) -> Tensor | None:
    """(K,) prior weights of unconditional agents: their sizes (summed class counts), or
    None (uniform) when they carry none; a FedscoreError for the label-weighted
    aggregators."""
    if aggregator in ("weighted", "hybrid"):
        raise FedscoreError(
            f"the {aggregator!r} aggregator weights each sample by the agents' counts of its "
            "label, but these agents are unconditional (no labels); use mean, mixture or route"
        )
    if aggregator == "mean":
        return None
    counts = getattr(agents, "counts", None)  # also through runs.sampling.OnDevice
    if counts is None:
        return None
    sizes = torch.as_tensor(counts, dtype=torch.float64).sum(1)
    return sizes if bool((sizes > 0).any()) else None


def _single_agents(agents) -> list | None:
    """Each of stacked agents as a one-agent StackedAgents (its parameters are views of the
    stack's, not copies), wrapped as `agents` is when it wraps one (runs.sampling.OnDevice:
    `.score` and `.runtime`); None for anything else (route then evaluates the whole
    stack)."""
    inner = agents if isinstance(agents, StackedAgents) else getattr(agents, "score", None)
    if not isinstance(inner, StackedAgents):
        return None
    singles = [StackedAgents(inner.model, {k: v[i : i + 1] for k, v in inner.params.items()},
                             inner.parameterisation, strategy="sequential")
               for i in range(inner.n_agents)]
    if inner is not agents:
        singles = [type(agents)(one, agents.runtime) for one in singles]
    return singles


class _OneAgent:
    """One agent (a one-agent StackedAgents, or a wrapper of one) as a score function of the
    batch rows routed to it: `for_rows(idx)` binds those rows' labels (route calls it)."""

    def __init__(self, agent, labels: Tensor | None):
        self.agent, self.labels = agent, labels

    def for_rows(self, rows: Tensor) -> _OneAgent:
        labels = None if self.labels is None else self.labels[rows.to(self.labels.device)]
        return _OneAgent(self.agent, labels)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.agent.with_labels(self.labels)(x, t)[0]


ROUTE_STREAM = 0x726F757465  # b"route": names the assignment's stream in route_generator


def route_generator(seed: int) -> torch.Generator:
    """The generator of `route`'s sample -> agent assignment for the sampling seed `seed`
    (`fedscore agents sample` and its Flower server draw it so, hence the same assignment).
    It is a stream of its own, not `draw`'s generator: the prior noise and every step's
    noise stay those of the other aggregators with the same seed (paired samples, see the
    module docstring), and the assignment is not computed from the very random numbers that
    made x_T (a generator seeded `seed` again would be). Its seed is numpy's SeedSequence of
    (seed, ROUTE_STREAM): the same integer on every machine."""
    mixed = np.random.SeedSequence([int(seed), ROUTE_STREAM]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) >> 1)  # 63 bits: manual_seed's range


def draw(score_fn: Callable, n: int, shape: tuple[int, ...], times: Tensor, method: str,
         seed: int, *, clip: bool = False, progress: bool = False) -> Tensor:
    """(n, *shape) samples by `method` on the forward-time grid `times` (T first), from
    prior noise drawn with a generator seeded `seed` that then drives the sampler's own
    noise. clip: the denoised estimate clipped to [-1, 1] at every step (for a single
    model; agents clip each agent's estimate in `agents_score_fn` instead)."""
    g = torch.Generator().manual_seed(seed)
    x_T = diffusion.prior((n, *shape), generator=g)
    fn = diffusion.clip_denoised(score_fn) if clip else score_fn
    return diffusion.sample(fn, x_T, times, method, generator=g, progress=progress)
