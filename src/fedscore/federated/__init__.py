"""Federated training with arbitrary pruning (SPEC §2, the pruning paper's eqs. 7-8).

masks -> local update (eq. 7) -> aggregate (eq. 8), each a pure function on param dicts;
`run_round` runs one round for N workers stacked on a leading axis.
"""

from fedscore.federated.aggregate import (
    UNCOVERED,
    aggregate,
    finish,
    masked_sums,
    merge_sums,
    round_stats,
)
from fedscore.federated.engine import STRATEGIES, choose_strategy, run_round, train_workers
from fedscore.federated.levels import LEVELS, level_ratios
from fedscore.federated.local import (
    OPTIMIZERS,
    apply_update,
    init_opt_state,
    local_update,
    make_loss_fn,
)
from fedscore.federated.masks import POLICIES, build_masks, kept_count, make_mask

__all__ = [
    "LEVELS",
    "OPTIMIZERS",
    "POLICIES",
    "STRATEGIES",
    "UNCOVERED",
    "aggregate",
    "apply_update",
    "build_masks",
    "choose_strategy",
    "finish",
    "init_opt_state",
    "kept_count",
    "level_ratios",
    "local_update",
    "make_loss_fn",
    "make_mask",
    "masked_sums",
    "merge_sums",
    "round_stats",
    "run_round",
    "train_workers",
]
