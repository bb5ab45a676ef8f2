"""DP-SGD's gradient (Abadi et al. 2016, "Deep learning with differential privacy", Alg. 1)
for eq. 7's local steps, per-sample gradients by torch.func (vmap of grad over the batch):

    g_i   = grad f_n(theta, xi_i) ⊙ m_{q,n}                       one sample's gradient
    g_i  <- g_i * min(1, C / ||g_i||_2)                           L2 over the kept coordinates
    g     = (sum_i g_i + N(0, (z C)^2 I)) / B                     the step's gradient

then the optimiser's step as without privacy (`federated.optim`: the mask multiplies the
gradient, so a pruned coordinate gets no update and the noise drawn there is dropped).

The noise of worker n at local step s of round q is drawn from its own seed
(`federated.seeding.noise_seed`), so the vectorised engine (vmap over workers of the
per-sample vmap), the sequential engine and a Flower SuperNode draw the same noise.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap
from torch.utils._pytree import tree_map

from fedscore.errors import FedscoreError
from fedscore.federated.seeding import noise_seed
from fedscore.privacy.clip import clip_factor, gaussian_noise, seeded_generator
from fedscore.runtime import Runtime


def check_runtime(runtime: Runtime) -> None:
    """DP-SGD's per-sample gradients are a vmap of grad (`Runtime.vmap_of_grad_works`): a
    reduced precision on the CPU is one clear error before any file, on the in-process
    engine and on a SuperNode alike (`federated.setup.prepare` calls this), instead of
    torch's traceback mid-round."""
    if not runtime.vmap_of_grad_works:
        raise FedscoreError(
            f"privacy mode sample (DP-SGD) cannot train in {runtime.precision} on the CPU: "
            "its per-sample gradients are a vmap, which fails under CPU autocast in this "
            "torch; use precision fp32 (--precision fp32)")


@dataclass
class ClipCount:
    """Per-sample gradients seen and clipped in a round (the round record's
    `clipped_fraction` in mode sample); safe to add to from the engine's threads."""

    seen: int = 0
    clipped: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, seen: int, clipped: int) -> None:
        with self._lock:
            self.seen += seen
            self.clipped += clipped

    @property
    def fraction(self) -> float | None:
        return self.clipped / self.seen if self.seen else None


def per_sample_clipped_sum(loss_flat: Callable, clip: float):
    """fn(theta (D,), batch (B, ...), mask (D,) bool) -> (sum_i clip(g_i ⊙ m) (D,),
    per-sample losses (B,), number of samples clipped ()), vmappable over a leading worker
    axis. loss_flat(theta, batch) is the mean loss of a batch (`flat.FlatLayout.loss`); a
    sample is a batch of one."""

    def one(theta: Tensor, sample) -> Tensor:
        return loss_flat(theta, tree_map(lambda x: x.unsqueeze(0), sample))

    per_sample = vmap(grad_and_value(one), in_dims=(None, 0))

    def fn(theta: Tensor, batch, mask: Tensor):
        grads, losses = per_sample(theta, batch)  # (B, D), (B,)
        grads = torch.where(mask, grads, 0)  # the norm is over the kept coordinates
        norms = grads.pow(2).sum(1).sqrt()
        factor = clip_factor(norms, clip)
        return (grads * factor[:, None]).sum(0), losses, (norms > clip).sum()

    return fn


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD's step gradient for the workers `workers` (ids, in the order of the stacked
    axis) in round `round_`: clip C, noise multiplier z, noise keyed by the plan's secret key."""

    clip: float
    noise_multiplier: float
    noise_key: int
    round_: int
    workers: tuple[int, ...]
    count: ClipCount = field(default_factory=ClipCount)

    def select(self, rows: int | slice) -> DPSGD:
        """The same step for the workers at positions `rows` of the stacked axis (sharing
        this round's clip count)."""
        ids = self.workers[rows] if isinstance(rows, slice) else (self.workers[rows],)
        return DPSGD(self.clip, self.noise_multiplier, self.noise_key, self.round_, ids,
                     self.count)

    def noise(self, step: int, like: Tensor) -> Tensor:
        """N(0, (z C)^2) per coordinate for every worker at local step `step`: like (D,) for
        one worker, (n, D) for n stacked."""
        std = self.noise_multiplier * self.clip
        rows = [gaussian_noise(like[..., 0, :] if like.ndim > 1 else like, std,
                               seeded_generator(noise_seed(self.noise_key, self.round_, n, step)))
                for n in self.workers]
        return rows[0] if like.ndim == 1 else torch.stack(rows)

    def grad(self, loss_flat: Callable, theta: Tensor, batch, mask: Tensor, step: int
             ) -> tuple[Tensor, Tensor]:
        """(noisy clipped mean gradient, mean loss) at local step `step`: theta, mask (D,)
        for one worker and a batch (B, ...), or (n, D) and (n, B, ...) for n stacked."""
        fn = per_sample_clipped_sum(loss_flat, self.clip)
        if theta.ndim > 1:
            fn = vmap(fn)
        with torch.enable_grad():
            total, losses, clipped = fn(theta.detach(), batch, mask)
        total, losses = total.detach(), losses.detach()
        size = losses.shape[-1]
        self.count.add(losses.numel(), int(clipped.sum()))
        g = (total + self.noise(step, total)) / size
        return g, losses.mean(-1)


