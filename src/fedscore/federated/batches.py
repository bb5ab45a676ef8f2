"""A round's mini-batches drawn one local step at a time (eq. 7's xi_{q,n,s}).

Eq. 7 takes S steps on each of N workers, step s on a fresh mini-batch of worker n's data
with its DSM noise (t, eps). Drawn a whole round ahead as tensors (N, S, B, ...) that is
N * S * B images twice (x0 and eps): 6.2 GB per round at the pruning paper's CIFAR-10
shape (10 workers, S = 196, B = 128). `RoundBatches` holds no batch: it draws (worker n,
step s) when the engine takes it, from its own generator seeded by (run seed, round, n, s)
(`seeding.step_seed`), so a draw depends on nothing but its four numbers: the vmap,
chunked and sequential engines, a resumed run and a SuperNode drawing only its own worker
all get the same batches and noise, whatever the order they ask in.

Indices and noise come from CPU generators and are then moved to the data's device, so a
CUDA run draws the numbers a CPU run draws; the images, labels and partition index tensors
stay where they are (put them on the device once).

Engines index it like the pre-drawn pytree (N, S, B, ...) it replaces (`local.index_batch`,
`local.leading_size`): [(workers, s)] is step s of a group of workers stacked (len, B, ...),
[n] one worker's `WorkerBatches` (still lazy), [n][s] or [(n, s)] one batch (x0, y, t, eps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fedscore import diffusion
from fedscore.errors import FedscoreError
from fedscore.federated.seeding import step_seed

Batch = tuple[Tensor, Tensor, Tensor, Tensor]  # (x0 (B, ...), y (B,), t (B,), eps (B, ...))


class LazyBatches:
    """What the engine needs of a batch source that is not a pytree of tensors: its sizes
    along the (worker, step) axes and indexing as the pytree would be indexed."""

    def leading_size(self, axis: int = 0) -> int:
        raise NotImplementedError

    def __getitem__(self, index):
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class RoundBatches(LazyBatches):
    """Round `round_`'s mini-batches and DSM noise of the workers `workers`, drawn per
    (worker, step) on demand; sizes (len(workers), steps) like a pre-drawn (N, S, B, ...).

    images (M, ...), labels (M,): the training data; parts: one index tensor into them per
    worker slot (same order as workers, the worker ids that seed the draws); batch_size: B;
    times, weighting: eq. 9's grid and how a step's times are drawn (`diffusion.draw_noise`).
    """

    images: Tensor
    labels: Tensor
    parts: Sequence[Tensor]
    workers: Sequence[int]
    steps: int
    batch_size: int
    times: Tensor
    weighting: str
    run_seed: int
    round_: int

    def __post_init__(self) -> None:
        if len(self.parts) != len(self.workers):
            raise FedscoreError(
                f"{len(self.parts)} partitions for {len(self.workers)} workers")
        if any(len(p) == 0 for p in self.parts):
            raise FedscoreError("a worker has no data to draw mini-batches from")

    def leading_size(self, axis: int = 0) -> int:
        if axis == 0:
            return len(self.workers)
        if axis == 1:
            return self.steps
        raise FedscoreError(f"RoundBatches has axes (worker, step), not axis {axis}")

    def draw(self, slot: int, step: int) -> Batch:
        """Batch `step` of the worker in slot `slot`: (x0, y, t, eps), each (B, ...)."""
        slot, step = _checked(slot, len(self.workers), "worker"), _checked(step, self.steps, "step")
        g = torch.Generator().manual_seed(
            step_seed(self.run_seed, self.round_, self.workers[slot], step))
        idx = self.parts[slot]
        pick = torch.randint(len(idx), (self.batch_size,), generator=g)
        shape = (self.batch_size, *self.images.shape[1:])
        t, eps = diffusion.draw_noise(torch.empty(shape, dtype=self.images.dtype),
                                      self.times.cpu(), self.weighting, g)
        rows = idx[pick.to(idx.device)]
        device = self.images.device
        return self.images[rows], self.labels[rows], t.to(device), eps.to(device)

    def step(self, slots: Sequence[int], step: int) -> Batch:
        """Step `step` of the workers in `slots`, stacked (len(slots), B, ...)."""
        drawn = [self.draw(i, step) for i in slots]
        return tuple(torch.stack(parts) for parts in zip(*drawn, strict=True))

    def materialise(self) -> Batch:
        """The whole round at once, (N, S, B, ...): what this class exists to avoid; for
        small runs, tests and measuring the old way."""
        steps = [self.step(range(len(self.workers)), s) for s in range(self.steps)]
        return tuple(torch.stack(parts, dim=1) for parts in zip(*steps, strict=True))

    def __getitem__(self, index):
        if isinstance(index, tuple):
            if len(index) != 2:
                raise FedscoreError(f"RoundBatches takes [worker] or [worker, step], got {index!r}")
            who, step = index
            if isinstance(who, int):
                return self.draw(who, step)
            return self.step(self._slots(who), step)
        if isinstance(index, int):
            return WorkerBatches(self, _checked(index, len(self.workers), "worker"))
        slots = self._slots(index)
        return replace(self, parts=[self.parts[i] for i in slots],
                       workers=[self.workers[i] for i in slots])

    def _slots(self, who) -> list[int]:
        if isinstance(who, slice):
            return list(range(len(self.workers)))[who]
        if isinstance(who, Tensor):
            who = who.tolist()
        if isinstance(who, Sequence):
            return [_checked(int(i), len(self.workers), "worker") for i in who]
        raise FedscoreError(f"cannot index RoundBatches' workers with {type(who).__name__}")


@dataclass(frozen=True, eq=False)
class WorkerBatches(LazyBatches):
    """One worker's S batches of a `RoundBatches`, drawn when indexed [s]."""

    source: RoundBatches
    slot: int

    def leading_size(self, axis: int = 0) -> int:
        if axis == 0:
            return self.source.steps
        raise FedscoreError(f"WorkerBatches has one axis (step), not axis {axis}")

    def __getitem__(self, step):
        if not isinstance(step, int):
            raise FedscoreError(f"WorkerBatches takes one step index, got {step!r}")
        return self.source.draw(self.slot, step)


def _checked(i: int, size: int, what: str) -> int:
    if not -size <= i < size:
        raise FedscoreError(f"{what} {i} out of range for {size} {what}s")
    return i % size
