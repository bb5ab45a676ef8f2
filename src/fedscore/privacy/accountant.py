"""Privacy accounting with Opacus' accountants (never by hand): epsilon at delta after a
number of steps of the subsampled Gaussian mechanism, and the noise multiplier z that meets
a target epsilon.

    epsilon(z, q, T, delta)  Opacus `RDPAccountant` (Mironov 2017; Mironov, Talwar, Zhang
                             2019) or `PRVAccountant` (Gopi, Lee, Wutschitz 2021), history
                             [(z, q, T)]: T compositions of the Poisson-subsampled Gaussian
                             mechanism with sampling rate q and noise multiplier z;
    noise_for(eps, q, T, delta)  `opacus.accountants.utils.get_noise_multiplier` (a bisection
                             over the same accountant).

What T and q are in fedscore (`privacy.plan`):
  mode client (DP-FedAvg): one mechanism per ROUND on eq. 8's sum, q = workers that train
      per round / workers (every worker trains every round: q = 1, no amplification);
  mode sample (DP-SGD): one mechanism per LOCAL STEP of a worker, q = B / n_worker,
      T = S * Q; each worker's epsilon is for an example of its own data (the workers hold
      disjoint data; eq. 8 and everything after it is post-processing).

Opacus assumes Poisson subsampling; fedscore draws fixed-size batches (with replacement,
`federated.batches`), the usual practice in DP-SGD code, whose amplification the Poisson
analysis only approximates (docs/privacy.md says so).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedscore.errors import FedscoreError, unknown

ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}
EPSILON_TOLERANCE = 0.01
"""Bisection tolerance of `noise_for`: the z found gives target - 0.01 <= epsilon <= target."""


def _quiet() -> None:
    """Inside catch_warnings: PRV at q = 1 takes log(0) on its way to the plain Gaussian
    (harmless); RDP warns when its largest default order is the best one, i.e. its epsilon
    is an upper bound that more orders could tighten (conservative; docs/privacy.md)."""
    warnings.simplefilter("ignore", RuntimeWarning)
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """epsilon at `delta` after `steps` compositions of the subsampled Gaussian mechanism
    (noise multiplier z, sampling rate q) by Opacus' accountant; 0.0 for no step, inf for
    z = 0 (no noise: no guarantee)."""
    if accountant not in ACCOUNTANTS:
        raise unknown("privacy accountant", accountant, ACCOUNTANTS)
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = ACCOUNTANTS[accountant]()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        _quiet()
        return float(acc.get_epsilon(delta=float(delta)))


def noise_for(target_epsilon: float, sample_rate: float, steps: int, delta: float,
              accountant: str = "rdp") -> float:
    """The noise multiplier z whose epsilon after `steps` at `delta` is at most
    `target_epsilon` (within EPSILON_TOLERANCE below it): Opacus' get_noise_multiplier."""
    if accountant not in ACCOUNTANTS:
        raise unknown("privacy accountant", accountant, ACCOUNTANTS)
    try:
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            _quiet()
            return float(get_noise_multiplier(
                target_epsilon=float(target_epsilon), target_delta=float(delta),
                sample_rate=float(sample_rate), steps=int(steps), accountant=accountant,
                epsilon_tolerance=EPSILON_TOLERANCE))
    except ValueError as err:  # Opacus: "The privacy budget is too low."
        raise FedscoreError(
            f"privacy.target_epsilon={target_epsilon} at delta={delta} cannot be met over "
            f"{steps} steps at sampling rate {sample_rate:.4g} ({err}); raise the target, "
            "or lower the rounds / local steps") from None
