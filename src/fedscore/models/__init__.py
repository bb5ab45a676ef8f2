"""Score networks: net(x, t, y=None) -> out with out.shape == x.shape.

x: (B, d) vectors (ScoreMLP) or (B, C, H, W) images (UNet, diffusers adapter); t: (B,)
FORWARD times of the OU process dX = -X dt + sqrt(2) dB (delta .. T); y: (B,) int64 labels
or None (class-conditional networks read None as a "null" label). The caller decides
whether out is eps or the score. Every network here runs under torch.func.functional_call,
vmap and grad (the federated engine stacks workers' parameters on a leading axis).

`build.py` builds the network a run config names and loads its trained weights.
diffusers is imported only when a diffusers kind is built.
"""

from __future__ import annotations

from fedscore.models.build import (
    ModelSpec,
    build_model_for,
    load_trained,
    load_weights,
    save_weights,
)
from fedscore.models.ema import ema_decay, ema_init, ema_update, ema_update_
from fedscore.models.mlp import ScoreMLP, time_embedding
from fedscore.models.pretrained import check_pretrained
from fedscore.models.registry import MODELS, build_model, count_params
from fedscore.models.unet import PRESETS as UNET_PRESETS
from fedscore.models.unet import UNet, unet_preset

__all__ = [
    "MODELS",
    "ModelSpec",
    "UNET_PRESETS",
    "ScoreMLP",
    "UNet",
    "build_model",
    "build_model_for",
    "check_pretrained",
    "count_params",
    "ema_decay",
    "ema_init",
    "ema_update",
    "ema_update_",
    "load_trained",
    "load_weights",
    "save_weights",
    "time_embedding",
    "unet_preset",
]
