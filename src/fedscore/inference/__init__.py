"""Federated inference (SPEC §3): K independently trained agents combined at every step."""

from fedscore.inference.agents import (
    REGIMES,
    StackedAgents,
    label_weights,
    load_agents,
    read_class_counts,
    train_agents,
)
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
from fedscore.inference.experiment import (
    BUDGETS,
    diagnose_agents,
    reproduce_federated_inference,
    sample_agents,
)

__all__ = [
    "AGGREGATORS",
    "BUDGETS",
    "REGIMES",
    "HybridAggregator",
    "MeanAggregator",
    "MixtureAggregator",
    "StackedAgents",
    "WeightedAggregator",
    "combine",
    "diagnose_agents",
    "label_weights",
    "load_agents",
    "read_class_counts",
    "reproduce_federated_inference",
    "sample_agents",
    "stack_scores",
    "step_schedule",
    "train_agents",
]
