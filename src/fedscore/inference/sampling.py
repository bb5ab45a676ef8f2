"""One sampling driver for every experiment: a score function (one model, or K agents
combined by an aggregator) run from seeded noise.

Every sample set of an experiment starts from the same initial noise and generator state
for the same seed, so sets drawn from different models or aggregators are paired (their
differences are the models', not the noise's).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fedscore import diffusion
from fedscore.inference.aggregators import combine


def agents_score_fn(agents, labels: Tensor, aggregator: str, *, clip: bool = False):
    """The score of K agents (StackedAgents) combined by `aggregator` (FI paper; SPEC §3)
    with `labels` (B,) bound. Weighted aggregators use the agents' per-class counts of each
    sample's label; `mean` needs none. clip: each agent's denoised estimate clipped to
    [-1, 1] (diffusion.clip_denoised); the combination of clipped agents stays in range, its
    weights summing to one. The returned callable is the aggregator (the mixture's weights
    are read from it with `weights_now()`)."""
    bound = agents.with_labels(labels)
    if clip:
        bound = diffusion.clip_denoised(bound)
    weights = agents.weights_for(labels) if aggregator != "mean" else None
    return combine(bound, aggregator, weights=weights)


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
