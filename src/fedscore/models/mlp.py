"""A small score network for vector data: sinusoidal embedding of log t + residual MLP.

Contract of every fedscore score network: net(x, t, y=None) -> out, out.shape == x.shape,
t the (B,) FORWARD times of the OU process dX = -X dt + sqrt(2) dB (SPEC §1). The caller
reads out as eps or as the score; the network does not know which.

Works under torch.func.functional_call / vmap / grad (the federated engine stacks workers on
a leading axis): no in-place ops on parameters, no data-dependent control flow, no
normalisation statistics (LayerNorm normalises each sample on its own).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedscore.errors import FedscoreError

T_FLOOR = 1e-12
"""Times are clamped to at least this before the log, so t = 0 gives a finite embedding
instead of NaN (the samplers stop at delta > 0; this only guards a careless caller)."""

MAX_FREQ = 4.0
"""Highest angular frequency of the embedding, in radians per unit of log t."""

FREQ_RATIO = 1e3
"""Ratio of the highest to the lowest frequency (geometric spacing in between)."""


def time_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of c = log(t): (B,) -> (B, dim) (dim even).

    emb = [sin(w_k c), cos(w_k c)], w_k = MAX_FREQ * FREQ_RATIO^(-k / (dim/2)), k < dim/2.

    Why log t rather than t (or DDPM's 1000 t): the times the samplers visit span
    t in [delta, T] = [5e-5 .. 1e-3, ~10], i.e. c in [-9.9, 2.3]. On a linear scale all of
    [5e-5, 1e-2] -- where sigma_t = sqrt(1 - e^{-2t}) and the score change fastest -- is one
    indistinguishable sliver; in c every factor of e in t is the same distance. The
    fastest feature (w = 4) turns by a radian when t changes by ~28%; the slowest
    (w = 0.004) varies monotonically over the whole range, so the network sees both a fine
    and a coarse (almost linear) code of the noise level. log t ~ 2 log sigma_t for small t,
    so this is also an embedding of log sigma_t where it matters, without saturating at
    large t where sigma_t -> 1.
    """
    half = dim // 2
    k = torch.arange(half, dtype=t.dtype, device=t.device)
    freqs = MAX_FREQ * torch.exp(k * (-math.log(FREQ_RATIO) / half))
    c = torch.log(t.clamp_min(T_FLOOR))[:, None] * freqs[None, :]
    return torch.cat([torch.sin(c), torch.cos(c)], dim=1)


def dropout_layer(p: float) -> nn.Module:
    """nn.Dropout(p), or an identity for p = 0: the identity draws no random numbers, so
    the network runs under vmap's default randomness="error" (with p > 0 the engine must
    pass randomness="different")."""
    if not 0.0 <= p < 1.0:
        raise FedscoreError(f"dropout must be in [0, 1), got {p}")
    return nn.Dropout(p) if p > 0 else nn.Identity()


class ResBlock(nn.Module):
    """h + fc2(silu(fc1(silu(norm(h))) + W emb)): the time (and label) embedding is added
    between the two layers, as in DDPM's residual blocks."""

    def __init__(self, hidden: int, time_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.temb = nn.Linear(time_dim, hidden)
        self.drop = dropout_layer(dropout)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.fc1(F.silu(self.norm(h))) + self.temb(emb)
        return h + self.fc2(self.drop(F.silu(z)))


class ScoreMLP(nn.Module):
    """net(x, t, y=None) -> out with out.shape == x.shape; x (B, dim), t (B,) forward times,
    y (B,) int64 labels or None.

    With num_classes set, a label embedding is added to the time embedding; row num_classes
    is the "null" label used when y is None (classifier-free set-ups train it by dropping
    labels). An unconditional network (num_classes=None) ignores y.

    Size (dim 2): the defaults (hidden 128, depth 3, time_dim 64) have ~134 k parameters;
    hidden 32, depth 2 ~17 k (the engine benchmark's small MLP).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 128,
        depth: int = 3,
        time_dim: int = 64,
        num_classes: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_positive(dim=dim, hidden=hidden, depth=depth, time_dim=time_dim)
        if time_dim % 2:
            raise FedscoreError(f"time_dim must be even (sin and cos halves), got {time_dim}")
        self.time_dim = time_dim
        self.num_classes = num_classes
        self.time_mlp = nn.Sequential(
            nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.label_emb = nn.Embedding(num_classes + 1, time_dim) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResBlock(hidden, time_dim, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.time_mlp(time_embedding(t.to(x.dtype), self.time_dim))
        emb = add_label(emb, self.label_emb, y, self.num_classes)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h)))


def add_label(
    emb: Tensor, table: nn.Embedding | None, y: Tensor | None, num_classes: int | None
) -> Tensor:
    """emb + table(y), with y = None meaning the null label (row num_classes) for every
    sample; emb unchanged for an unconditional network (table None)."""
    if table is None:
        return emb
    if y is None:
        return emb + table.weight[num_classes]
    return emb + table(y)


def check_positive(**sizes: int) -> None:
    """FedscoreError unless every size is a positive int (constructor arguments of the nets)."""
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise FedscoreError(f"{name} must be a positive integer, got {value!r}")
