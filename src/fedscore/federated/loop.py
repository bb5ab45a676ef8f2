"""The round loop of SPEC §2, written once for every engine (DESIGN: one loop, several
transports).

Round q: a *transport* turns theta_q into eq. 8's running sums and counts over the workers
that answered — the in-process engine trains every worker itself (`federated.inprocess`),
the Flower ServerApp pushes theta_q to SuperNodes and adds each validated reply into the
sums (`flower.transport`). The loop then finishes eq. 8 (`aggregate.finish`), records the
round's pruning statistics (`aggregate.round_stats`) and Gamma*, refuses a non-finite
model, and hands the round to its hooks in order: held-out eq. 9, the theory estimator,
progress, the run folder's log and checkpoint. Hooks are plain callables of one
`RoundEvent`; they add keys to `event.record`; the loop never touches files.

Nothing here knows about data, models, configs or Flower: tensors and callables in,
tensors out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from fedscore.errors import DivergenceError
from fedscore.federated.aggregate import finish, round_stats

Params = dict[str, Tensor]


@dataclass
class RoundOutcome:
    """What a transport returns for one round.

    sums, counts: eq. 8's sum over the answering workers of theta_{q,n,S} ⊙ m_{q,n} and
        |N_q^(i)| per coordinate (name -> tensor shaped like the parameter); None when the
        round must leave the model unchanged (too few replies).
    masks: the answering workers' m_{q,n} (stacked name -> (n, *shape) bool, or a list of
        dicts), for the round's pruning statistics.
    workers: the answering workers' ids, in the order of `worker_loss` and `masks`.
    worker_loss: each answering worker's mean local loss over its S steps.
    record: transport-specific fields for the round's log line (replies, failures,
        bytes, throughput, ...).
    inputs: what the workers were given, for hooks that recompute gradients (the theory
        estimator): (masks, batches) stacked over all workers; None when the transport
        never sees them (Flower: the data stay on the SuperNodes).
    opt_state: the workers' optimiser state after the round when the transport keeps it
        (the in-process engine with `adam_state: keep`), to be checkpointed.
    """

    sums: Params | None
    counts: Params | None
    masks: Any
    workers: list[int]
    worker_loss: list[float]
    record: dict = field(default_factory=dict)
    inputs: tuple | None = None
    opt_state: Any = None


class Privacy(Protocol):
    """Differential privacy's step of the loop (`privacy.PrivacyPlan`): noise on eq. 8's
    sums before they are divided, and the accountant's fields of each round's record."""

    def privatize(self, q: int, sums: Params, counts: Params) -> Params: ...

    def record(self, rounds_done: int) -> dict: ...


class Transport(Protocol):
    """Turns theta_q into one round's `RoundOutcome` (eq. 7 on the workers, the first half
    of eq. 8: sums and counts)."""

    def run_round(self, q: int, params: Params) -> RoundOutcome: ...


@dataclass
class RoundEvent:
    """One finished round as hooks see it. `record` is the round's log line: hooks add to
    it; the run folder's hook writes it."""

    q: int  # 0-based round index: theta_q -> theta_{q+1}
    rounds: int  # Q
    before: Params  # theta_q
    params: Params  # theta_{q+1}
    outcome: RoundOutcome
    gamma_star: int | None
    record: dict


RoundHook = Callable[[RoundEvent], None]


@dataclass
class LoopResult:
    params: Params
    gamma_star: int | None
    last: dict | None  # the last round's record (None when no round ran)


def run_rounds(
    params: Params,
    transport: Transport,
    *,
    rounds: int,
    start: int = 0,
    gamma_star: int | None = None,
    uncovered: str = "keep",
    hooks: Sequence[RoundHook] = (),
    diverged_hint: str | Callable[[], str] = "",
    privacy: Privacy | None = None,
) -> LoopResult:
    """Rounds start..rounds-1 of eqs. 7-8 over `transport`; returns theta_Q and Gamma*.

    params: theta_start; gamma_star: Gamma* over the rounds already run (None: none yet);
    uncovered: what eq. 8 does with a coordinate no answering worker kept ("keep" theta_q's
    value, "zero", "error"); hooks: called in order after every round; diverged_hint: the
    end of the error message when a worker's loss or the new model is not finite (e.g.
    where the last good checkpoint is and which setting to lower), or a callable giving it
    at that moment (the good checkpoint changes as rounds are saved); privacy: differential
    privacy's noise on the sums (central DP-FedAvg) and epsilon in every round's record
    (`privacy.PrivacyPlan`), the one place either happens for every transport."""
    record = None
    for q in range(start, rounds):
        t0 = time.perf_counter()
        out = transport.run_round(q, params)
        record = {"round": q + 1}
        before = params
        if out.sums is not None:
            if privacy is not None:  # eq. 8's sums are released noised, then divided
                out.sums = privacy.privatize(q, out.sums, out.counts)
            new, coverage = finish(params, out.sums, out.counts, uncovered)
            diverged(q, out, new, diverged_hint)
            stats = round_stats(params, out.masks, coverage)  # w^2 of theta_q
            params = new
            gamma_star = (stats["min_coverage"] if gamma_star is None
                          else min(gamma_star, stats["min_coverage"]))
            loss = sum(out.worker_loss) / len(out.worker_loss)
            record |= {"loss": loss, "worker_loss": list(out.worker_loss), **stats}
        else:
            record |= {"loss": float("nan"), "note": "too few replies: model unchanged"}
        record |= out.record
        if privacy is not None:  # every round counts, even one whose replies were too few
            record |= privacy.record(q + 1)
        record["gamma_star"] = gamma_star
        record["seconds"] = time.perf_counter() - t0
        event = RoundEvent(q=q, rounds=rounds, before=before, params=params, outcome=out,
                           gamma_star=gamma_star, record=record)
        for hook in hooks:
            hook(event)
    return LoopResult(params, gamma_star, record)


def diverged(q: int, out: RoundOutcome, new: Params, hint: str | Callable[[], str]) -> None:
    """Refuse a non-finite theta_{q+1}: a DivergenceError naming the cause (workers whose
    local loss was not finite, or parameters that overflowed in the update) and the hint.
    Nothing after this point (hooks, checkpoints) ever sees a non-finite model."""
    bad_loss = [n for n, v in zip(out.workers, out.worker_loss) if not math.isfinite(v)]
    bad_params = [k for k, v in new.items() if not bool(torch.isfinite(v).all())]
    if not bad_loss and not bad_params:
        return
    hint = hint() if callable(hint) else hint
    if bad_loss:
        cause = f"worker(s) {bad_loss} produced a non-finite local loss"
    else:
        cause = (f"the parameters became non-finite ({bad_params[0]!r}, ...) although every "
                 "local loss was finite: the update overflowed")
    raise DivergenceError(
        f"federated training diverged in round {q + 1}: {cause}. {hint}".rstrip())
