"""A small score network for vector data: sinusoidal embedding of log t + residual MLP.

Works under torch.func.functional_call / vmap / grad: no in-place ops on parameters, no
data-dependent control flow, no normalisation statistics.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def time_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of c = log(t), (B, dim). log t resolves the small times near
    delta (1e-3 .. 5e-5) as finely as the large ones, where sigma_t changes fastest."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=t.dtype, device=t.device) * (-math.log(1e3) / half))
    c = torch.log(t)[:, None] * freqs[None, :] * 4.0
    return torch.cat([torch.sin(c), torch.cos(c)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, hidden: int, time_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.temb = nn.Linear(time_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.fc1(nn.functional.silu(self.norm(h))) + self.temb(emb)
        return h + self.fc2(nn.functional.silu(z))


class ScoreMLP(nn.Module):
    """net(x, t, y=None) -> out with out.shape == x.shape; x (B, dim), t (B,) forward times.

    With num_classes set, a label embedding (index num_classes = "no label") is added to the
    time embedding."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, time_dim: int = 64,
                 num_classes: int | None = None):
        super().__init__()
        self.time_dim = time_dim
        self.num_classes = num_classes
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(),
                                      nn.Linear(time_dim, time_dim))
        self.label_emb = nn.Embedding(num_classes + 1, time_dim) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResBlock(hidden, time_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.time_mlp(time_embedding(t.to(x.dtype), self.time_dim))
        if self.label_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long,
                               device=x.device)
            emb = emb + self.label_emb(y)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.out_norm(h)))
