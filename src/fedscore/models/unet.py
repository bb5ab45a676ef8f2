"""A time-conditioned U-Net with residual blocks (DDPM's architecture, small enough to read).

GroupNorm (never BatchNorm: workers' batch statistics would not aggregate), SiLU,
sinusoidal embedding of log t, optional self-attention at the lowest resolution, optional
class conditioning by a label embedding added to the time embedding. Pure tensor code with
no in-place ops on parameters and no data-dependent control flow, so it runs under
torch.func.functional_call / vmap / grad (the federated engine stacks workers).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedscore.errors import FedscoreError
from fedscore.models.mlp import time_embedding

PRESETS = {
    # name: (base channels, channel multipliers per level, residual blocks per level)
    "tiny": (24, (1, 2, 2), 1),
    "small": (48, (1, 2, 2), 2),
    "paper": (128, (1, 2, 2, 2), 2),
}


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over pixels; plain matmul + softmax, which vmaps on CPU
    without the slow fallback of fused attention kernels."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(min(groups, ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = (q.transpose(1, 2) @ k) * c**-0.5  # (b, hw, hw)
        out = (v @ attn.softmax(-1).transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    """net(x, t, y=None) -> out, out.shape == x.shape; x (B, C, H, W), t (B,) forward times.

    H and W must be divisible by 2^(len(channel_mults) - 1) (one halving per level)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        base: int = 32,
        channel_mults: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention: bool = True,
        num_classes: int | None = None,
        groups: int = 8,
    ):
        super().__init__()
        factor = 2 ** (len(channel_mults) - 1)
        if image_size % factor or image_size < factor:
            raise FedscoreError(
                f"this U-Net halves the image {len(channel_mults) - 1} times, so the image "
                f"size must be a multiple of {factor}; got {image_size}. Use fewer levels "
                f"(model.options.channel_mults) or resize the images"
            )
        self.image_size = image_size
        self.num_classes = num_classes
        self.temb_dim = temb = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.label_emb = nn.Embedding(num_classes + 1, temb) if num_classes else None
        self.base = base
        self.inp = nn.Conv2d(in_channels, base, 3, padding=1)

        chans = [base * m for m in channel_mults]
        self.down = nn.ModuleList()
        skips, ch = [base], base
        for level, cout in enumerate(chans):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, cout, temb, groups))
                ch = cout
                skips.append(ch)
            if level < len(chans) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid1 = ResBlock(ch, ch, temb, groups)
        self.mid_attn = Attention(ch, groups) if attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, temb, groups)
        self.up = nn.ModuleList()
        for level, cout in reversed(list(enumerate(chans))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + skips.pop(), cout, temb, groups))
                ch = cout
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
        self.out_norm = nn.GroupNorm(min(groups, ch), ch)
        self.out = nn.Conv2d(ch, in_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.time_mlp(time_embedding(t.to(x.dtype), self.base))
        if self.label_emb is not None:
            if y is None:  # index num_classes is "no label"
                y = t.new_full((x.shape[0],), self.num_classes).long()
            emb = emb + self.label_emb(y)
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(_cat(h, hs.pop()), emb)
            else:
                h = layer(h)
        return self.out(F.silu(self.out_norm(h)))


def _cat(a: Tensor, b: Tensor) -> Tensor:
    return torch.cat([a, b], dim=1)


def unet_preset(size: str, in_channels: int, image_size: int,
                num_classes: int | None = None, **overrides) -> UNet:
    """A U-Net of a named size: "tiny" (~0.6 M parameters, CPU tests), "small" (~3 M),
    "paper" (~35 M, DDPM's CIFAR-10 network; GPU)."""
    if size not in PRESETS:
        raise FedscoreError(f"unknown U-Net size {size!r}; choose one of: {', '.join(PRESETS)}")
    base, mults, blocks = PRESETS[size]
    kw = {"base": base, "channel_mults": mults, "num_res_blocks": blocks, **overrides}
    if "channel_mults" in overrides:
        kw["channel_mults"] = tuple(overrides["channel_mults"])
    return UNet(in_channels, image_size, num_classes=num_classes, **kw)
