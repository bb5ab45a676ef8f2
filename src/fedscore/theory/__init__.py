"""Theory (SPEC §4): the pruning paper's bounds evaluated term by term, the constants they
need measured on a federated run, and the report that sets the two side by side."""

from fedscore.theory.bounds import corollary1, corollary2, remark1, theorem1
from fedscore.theory.estimate import (
    Estimator,
    constants_from_metrics,
    estimate_round,
    gamma_star,
    pruning_w2,
)
from fedscore.theory.report import bound_report, load_params, run_bound
from fedscore.theory.result import Bound

__all__ = [
    "Bound",
    "Estimator",
    "bound_report",
    "constants_from_metrics",
    "corollary1",
    "corollary2",
    "estimate_round",
    "gamma_star",
    "load_params",
    "pruning_w2",
    "remark1",
    "run_bound",
    "theorem1",
]
