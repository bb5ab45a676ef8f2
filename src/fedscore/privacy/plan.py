"""A run's privacy plan: the config's `privacy:` section resolved against the run (workers,
rounds, local steps, batch and partition sizes) into what every party does and what the
accountant counts.

    mode client (DP-FedAvg):  each worker's update clipped to C over its kept coordinates
        (`clip`); noise N(0, (z C)^2) on eq. 8's sum of theta_n ⊙ m_n at every coordinate
        some worker kept (central: the server, `privatize`), or N(0, (z C)^2 / N) from each
        of the N workers on every coordinate (distributed: for secure aggregation, so that
        the sum carries the whole noise and the server never sees an un-noised sum).
        Accounting: one Gaussian mechanism per round, q = 1 (every worker trains every
        round), T = rounds done.
    mode sample (DP-SGD): each local step's gradient from clipped per-sample gradients plus
        N(0, (z C)^2) (`privacy.dpsgd`). Accounting per worker: q = B / n_worker,
        T = S * rounds done; the run's epsilon is the largest worker's.

z is `noise_multiplier`, or solved from `target_epsilon` for the planned rounds (for the
worker with the largest sampling rate in mode sample, so every worker meets the target).
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedscore.config import FederationConfig, RunConfig
from fedscore.errors import FedscoreError
from fedscore.federated.seeding import noise_seed
from fedscore.privacy.accountant import epsilon, noise_for
from fedscore.privacy.clip import (
    clip_kept,
    clip_rows,
    clip_update,
    gaussian_noise,
    seeded_generator,
)
from fedscore.privacy.dpsgd import DPSGD

log = logging.getLogger(__name__)
Params = dict[str, Tensor]
SERVER = -1  # the worker id of the server's central noise (`federated.seeding.noise_seed`)


@functools.lru_cache(maxsize=4096)
def _epsilon(z: float, q: float, steps: int, delta: float, accountant: str) -> float:
    return epsilon(z, q, steps, delta, accountant)


@dataclass(frozen=True)
class PrivacyPlan:
    """What the config's privacy section means for this run (`plan_for`)."""

    mode: str
    clip: float
    noise_multiplier: float  # z, given or solved
    delta: float
    noise: str  # central | distributed
    accountant: str
    noise_key: int
    workers: int  # N
    rounds: int  # Q, planned
    steps_per_round: int  # mechanisms per round: 1 (client), S (sample)
    sample_rates: tuple[float, ...]  # (q_round,) in mode client, one per worker in sample
    target_epsilon: float | None = None
    solved: bool = field(default=False)  # z solved from target_epsilon

    # ------------------------------------------------------------------ accounting

    def worker_epsilons(self, rounds_done: int) -> list[float]:
        """epsilon at delta after `rounds_done` rounds: one per worker in mode sample, one
        for the federation (every worker alike) in mode client."""
        steps = rounds_done * self.steps_per_round
        return [_epsilon(self.noise_multiplier, q, steps, self.delta, self.accountant)
                for q in self.sample_rates]

    def epsilon(self, rounds_done: int) -> float:
        """The run's epsilon after `rounds_done` rounds: the largest worker's."""
        return max(self.worker_epsilons(rounds_done))

    def record(self, rounds_done: int) -> dict:
        """The accountant's fields of a round's record."""
        eps = self.worker_epsilons(rounds_done)
        out = {"epsilon": max(eps), "delta": self.delta,
               "noise_multiplier": self.noise_multiplier, "clip": self.clip,
               "privacy_mode": self.mode}
        if self.mode == "sample":
            out["worker_epsilon"] = eps
        return out

    def summary(self) -> dict:
        """privacy.json of a run folder: the plan and the planned epsilon."""
        return {"mode": self.mode, "clip": self.clip, "noise_multiplier": self.noise_multiplier,
                "solved_from_target_epsilon": self.target_epsilon if self.solved else None,
                "delta": self.delta, "noise": self.noise, "accountant": self.accountant,
                "sample_rates": list(self.sample_rates),
                "steps_per_round": self.steps_per_round, "rounds": self.rounds,
                "planned_epsilon": self.epsilon(self.rounds)}

    # ------------------------------------------------------------------ the mechanism

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip

    def dpsgd(self, q: int, workers: Sequence[int]) -> DPSGD | None:
        """DP-SGD's step gradient for the workers of round q (mode sample), else None."""
        if self.mode != "sample":
            return None
        return DPSGD(self.clip, self.noise_multiplier, self.noise_key, q, tuple(workers))

    def privatize(self, q: int, sums: Params, counts: Params) -> Params:
        """Eq. 8's sums with the server's central noise N(0, (z C)^2) at every coordinate
        some worker kept (mode client, noise central); unchanged otherwise. The noise of
        round q comes from its own seed, drawn tensor by tensor in the model's order."""
        if self.mode != "client" or self.noise != "central":
            return sums
        g = seeded_generator(noise_seed(self.noise_key, q, SERVER))
        with torch.no_grad():
            return {k: torch.where(counts[k] > 0, v + gaussian_noise(v, self.noise_std, g), v)
                    for k, v in sums.items()}

    def worker_noise(self, q: int, worker: int, like: Tensor) -> Tensor:
        """Worker n's share of distributed noise, N(0, (z C)^2 / N) on every coordinate
        (pruned ones too: with secure aggregation the dense sum must carry the whole noise
        at every coordinate, whoever kept it)."""
        g = seeded_generator(noise_seed(self.noise_key, q, worker))
        return gaussian_noise(like, self.noise_std / math.sqrt(self.workers), g)

    @property
    def clips_updates(self) -> bool:
        return self.mode == "client"


def plan_for(cfg: RunConfig, sizes: Sequence[int] | None = None, steps: int | None = None
             ) -> PrivacyPlan | None:
    """The run's plan (None without `privacy`): sizes, the images each worker holds;
    steps, S (both needed in mode sample only: a Flower server plans mode client from the
    config alone). Solves z from target_epsilon when the config gives one; a target that
    cannot be met, or a batch larger than a worker's data in mode sample, is one error."""
    p = cfg.privacy
    if p is None:
        return None
    fed = cfg.federation
    if not isinstance(fed, FederationConfig):  # the config refuses it; a built one may not
        raise FedscoreError("privacy needs a federation section (`federation: none` given)")
    if p.mode == "client":
        rates, per_round = (1.0,), 1  # every worker trains every round
    elif sizes is None or steps is None:
        raise FedscoreError(
            "privacy mode sample is accounted per worker from its number of images: pass "
            "the workers' sizes and S (a server without data takes them from the replies)")
    else:
        small = [(n, s) for n, s in enumerate(sizes) if s < fed.batch_size]
        if small:
            n, s = small[0]
            raise FedscoreError(
                f"privacy mode sample: worker {n} holds {s} images, fewer than "
                f"federation.batch_size={fed.batch_size}, so its sampling rate B / n would "
                "exceed 1; lower federation.batch_size or use privacy.mode: client")
        rates, per_round = tuple(fed.batch_size / s for s in sizes), steps
    z, solved = p.noise_multiplier, False
    if z is None:
        z = noise_for(p.target_epsilon, max(rates), fed.rounds * per_round, p.delta,
                      p.accountant)
        solved = True
    return PrivacyPlan(mode=p.mode, clip=p.clip, noise_multiplier=z, delta=p.delta,
                       noise=p.noise, accountant=p.accountant, noise_key=noise_key(p),
                       workers=fed.workers, rounds=fed.rounds, steps_per_round=per_round,
                       sample_rates=rates, target_epsilon=p.target_epsilon, solved=solved)


def noise_key(p) -> int:
    """The key of this process's privacy noise (`federated.seeding.noise_seed` hashes it
    with the round, worker and step): `privacy.noise_seed` when set (reproducible, not
    private: warned), else a secret 62-bit key from the OS. Never the run seed: the config
    is public, and noise anyone can regenerate from it protects nothing."""
    if p.noise_seed is not None:
        log.warning("privacy.noise_seed is set: the noise is reproducible from the config, so "
                    "it is NOT private against anyone who has the config (tests only)")
        return int(p.noise_seed)
    return secrets.randbits(62)


# ---------------------------------------------------------------------- per transport


@dataclass
class RoundPrivacy:
    """One round of a plan as the in-process transport runs it: DP-SGD's gradient for the
    workers (mode sample), their clipped contributions (mode client) and their shares of
    distributed noise; afterwards `record()` has the round's clipped fraction."""

    plan: PrivacyPlan
    q: int
    workers: list[int]
    norms: Tensor | None = None
    dp: DPSGD | None = None

    def __post_init__(self):
        self.dp = self.plan.dpsgd(self.q, self.workers)

    def contribute(self, worker_flat: Tensor, theta_flat: Tensor, masks_flat: Tensor
                   ) -> Tensor:
        """`engine.round_sums`' contribute: each worker's model clipped (mode client)."""
        if not self.plan.clips_updates:
            return worker_flat
        clipped, self.norms = clip_rows(worker_flat, theta_flat, masks_flat, self.plan.clip)
        return clipped

    def add_worker_noise(self, sums: Params) -> Params:
        """The sum of every worker's share of distributed noise added to eq. 8's sums
        (what the dense secure-aggregation sum of their noised vectors carries)."""
        if self.plan.mode != "client" or self.plan.noise != "distributed":
            return sums
        with torch.no_grad():
            out = dict(sums)
            for n in self.workers:
                share = dense_noise(self.plan, self.q, n, sums)
                out = {k: v + share[k] for k, v in out.items()}
        return out

    def record(self) -> dict:
        if self.norms is not None:
            return {"clipped_fraction": float((self.norms > self.plan.clip).double().mean()),
                    "update_norm": self.norms.tolist()}
        if self.dp is not None:
            return {"clipped_fraction": self.dp.count.fraction}
        return {}


def dense_noise(plan: PrivacyPlan, q: int, worker: int, like: Params) -> Params:
    """Worker n's distributed noise share for every tensor, drawn from one generator in the
    model's order (one seed per (round, worker))."""
    g = seeded_generator(noise_seed(plan.noise_key, q, worker))
    std = plan.noise_std / math.sqrt(plan.workers)
    return {k: gaussian_noise(v, std, g) for k, v in like.items()}


# ---------------------------------------------------------------------- Flower


def client_contribution(plan: PrivacyPlan, q: int, worker: int, theta: Params,
                        theta_q: Params, mask: Params) -> tuple[Params, bool]:
    """What a Flower worker contributes under mode client, computed on the worker: its
    model clipped (`clip_update`) and, with distributed noise, its noise share added on
    EVERY coordinate (dense: for secure aggregation's sum of theta ⊙ m; pruned coordinates
    then carry noise only). Returns (the contribution, whether the update was clipped).
    Mode sample: (theta, False) unchanged (its noise is already in the steps)."""
    if not plan.clips_updates:
        return theta, False
    clipped, norm = clip_update(theta, theta_q, mask, plan.clip)
    if plan.noise == "distributed":
        share = dense_noise(plan, q, worker, clipped)
        clipped = {k: v + share[k] for k, v in clipped.items()}
    return clipped, norm > plan.clip


def clip_reply(plan: PrivacyPlan, kept: Params, masks: Params, theta_q: Params
               ) -> tuple[Params, bool]:
    """The server's clipping of one accepted Flower reply (mode client, noise central: the
    trusted server clips and adds the noise); kept values in mask order, as
    `flower.validate.Checked.kept`. Returns (kept values to add, whether clipped)."""
    if not plan.clips_updates or plan.noise != "central":
        return kept, False
    clipped, norm = clip_kept(kept, masks, theta_q, plan.clip)
    return clipped, norm > plan.clip
