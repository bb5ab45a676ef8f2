"""Any diffusers UNet2DModel / UNet2DConditionModel as a fedscore score network.

Users bring their own architectures (built from a config, or loaded from a local folder with
`from_pretrained`); the adapter maps our contract net(x, t, y=None) -> out onto diffusers'
call and returns the model's `.sample` unchanged (the caller reads it as eps or score;
note that a UNet2DModel with time_embedding_type="fourier" divides its output by the
timestep, NCSN++'s convention for sigma inputs, so it suits none of our time maps):

  time: our forward OU time t (dX = -X dt + sqrt 2 dB) becomes diffusers' `timestep` by
    `time_map` (TIME_MAPS):
      "linear": t * 1000 / T, the DDPM index range [0, 1000] where diffusers' sinusoidal
                embedding is tuned (T: the largest time the model will see);
      "log":    1000 (log t - log delta) / (log T - log delta), which spreads the small
                times (delta .. 1e-2, where the score changes fastest) over the range
                instead of squeezing them into timesteps < 2;
      "ddpm":   the (fractional) index k of DDPM's linear betas with
                alpha_bar_k = e^{-2t}, so a network trained by diffusers' DDPMScheduler
                (e.g. a local copy of a pretrained DDPM) sees the timesteps it knows.
  labels: UNet2DModel: `class_labels` (built with num_class_embeds = num_classes + 1; the
    last row is the "null" label used for y=None). UNet2DConditionModel: one token of
    `encoder_hidden_states`, the one-hot label padded to the token width as in the FI
    paper's Appendix B (all zeros for y=None), or a learned label embedding
    (label_encoding="learned", row num_classes the null label).

The plain attention processor (`AttnProcessor`, matmul + softmax) is set by default:
diffusers' default SDPA processor hits the CPU flash kernel, which has no vmap batching
rule and falls back to a slow per-sample loop when the federated engine stacks workers.
attn_processor="default" keeps diffusers' choice (faster without vmap, e.g. on a GPU).

diffusers is imported inside the functions, so `import fedscore.models` stays fast.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedscore.diffusion.grids import ddpm_betas
from fedscore.errors import FedscoreError, require, unknown

FI_PAPER = {  # the FI paper's Appendix B, Table 2 (UNet2DConditionModel)
    "sample_size": 28,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 2,
    "block_out_channels": (32, 480, 576, 576),
    "cross_attention_dim": 10,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}

DDPM_STEPS = 1000


def _linear(t: Tensor, T: float, delta: float) -> Tensor:
    return t * (DDPM_STEPS / T)


def _log(t: Tensor, T: float, delta: float) -> Tensor:
    lo = math.log(delta)
    return (torch.log(t.clamp_min(1e-12)) - lo) * (DDPM_STEPS / (math.log(T) - lo))


def _ddpm(t: Tensor, T: float, delta: float) -> Tensor:
    """Fractional DDPM index: k with t_k = -0.5 log alpha_bar_k (linear betas 1e-4..0.02),
    interpolated linearly between integers and clamped to [0, 999] outside the table."""
    table = (-0.5 * torch.log(torch.cumprod(1.0 - ddpm_betas(DDPM_STEPS), 0))).to(t)
    # a comparison count instead of searchsorted: plain broadcasting, vmap-safe
    k = (t[:, None] >= table[None, :]).sum(-1).clamp(1, DDPM_STEPS - 1)
    lo, hi = table[k - 1], table[k]
    frac = ((t - lo) / (hi - lo)).clamp(0.0, 1.0)
    return (k - 1).to(t.dtype) + frac


TIME_MAPS = {"linear": _linear, "log": _log, "ddpm": _ddpm}
LABEL_ENCODINGS = ("one-hot", "learned")
ATTN_PROCESSORS = ("plain", "default")


class DiffusersScoreNet(nn.Module):
    """Wraps a diffusers UNet2DModel or UNet2DConditionModel (`unet`) as net(x, t, y=None).

    num_classes: labels 0..num_classes-1 (None: unconditional, y ignored); T, delta: the
    largest and smallest forward times (for the "linear" and "log" time maps)."""

    def __init__(
        self,
        unet: nn.Module,
        num_classes: int | None = None,
        T: float = 5.0,
        time_map: str = "linear",
        delta: float = 1e-3,
        label_encoding: str = "one-hot",
        attn_processor: str = "plain",
    ):
        super().__init__()
        if time_map not in TIME_MAPS:
            raise unknown("diffusers time_map", time_map, TIME_MAPS)
        if label_encoding not in LABEL_ENCODINGS:
            raise unknown("diffusers label_encoding", label_encoding, LABEL_ENCODINGS)
        if attn_processor not in ATTN_PROCESSORS:
            raise unknown("diffusers attn_processor", attn_processor, ATTN_PROCESSORS)
        if not 0 < delta < T:
            raise FedscoreError(f"the time map needs 0 < delta < T, got delta={delta}, T={T}")
        config = getattr(unet, "config", None)
        if config is None or not hasattr(config, "block_out_channels"):
            raise FedscoreError(
                f"the diffusers adapter wraps a UNet2DModel or UNet2DConditionModel, got "
                f"{type(unet).__name__}"
            )
        self.unet = unet
        self.num_classes = num_classes
        self.T, self.delta, self.time_map = float(T), float(delta), time_map
        self.cross_attention = getattr(config, "cross_attention_dim", None) is not None
        self.label_emb = None
        if self.cross_attention:
            self.token_width = _token_width(config)
            if num_classes and label_encoding == "learned":
                self.label_emb = nn.Embedding(num_classes + 1, self.token_width)
            elif num_classes and num_classes > self.token_width:
                raise FedscoreError(
                    f"one-hot labels need num_classes <= the token width "
                    f"{self.token_width} (cross_attention_dim), got {num_classes}; use "
                    f"label_encoding='learned' or a wider cross_attention_dim"
                )
        else:
            _check_class_embeds(config, num_classes)
            # UNet2DModel halves len(block_out_channels) - 1 times with no size fix-up
            self.size_factor = 2 ** (len(config.block_out_channels) - 1)
            size = config.sample_size
            for side in size if isinstance(size, (tuple, list)) else (size,):
                if side is not None:
                    _check_side(side, self.size_factor, "sample_size")
        if attn_processor == "plain":
            set_plain_attention(unet)

    def timestep(self, t: Tensor) -> Tensor:
        """(B,) forward times -> (B,) diffusers timesteps by self.time_map."""
        return TIME_MAPS[self.time_map](t, self.T, self.delta)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        timestep = self.timestep(t.to(x.dtype))
        if self.cross_attention:
            return self.unet(x, timestep, encoder_hidden_states=self._tokens(x, y)).sample
        for side in x.shape[-2:]:
            _check_side(side, self.size_factor, "input images")
        labels = None
        if self.num_classes:
            labels = y if y is not None else torch.full(
                (x.shape[0],), self.num_classes, dtype=torch.long, device=x.device
            )
        return self.unet(x, timestep, class_labels=labels).sample

    def _tokens(self, x: Tensor, y: Tensor | None) -> Tensor:
        """(B, 1, width) encoder_hidden_states: the label as one token."""
        if not self.num_classes:
            return x.new_zeros(x.shape[0], 1, self.token_width)
        if self.label_emb is not None:
            token = (self.label_emb.weight[self.num_classes].expand(x.shape[0], -1)
                     if y is None else self.label_emb(y))
            return token[:, None, :].to(x.dtype)
        if y is None:
            return x.new_zeros(x.shape[0], 1, self.token_width)
        return F.one_hot(y, self.token_width).to(x.dtype)[:, None, :]


def set_plain_attention(unet: nn.Module) -> int:
    """Give every diffusers attention module of `unet` the plain AttnProcessor; returns
    how many. (Module by module: UNet2DModel has no set_attn_processor.)"""
    AttnProcessor = require("diffusers.models.attention_processor", "diffusers",
                            "the diffusers adapter").AttnProcessor

    layers = [m for m in unet.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]
    for m in layers:
        m.set_processor(AttnProcessor())
    return len(layers)


def _token_width(config) -> int:
    width = getattr(config, "encoder_hid_dim", None) or config.cross_attention_dim
    if not isinstance(width, int):
        raise FedscoreError(
            f"the adapter feeds labels as one token of a single width; this model has "
            f"cross_attention_dim={width!r} (one per block): set encoder_hid_dim"
        )
    return width


def _check_class_embeds(config, num_classes: int | None) -> None:
    have = getattr(config, "num_class_embeds", None)
    want = num_classes + 1 if num_classes else None
    if have != want:
        raise FedscoreError(
            f"UNet2DModel label table mismatch: num_class_embeds={have} but num_classes="
            f"{num_classes}; build it with num_class_embeds = num_classes + 1 (the extra row "
            f"is the null label for y=None), or without one for an unconditional model"
        )


def _check_side(side: int, factor: int, what: str) -> None:
    if side % factor:
        raise FedscoreError(
            f"{what}: this UNet2DModel halves the image {int(math.log2(factor))} times "
            f"(len(block_out_channels) - 1), so sides must be multiples of {factor}; got "
            f"{side}. Use fewer blocks, resize the images, or UNet2DConditionModel (which "
            f"resizes its up-sampling to fit)"
        )


def _adapter_kwargs(kwargs: dict) -> dict:
    names = ("T", "time_map", "delta", "label_encoding", "attn_processor")
    return {k: kwargs.pop(k) for k in names if k in kwargs}


def _construct(cls, kind: str, config: dict) -> nn.Module:
    try:
        return cls(**config)
    except TypeError as err:  # an unknown keyword in model.options
        raise FedscoreError(f"model.options for {kind!r} ({cls.__name__}): {err}") from err


def diffusers_unet(
    num_classes: int | None = None, architecture: str = "UNet2DModel", **config
) -> DiffusersScoreNet:
    """A diffusers UNet2DModel (or, architecture="UNet2DConditionModel", the conditional
    one) built from `config` (its constructor's keyword arguments), wrapped. Adapter
    options (T, time_map, delta, label_encoding, attn_processor) may be mixed in."""
    diffusers = require("diffusers", "diffusers", "model.kind diffusers-unet")

    options = _adapter_kwargs(config)
    if architecture not in ("UNet2DModel", "UNet2DConditionModel"):
        raise unknown("diffusers architecture", architecture,
                      ("UNet2DModel", "UNet2DConditionModel"))
    if architecture == "UNet2DModel" and num_classes:
        config = {"num_class_embeds": num_classes + 1, **config}
    unet = _construct(getattr(diffusers, architecture), "diffusers-unet", config)
    return DiffusersScoreNet(unet, num_classes=num_classes, **options)


def fi_paper_unet(num_classes: int | None = 10, **overrides) -> DiffusersScoreNet:
    """The FI paper's UNet2DConditionModel (Appendix B, Table 2; the label as a one-hot
    cross-attention token of width 10): ~166 M parameters, a GPU model. `overrides` replace
    entries of FI_PAPER (e.g. sample_size, in_channels) or set adapter options. The paper
    mentions FreeU; its table gives no FreeU factors, so FreeU stays off (diffusers'
    default)."""
    diffusers = require("diffusers", "diffusers", "model.kind fi-paper")
    UNet2DConditionModel = diffusers.UNet2DConditionModel

    options = _adapter_kwargs(overrides)
    config = {**FI_PAPER, **overrides}
    unet = _construct(UNet2DConditionModel, "fi-paper", config)
    return DiffusersScoreNet(unet, num_classes=num_classes, **options)
