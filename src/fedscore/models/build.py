"""The score network a run's config names: built from the config alone, and its trained
weights (`model.safetensors`) loaded with one clear error for each way that can fail.

Everything here takes the item shape and the number of classes explicitly (the caller
reads them from `fedscore.data.shape_and_classes(cfg)`: the config first, then the data),
so a Flower server, which holds no data, builds the same model as every worker.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fedscore.errors import FedscoreError
from fedscore.models.pretrained import pretrained_model
from fedscore.models.registry import build_model


class ModelSpec(Protocol):
    """What the builder reads of a model config (fedscore.config.ModelConfig)."""

    kind: str
    size: str
    conditional: bool
    options: dict[str, Any]
    pretrained: str | None  # optional: a spec without it builds from scratch


_GLOBAL_RNG = threading.Lock()  # fork_rng seeds the process-wide generator


def build_model_for(
    cfg: ModelSpec, sample_shape: tuple[int, ...], num_classes: int | None, seed: int = 0,
    *, pretrained_weights: bool = True,
) -> nn.Module:
    """The score network `cfg` names, sized for items of `sample_shape` ((d,) vectors or
    (C, H, W) images) and `num_classes` labels (ignored unless cfg.conditional), its initial
    weights drawn from `seed` in a forked RNG, so no global random state is touched (one
    thread at a time: agents may be built side by side, `engine.in_threads`).

    With `cfg.pretrained` (kind diffusers-unet) the initial weights are the local diffusers
    folder's (models.pretrained): theta_0 of federated fine-tuning, masks and eq. 8
    unchanged; pretrained_weights=False builds its architecture only (trained weights are
    loaded next)."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if getattr(cfg, "pretrained", None) is not None:
            return pretrained_model(cfg, tuple(sample_shape), num_classes,
                                    weights=pretrained_weights)
        return _build(cfg, tuple(sample_shape), num_classes)


def _build(cfg: ModelSpec, sample_shape: tuple[int, ...], num_classes: int | None) -> nn.Module:
    nc = num_classes if cfg.conditional else None
    if cfg.kind == "mlp":
        if len(sample_shape) != 1:
            raise FedscoreError(
                f"model.kind 'mlp' takes vector data, but the data have shape {sample_shape}; "
                "use model.kind: unet for images"
            )
        return build_model("mlp", dim=sample_shape[0], num_classes=nc, **cfg.options)
    if len(sample_shape) != 3:
        raise FedscoreError(f"model.kind {cfg.kind!r} takes images (C, H, W), got {sample_shape}")
    c, h, _ = sample_shape
    return build_model(
        cfg.kind, size=cfg.size, in_channels=c, image_size=h, num_classes=nc, **cfg.options
    )


def save_weights(weights: dict[str, Tensor], path: str | Path) -> None:
    """Write name -> tensor to a safetensors file (not atomically: pass this to
    fedscore.io.atomic_write)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(path))


def load_weights(model: nn.Module, path: str | Path, *, config: str = "its config") -> nn.Module:
    """Load the weights file `path` into `model` (in place; returned in eval mode).

    Every parameter must be in the file and nothing else may be (buffers the file lacks
    keep their initial values): a file written for another config is refused with a
    FedscoreError naming `config`, never half-loaded silently."""
    path = Path(path)
    if not path.is_file():
        raise FedscoreError(
            f"{str(path.parent)!r} holds no trained model ({path.name}); train it first "
            "with `fedscore train --config ...`"
        )
    try:
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    except Exception as err:  # safetensors' errors or a shape mismatch: one clear message
        raise FedscoreError(f"cannot load {str(path)!r}: {err}") from None
    params = dict(model.named_parameters())
    if unexpected or any(k in params for k in missing):
        raise FedscoreError(f"{str(path)!r} does not match the model of {config}")
    return model.eval()


def load_trained(
    cfg: ModelSpec, path: str | Path, sample_shape: tuple[int, ...], num_classes: int | None,
    *, config: str = "its config",
) -> nn.Module:
    """The network `cfg` names with the trained weights of `path`, in eval mode (a
    pretrained U-Net's folder gives its architecture only: its weights are not read)."""
    model = build_model_for(cfg, sample_shape, num_classes, pretrained_weights=False)
    return load_weights(model, path, config=config)
