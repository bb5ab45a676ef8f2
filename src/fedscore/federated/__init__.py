"""Federated training with arbitrary pruning (SPEC §2, the pruning paper's eqs. 7-8).

masks -> local update (eq. 7, an `Optimizer`'s steps) -> aggregate (eq. 8), each a pure
function on param dicts; `run_round` runs one round for N workers stacked on a leading axis,
`round_sums` stops at eq. 8's (sums, counts) for a round loop that finishes it itself.
`RoundBatches` draws a round's mini-batches and noise one local step at a time.
"""

from fedscore.federated.aggregate import (
    UNCOVERED,
    aggregate,
    finish,
    masked_sums,
    merge_sums,
    round_stats,
)
from fedscore.federated.batches import RoundBatches
from fedscore.federated.engine import (
    STRATEGIES,
    choose_strategy,
    round_sums,
    run_round,
    train_workers,
)
from fedscore.federated.levels import LEVELS, level_ratios
from fedscore.federated.local import local_update, make_loss_fn
from fedscore.federated.masks import POLICIES, build_masks, kept_count, make_mask
from fedscore.federated.optim import (
    OPTIMIZERS,
    SGD,
    Adam,
    Optimizer,
    make_optimizer,
    state_from_tensors,
    state_to_tensors,
)

__all__ = [
    "LEVELS",
    "OPTIMIZERS",
    "POLICIES",
    "SGD",
    "STRATEGIES",
    "UNCOVERED",
    "Adam",
    "Optimizer",
    "RoundBatches",
    "aggregate",
    "build_masks",
    "choose_strategy",
    "finish",
    "kept_count",
    "level_ratios",
    "local_update",
    "make_loss_fn",
    "make_mask",
    "make_optimizer",
    "masked_sums",
    "merge_sums",
    "round_stats",
    "round_sums",
    "run_round",
    "state_from_tensors",
    "state_to_tensors",
    "train_workers",
]
