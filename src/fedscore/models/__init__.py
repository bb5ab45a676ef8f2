"""Score networks: net(x, t, y=None) -> out with out.shape == x.shape (t: forward times)."""

from __future__ import annotations

from torch import nn

from fedscore.errors import unknown
from fedscore.models.ema import ema_update
from fedscore.models.mlp import ScoreMLP
from fedscore.models.unet import UNet, unet_preset


def _unet(size: str = "tiny", **kwargs) -> nn.Module:
    return unet_preset(size, **kwargs)


MODELS = {"mlp": ScoreMLP, "unet": _unet}


def build_model(kind: str, **kwargs) -> nn.Module:
    """A score network by kind; kwargs go to its constructor."""
    if kind not in MODELS:
        raise unknown("model kind", kind, MODELS)
    return MODELS[kind](**kwargs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "ScoreMLP", "UNet", "build_model", "count_params", "ema_update",
           "unet_preset"]
