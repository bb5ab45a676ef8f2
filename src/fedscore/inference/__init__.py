"""Federated inference (SPEC §3): K independently trained agents combined at every step.

The maths only: stacked agents, aggregators, diagnostics and the sampling driver. Agents as
run folders (train, load, sample, diagnose) are `fedscore.experiments.agents`."""

from fedscore.inference.agents import (
    REGIMES,
    StackedAgents,
    label_weights,
    read_class_counts,
)
from fedscore.inference.aggregators import (
    AGGREGATORS,
    HybridAggregator,
    MeanAggregator,
    MixtureAggregator,
    RouteAggregator,
    WeightedAggregator,
    combine,
    stack_scores,
    step_schedule,
)
from fedscore.inference.sampling import agents_score_fn, draw

__all__ = [
    "AGGREGATORS",
    "REGIMES",
    "HybridAggregator",
    "MeanAggregator",
    "MixtureAggregator",
    "RouteAggregator",
    "StackedAgents",
    "WeightedAggregator",
    "agents_score_fn",
    "combine",
    "draw",
    "label_weights",
    "read_class_counts",
    "stack_scores",
    "step_schedule",
]
