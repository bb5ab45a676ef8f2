"""Score networks by name: `build_model(kind, **kwargs)`, one explicit dict of builders."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from fedscore.errors import FedscoreError, unknown
from fedscore.models.diffusers_adapter import diffusers_unet, fi_paper_unet
from fedscore.models.mlp import ScoreMLP
from fedscore.models.unet import UNet, unet_preset


def _mlp(size: str | None = None, **kwargs) -> nn.Module:
    """ScoreMLP(dim, hidden, depth, time_dim, num_classes, dropout); `size` is ignored
    (configs may pass the U-Net's named size to every kind)."""
    _check_kwargs("mlp", ScoreMLP, kwargs)
    return ScoreMLP(**kwargs)


def _unet(size: str = "tiny", **kwargs) -> nn.Module:
    """unet_preset(size, in_channels, image_size, num_classes, **UNet overrides)."""
    _check_kwargs("unet", UNet, kwargs)
    return unet_preset(size, **kwargs)


def _diffusers(
    size: str | None = None,
    in_channels: int = 1,
    image_size: int = 28,
    num_classes: int | None = None,
    **config,
) -> nn.Module:
    """A diffusers UNet2DModel (architecture="UNet2DConditionModel" for the conditional
    one) from its constructor's keyword arguments; `size` is ignored."""
    config = {"sample_size": image_size, "in_channels": in_channels,
              "out_channels": in_channels, **config}
    return diffusers_unet(num_classes=num_classes, **config)


def _fi_paper(
    size: str | None = None,
    in_channels: int = 1,
    image_size: int = 28,
    num_classes: int | None = 10,
    **overrides,
) -> nn.Module:
    """The FI paper's Appendix B UNet2DConditionModel; `size` is ignored."""
    return fi_paper_unet(num_classes=num_classes, sample_size=image_size,
                         in_channels=in_channels, out_channels=in_channels, **overrides)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "unet": _unet,
    "diffusers-unet": _diffusers,
    "fi-paper": _fi_paper,
}


def build_model(kind: str, **kwargs) -> nn.Module:
    """The score network `kind` (one of MODELS), kwargs to its builder:
      "mlp":            dim, hidden, depth, time_dim, num_classes, dropout
      "unet":           size ("tiny" | "small" | "paper"), in_channels, image_size,
                        num_classes, and any UNet argument as an override
      "diffusers-unet": in_channels, image_size, num_classes, architecture, adapter
                        options (T, time_map, delta, label_encoding, attn_processor) and
                        diffusers constructor arguments
      "fi-paper":       in_channels, image_size, num_classes (10), adapter options
    Every network maps (x, t, y=None) -> out of x's shape."""
    if kind not in MODELS:
        raise unknown("model kind", kind, MODELS)
    return MODELS[kind](**kwargs)


def count_params(model: nn.Module) -> int:
    """Number of parameter entries (trainable or not) of `model`."""
    return sum(p.numel() for p in model.parameters())


def _check_kwargs(kind: str, cls: type, kwargs: dict) -> None:
    """FedscoreError for an unknown or missing constructor argument, naming the accepted
    ones (instead of a TypeError from deep inside the constructor)."""
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self"]
    extra = sorted(set(kwargs) - set(accepted))
    if extra:
        raise FedscoreError(
            f"model kind {kind!r} takes no argument(s) {extra}; it accepts: "
            f"{', '.join(accepted)}"
        )
    missing = [p for p, v in params.items() if p != "self" and v.default is inspect.Parameter.empty
               and p not in kwargs]
    if missing:
        raise FedscoreError(f"model kind {kind!r} needs argument(s) {missing}")
