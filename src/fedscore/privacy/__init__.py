"""Differential privacy for the silos (issue 19): DP-FedAvg (mode client: each worker's
update clipped over its kept coordinates, Gaussian noise on eq. 8's sum, central or
distributed) and DP-SGD (mode sample: clipped per-sample gradients plus noise in eq. 7's
local steps), accounted by Opacus' accountants (docs/privacy.md).

Pure functions (`clip`, `accountant`, `dpsgd`) and the run's plan (`plan`): what the round
loop (`privatize`, `record`), the in-process transport (`RoundPrivacy`) and a Flower worker
or server (`client_contribution`, `clip_reply`) call.
"""

from fedscore.privacy.accountant import ACCOUNTANTS, epsilon, noise_for
from fedscore.privacy.clip import clip_kept, clip_rows, clip_update, gaussian_noise
from fedscore.privacy.dpsgd import DPSGD, per_sample_clipped_sum
from fedscore.privacy.plan import (
    PrivacyPlan,
    RoundPrivacy,
    client_contribution,
    clip_reply,
    dense_noise,
    plan_for,
)

__all__ = [
    "ACCOUNTANTS",
    "DPSGD",
    "PrivacyPlan",
    "RoundPrivacy",
    "client_contribution",
    "clip_kept",
    "clip_reply",
    "clip_rows",
    "clip_update",
    "dense_noise",
    "epsilon",
    "gaussian_noise",
    "noise_for",
    "per_sample_clipped_sum",
    "plan_for",
]
