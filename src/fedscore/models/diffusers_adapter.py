"""Any diffusers UNet2DModel / UNet2DConditionModel as a fedscore score network.

Users bring their own architectures; the adapter only maps our contract
net(x, t, y=None) -> out onto diffusers' call:
  - our forward OU time t in (0, T] becomes diffusers' `timestep` t * time_scale
    (default 1000 / T: the DDPM index range, where diffusers' sinusoidal embedding is tuned);
  - labels go in as `class_labels` (UNet2DModel with num_class_embeds = C + 1, index C
    meaning "no label") or as a one-hot `encoder_hidden_states` token of width
    cross_attention_dim (UNet2DConditionModel; all zeros for "no label"), as in the FI
    paper's Appendix B.
On CPU the plain attention processor is set, so torch.func.vmap (the federated engine's
stacking) does not fall back to a slow path of fused attention kernels.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from fedscore.errors import FedscoreError

FI_PAPER = {  # the FI paper's Appendix B, Table 2
    "sample_size": 28,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 2,
    "block_out_channels": (32, 480, 576, 576),
    "cross_attention_dim": 10,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}


class DiffusersScoreNet(nn.Module):
    """Wraps a diffusers UNet2DModel or UNet2DConditionModel (`unet`)."""

    def __init__(self, unet: nn.Module, num_classes: int | None = None, T: float = 5.0):
        super().__init__()
        self.unet = unet
        self.num_classes = num_classes
        self.time_scale = 1000.0 / T
        self.conditional_attention = hasattr(unet.config, "cross_attention_dim") and (
            unet.config.cross_attention_dim is not None
        )
        try:
            from diffusers.models.attention_processor import AttnProcessor

            unet.set_attn_processor(AttnProcessor())
        except (ImportError, AttributeError):
            pass

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        timestep = t * self.time_scale
        if self.conditional_attention:
            width = self.unet.config.cross_attention_dim
            if y is None:
                context = x.new_zeros(x.shape[0], 1, width)
            else:
                context = F.one_hot(y, width).to(x.dtype)[:, None, :]
            return self.unet(x, timestep, encoder_hidden_states=context).sample
        labels = None
        if self.num_classes is not None:
            labels = y if y is not None else t.new_full((x.shape[0],), self.num_classes).long()
        return self.unet(x, timestep, class_labels=labels).sample


def diffusers_unet(num_classes: int | None = None, T: float = 5.0, **config) -> DiffusersScoreNet:
    """A diffusers UNet2DModel built from `config` (its constructor's keyword arguments)."""
    try:
        from diffusers import UNet2DModel
    except ImportError as err:
        raise FedscoreError("model.kind 'diffusers-unet' needs `pip install diffusers`") from err
    if num_classes is not None:
        config = {"num_class_embeds": num_classes + 1, **config}
    return DiffusersScoreNet(UNet2DModel(**config), num_classes=num_classes, T=T)


def fi_paper_unet(num_classes: int | None = 10, T: float = 5.0, **overrides) -> DiffusersScoreNet:
    """The FI paper's UNet2DConditionModel (Appendix B), label by cross-attention."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError as err:
        raise FedscoreError("model.kind 'fi-paper' needs `pip install diffusers`") from err
    config = {**FI_PAPER, **overrides}
    if num_classes is not None and num_classes > config["cross_attention_dim"]:
        raise FedscoreError(
            f"the fi-paper model one-hot encodes labels in cross_attention_dim="
            f"{config['cross_attention_dim']} channels; {num_classes} classes do not fit"
        )
    return DiffusersScoreNet(UNet2DConditionModel(**config), num_classes=num_classes, T=T)
