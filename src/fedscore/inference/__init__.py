"""Federated inference (SPEC §3): K independently trained agents combined at every step."""

from fedscore.inference.aggregators import (
    AGGREGATORS,
    HybridAggregator,
    MeanAggregator,
    MixtureAggregator,
    WeightedAggregator,
    combine,
    stack_scores,
    step_schedule,
)

__all__ = [
    "AGGREGATORS",
    "HybridAggregator",
    "MeanAggregator",
    "MixtureAggregator",
    "WeightedAggregator",
    "combine",
    "stack_scores",
    "step_schedule",
]
