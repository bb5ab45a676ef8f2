"""The in-process transport of the round loop: all N workers trained in this process by the
vectorised engine, which returns eq. 8's sums and counts over all of them
(`engine.round_sums`, reduced on the flat (N, D) matrix).

Masks and batches come from two callables (`masks_for(q, params)`, `batches_for(q)`) so the
transport knows nothing of data, seeds or configs; the caller (`federated.setup`) draws them
from per-(round, worker) seeds (batches per local step, as a `batches.RoundBatches` the
engine draws from step by step), as every SuperNode of a Flower run does for itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from fedscore.federated.engine import round_sums
from fedscore.federated.local import Batch, LossFn, leading_size
from fedscore.federated.loop import RoundOutcome
from fedscore.federated.optim import Optimizer
from fedscore.privacy.plan import RoundPrivacy

Params = dict[str, Tensor]


@dataclass
class InProcessTransport:
    """Eq. 7 for every worker in one process, then eq. 8's sums (`loop.Transport`).

    masks_for(q, theta_q) -> stacked masks name -> (N, *shape) bool; batches_for(q) -> the
    round's batches, sizes (N, S): a lazy `batches.RoundBatches` or a pre-drawn pytree
    (N, S, ...) (`engine.run_round`); opt: the workers' optimiser (eq. 7's SGD or masked Adam);
    keep_state: carry the workers' optimiser state (Adam moments) from round to round instead
    of starting fresh each round; opt_state: the state to start from (a resumed run's).
    samples_per_round: for the throughput in the log."""

    masks_for: Callable[[int, Params], Params]
    batches_for: Callable[[int], Batch]
    loss_fn: LossFn
    opt: Optimizer
    steps: int
    strategy: str = "auto"
    keep_state: bool = False
    opt_state: Any = None
    samples_per_round: int = 0
    privacy: Any = None  # a `privacy.PrivacyPlan`: DP-SGD in the steps (mode sample), each
    # worker's update clipped and distributed noise added (mode client); None: none
    keep_inputs: bool = False  # hand (masks, batches) to hooks (the theory estimator): the
    # batches as batches_for gave them, so a lazy source stays lazy (redrawn, not kept)

    def run_round(self, q: int, params: Params) -> RoundOutcome:
        t0 = time.perf_counter()
        masks = self.masks_for(q, params)
        batches = self.batches_for(q)
        n = leading_size(batches)
        private = RoundPrivacy(self.privacy, q, list(range(n))) if self.privacy else None
        sums, counts, state, losses = round_sums(
            params, masks, batches, self.loss_fn, self.opt, steps=self.steps,
            state=self.opt_state if self.keep_state else None, strategy=self.strategy,
            dp=private.dp if private else None,
            contribute=private.contribute if private else None,
        )
        self.opt_state = state if self.keep_state else None
        seconds = time.perf_counter() - t0
        record = {"samples_per_s": self.samples_per_round / seconds} if seconds > 0 else {}
        if private is not None:
            sums = private.add_worker_noise(sums)
            record |= private.record()
        return RoundOutcome(
            sums=sums, counts=counts, masks=masks, workers=list(range(n)),
            worker_loss=losses.mean(dim=1).tolist(), record=record,
            inputs=(masks, batches) if self.keep_inputs else None, opt_state=self.opt_state,
        )
