"""Score networks: net(x, t, y=None) -> out with out.shape == x.shape (t: forward times)."""

from __future__ import annotations

from torch import nn

from fedscore.errors import unknown
from fedscore.models.ema import ema_update
from fedscore.models.mlp import ScoreMLP
from fedscore.models.unet import UNet, unet_preset


def _unet(size: str = "tiny", **kwargs) -> nn.Module:
    return unet_preset(size, **kwargs)


def _diffusers(size: str | None = None, in_channels: int = 1, image_size: int = 28,
               num_classes: int | None = None, **config) -> nn.Module:
    from fedscore.models.diffusers_adapter import diffusers_unet

    config = {"sample_size": image_size, "in_channels": in_channels,
              "out_channels": in_channels, **config}
    return diffusers_unet(num_classes=num_classes, **config)


def _fi_paper(size: str | None = None, in_channels: int = 1, image_size: int = 28,
              num_classes: int | None = 10, **overrides) -> nn.Module:
    from fedscore.models.diffusers_adapter import fi_paper_unet

    return fi_paper_unet(num_classes=num_classes, sample_size=image_size,
                         in_channels=in_channels, out_channels=in_channels, **overrides)


MODELS = {"mlp": ScoreMLP, "unet": _unet, "diffusers-unet": _diffusers, "fi-paper": _fi_paper}


def build_model(kind: str, **kwargs) -> nn.Module:
    """A score network by kind; kwargs go to its constructor."""
    if kind not in MODELS:
        raise unknown("model kind", kind, MODELS)
    return MODELS[kind](**kwargs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "ScoreMLP", "UNet", "build_model", "count_params", "ema_update",
           "unet_preset"]
