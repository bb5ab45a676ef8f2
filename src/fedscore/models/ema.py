"""Exponential moving average (EMA) of weights, for sampling from a smoothed model.

    ema_k <- decay * ema_k + (1 - decay) * theta_k        for every tensor k

as pure functions on parameter dicts (name -> Tensor, as from named_parameters, or stacked
with a leading worker axis: the update is element-wise), plus an in-place variant for a
training loop and the usual warm-up of the decay.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedscore.errors import FedscoreError


def ema_init(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The EMA's starting point: detached copies of `params`."""
    return {k: v.detach().clone() for k, v in params.items()}


@torch.no_grad()
def ema_update(
    ema: dict[str, Tensor], params: dict[str, Tensor], decay: float
) -> dict[str, Tensor]:
    """A new dict: decay * ema + (1 - decay) * params per tensor (no autograd history).
    Non-floating tensors (integer buffers, counters) are copied from `params`."""
    _check(ema, params, decay)
    return {k: _mix(ema[k], params[k].detach(), decay) for k in ema}


@torch.no_grad()
def ema_update_(ema: dict[str, Tensor], params: dict[str, Tensor], decay: float) -> None:
    """The same update, written into the tensors of `ema` (saves one copy per step)."""
    _check(ema, params, decay)
    for k, e in ema.items():
        p = params[k].detach()
        if e.is_floating_point():
            e.lerp_(p.to(e.dtype), 1.0 - decay)  # e + (1 - decay)(p - e)
        else:
            e.copy_(p)


def ema_decay(step: int, decay: float, warmup: bool = True) -> float:
    """The decay to use for update number `step` (0 for the first update).

    With warm-up: min(decay, (1 + step) / (10 + step)) (the rule of TensorFlow's
    ExponentialMovingAverage with num_updates). The first updates then weigh the current
    weights heavily (decay 0.1 at step 0), so the EMA does not remember the random
    initialisation for ~1 / (1 - decay) steps; the rule reaches `decay` after
    (10 decay - 1) / (1 - decay) steps (~8,990 for 0.999). Without warm-up: `decay`.
    """
    if not 0.0 <= decay <= 1.0:
        raise FedscoreError(f"ema_decay must be in [0, 1], got {decay}")
    if step < 0:
        raise FedscoreError(f"the EMA step count must be >= 0, got {step}")
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


def _mix(e: Tensor, p: Tensor, decay: float) -> Tensor:
    if not e.is_floating_point():
        return p.clone()
    return torch.lerp(p.to(e.dtype), e, decay)  # p + decay (e - p)


def _check(ema: dict[str, Tensor], params: dict[str, Tensor], decay: float) -> None:
    if not 0.0 <= decay <= 1.0:
        raise FedscoreError(f"ema_decay must be in [0, 1], got {decay}")
    missing = sorted(set(ema) - set(params))
    if missing:
        raise FedscoreError(
            f"the EMA tracks tensors the model does not have: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; was the EMA made for another model?"
        )
