"""Exponential moving average of weights, as a pure function on parameter dicts."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def ema_update(
    ema: dict[str, Tensor], params: dict[str, Tensor], decay: float
) -> dict[str, Tensor]:
    """ema <- decay * ema + (1 - decay) * params, per tensor (a new dict)."""
    return {k: torch.lerp(params[k].detach(), ema[k], decay) for k in ema}
