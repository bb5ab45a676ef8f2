"""A time-conditioned U-Net with residual blocks (DDPM's architecture, small enough to read).

net(x, t, y=None) -> out, out.shape == x.shape; x (B, C, H, W), t (B,) forward OU times,
y (B,) int64 labels or None. Pieces, top-down:
  - time: sinusoidal embedding of log t (`mlp.time_embedding`, why log: see there) -> MLP
    -> emb of width 4 * base; with num_classes, a label embedding is added to emb (row
    num_classes is the "null" label used for y=None, for classifier-free set-ups);
  - down path: per level, num_res_blocks residual blocks (GroupNorm, SiLU, conv; emb added
    after the first conv), self-attention after each block whose resolution is in
    attn_resolutions, then a stride-2 conv into the next level (for the first
    num_downsamples transitions; later ones keep the resolution);
  - middle: res block, self-attention (attention=True), res block;
  - up path: the mirror, each block fed the matching skip, nearest-upsample + conv.

GroupNorm, never BatchNorm: workers' batch statistics would not aggregate, and under vmap
running statistics are stacked buffers mutated in place. Pure tensor code with no in-place
ops on parameters and no data-dependent control flow (only shape- and config-dependent),
so it runs under torch.func.functional_call / vmap / grad: the federated engine stacks the
workers' parameters on a leading axis.

Image sizes: each down-sampling halves H and W, so both must be multiples of
2^num_downsamples. Every preset halves twice (28 -> 14 -> 7, 8 -> 4 -> 2, 32 -> 16 -> 8):
any multiple of 4 works.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedscore.errors import FedscoreError, unknown
from fedscore.models.mlp import add_label, check_positive, dropout_layer, time_embedding

PRESETS: dict[str, dict] = {
    # tiny: CPU tests and demos (~0.6 M parameters); attention only in the middle.
    "tiny": {"base": 24, "channel_mults": (1, 2, 2), "num_res_blocks": 1},
    # small: ~3.5 M parameters, still trainable on a CPU in an afternoon.
    "small": {"base": 48, "channel_mults": (1, 2, 2), "num_res_blocks": 2},
    # paper: DDPM's CIFAR-10 network (Ho et al. 2020: 128 channels, multipliers 1,2,2,2,
    # 2 blocks per level, attention at half the image side, 16x16 for CIFAR), but halving
    # only twice (DDPM: 3 times, 32 -> 4) so 28x28 images fit: the last transition keeps
    # the resolution, dropping one down- and one up-sampling conv (34.6 M parameters against
    # DDPM's 35.7 M).
    "paper": {"base": 128, "channel_mults": (1, 2, 2, 2), "num_res_blocks": 2,
              "num_downsamples": 2, "attn_divisors": (2,)},
}


class Attention(nn.Module):
    """Single-head self-attention over the H*W pixels, x + proj(softmax(q^T k / sqrt c) v).

    Plain matmul + softmax on purpose: it vmaps on CPU with batched kernels, whereas
    F.scaled_dot_product_attention's CPU flash kernel has no vmap batching rule and falls
    back to a slow per-sample loop. The presets attend at <= 16x16 only, where the
    (HW x HW) matrix is small."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = (q.transpose(1, 2) @ k) * c**-0.5  # (b, hw, hw): query i, key j
        out = (v @ attn.softmax(-1).transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Conv2d):
    """Stride-2 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2). (A Conv2d subclass, so the
    parameter names stay `down.<i>.weight`, as in checkpoints of earlier versions.)"""

    def __init__(self, ch: int):
        super().__init__(ch, ch, 3, stride=2, padding=1)


class Keep(nn.Identity):
    """A transition between levels that does not halve (levels past num_downsamples): the
    features pass as they are, and are kept as a skip like a down-sampling's output."""


class Upsample(nn.Sequential):
    """Nearest-neighbour x2 then a 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, ch: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(ch, ch, 3, padding=1))


class ResBlock(nn.Module):
    """x -> skip(x) + conv2(drop(silu(norm2(conv1(silu(norm1(x))) + W emb)))), DDPM's block,
    followed by self-attention when `attention` (the resolution is in attn_resolutions)."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int, dropout: float = 0.0,
                 attention: bool = False):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.drop = dropout_layer(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = Attention(cout, groups) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        h = self.skip(x) + h
        return self.attn(h) if self.attn is not None else h


class UNet(nn.Module):
    """net(x, t, y=None) -> out, out.shape == x.shape; x (B, C, H, W), t (B,) forward times.

    in_channels: C; image_size: the side the network is built for (H and W must be
    multiples of 2^num_downsamples); base: channels of the first level; channel_mults: one
    multiplier per level; num_res_blocks: residual blocks per level (down path; the up path
    has one more, for the extra skip); attn_resolutions: image sides (e.g. (16,)) at which
    blocks get self-attention; attention: self-attention in the middle; num_downsamples:
    halvings, after the first levels (default len(channel_mults) - 1); num_classes: class-
    conditional on y (None: unconditional, y ignored); groups: GroupNorm groups (must
    divide base); dropout: in every residual block (0: none, vmap needs no randomness).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        base: int = 32,
        channel_mults: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_resolutions: tuple[int, ...] = (),
        attention: bool = True,
        num_downsamples: int | None = None,
        num_classes: int | None = None,
        groups: int = 8,
        dropout: float = 0.0,
    ):
        super().__init__()
        channel_mults = tuple(channel_mults)
        check_positive(in_channels=in_channels, image_size=image_size, base=base,
                        num_res_blocks=num_res_blocks, groups=groups)
        if not channel_mults or not all(isinstance(m, int) and m > 0 for m in channel_mults):
            raise FedscoreError(
                f"channel_mults must be a non-empty list of positive integers, got "
                f"{list(channel_mults)}"
            )
        levels = len(channel_mults)
        if num_downsamples is None:
            num_downsamples = levels - 1
        if not isinstance(num_downsamples, int) or not 0 <= num_downsamples <= levels - 1:
            raise FedscoreError(
                f"num_downsamples must be an integer in [0, {levels - 1}] (one halving "
                f"between consecutive levels of channel_mults), got {num_downsamples!r}"
            )
        if base % groups:
            raise FedscoreError(
                f"GroupNorm needs every channel count divisible by groups: base={base} is "
                f"not a multiple of groups={groups}; change model.options.base or groups"
            )
        check_image_size(image_size, image_size, num_downsamples, "image_size")
        resolutions = [image_size // 2 ** min(level, num_downsamples) for level in range(levels)]
        bad = sorted(set(attn_resolutions) - set(resolutions))
        if bad:
            raise FedscoreError(
                f"attn_resolutions {bad} are not resolutions this U-Net visits for "
                f"image_size={image_size}: it works at {sorted(set(resolutions), reverse=True)}"
            )
        self.image_size = image_size
        self.num_downsamples = num_downsamples
        self.num_classes = num_classes
        self.base = base
        self.temb_dim = temb = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.label_emb = nn.Embedding(num_classes + 1, temb) if num_classes else None
        self.inp = nn.Conv2d(in_channels, base, 3, padding=1)

        def block(cin: int, cout: int, res: int) -> ResBlock:
            return ResBlock(cin, cout, temb, groups, dropout, res in attn_resolutions)

        chans = [base * m for m in channel_mults]
        self.down = nn.ModuleList()
        skips, ch = [base], base
        for level, cout in enumerate(chans):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, cout, resolutions[level]))
                ch = cout
                skips.append(ch)
            if level < levels - 1:  # DDPM's topology; only the first transitions halve
                self.down.append(Downsample(ch) if level < num_downsamples else Keep())
                skips.append(ch)
        self.mid1 = ResBlock(ch, ch, temb, groups, dropout)
        self.mid_attn = Attention(ch, groups) if attention else None
        self.mid2 = ResBlock(ch, ch, temb, groups, dropout)
        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(ch + skips.pop(), chans[level], resolutions[level]))
                ch = chans[level]
            if 0 < level <= num_downsamples:
                self.up.append(Upsample(ch))
        self.out_norm = nn.GroupNorm(groups, ch)
        self.out = nn.Conv2d(ch, in_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.dim() != 4:
            raise FedscoreError(f"the U-Net takes images (B, C, H, W), got shape {tuple(x.shape)}")
        check_image_size(x.shape[-2], x.shape[-1], self.num_downsamples, "input images")
        emb = self.time_mlp(time_embedding(t.to(x.dtype), self.base))
        emb = add_label(emb, self.label_emb, y, self.num_classes)
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid1(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid2(h, emb)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))


def check_image_size(height: int, width: int, num_downsamples: int, what: str) -> None:
    """FedscoreError unless both sides halve num_downsamples times without remainder."""
    factor = 2**num_downsamples
    if height % factor == 0 and width % factor == 0:
        return
    side = height if height % factor else width
    chain, s = [str(side)], float(side)
    for _ in range(num_downsamples):
        s /= 2
        chain.append(f"{s:g}")
    raise FedscoreError(
        f"{what}: this U-Net halves the image {num_downsamples} times "
        f"({' -> '.join(chain)}), so height and width must be multiples of {factor} "
        f"(e.g. {', '.join(str(factor * k) for k in (2, 7, 8) if factor * k >= 8)}); got "
        f"{height}x{width}. Resize or pad the images, or lower model.options.num_downsamples"
    )


def unet_preset(
    size: str,
    in_channels: int,
    image_size: int,
    num_classes: int | None = None,
    **overrides,
) -> UNet:
    """A U-Net of a named size ("tiny" ~0.6 M parameters for CPU tests, "small" ~3.5 M,
    "paper" ~34.6 M, DDPM's CIFAR-10 network, for GPUs); `overrides` replace any UNet
    argument of the preset. Every preset halves twice: image sides must be multiples of 4."""
    if size not in PRESETS:
        raise unknown("U-Net size", size, PRESETS)
    kw = dict(PRESETS[size])
    divisors = kw.pop("attn_divisors", ())
    kw["attn_resolutions"] = tuple(image_size // d for d in divisors)
    kw.update(overrides)
    return UNet(in_channels, image_size, num_classes=num_classes, **kw)
