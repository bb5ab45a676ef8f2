"""Sampling from a trained run: the model's score function, a grid and a seeded generator."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedscore import diffusion
from fedscore.config import RunConfig


def model_score_fn(
    model: nn.Module, cfg: RunConfig, labels: Tensor | None = None
) -> diffusion.ScoreModel:
    """(x, t) -> score of a run's model: its parameterisation, and the labels (B,) bound
    when the model is class-conditional (ignored otherwise)."""
    return diffusion.ScoreModel(model, cfg.diffusion.parameterisation,
                                labels if cfg.model.conditional else None)


def sampling_grid(cfg: RunConfig) -> Tensor:
    """The sampler's grid: cfg.sample's name and steps over the training run's [delta, T]."""
    if cfg.sample.grid == "ddpm-linear":
        return diffusion.time_grid("ddpm-linear", cfg.sample.steps)
    return diffusion.time_grid(
        cfg.sample.grid, cfg.sample.steps, T=cfg.diffusion.T, delta=cfg.diffusion.delta
    )


def sample_model(
    model: nn.Module,
    cfg: RunConfig,
    n: int,
    *,
    seed: int = 0,
    labels: Tensor | None = None,
    sample_shape: tuple[int, ...],
    progress: bool = False,
    batch_size: int = 1000,
) -> Tensor:
    """n samples with the run's sampler settings (cfg.sample), in batches.

    Each batch has its own generator seeded by (seed, batch index), so the samples do not
    depend on how many batches run before them in this process.
    """
    times = sampling_grid(cfg)
    out = []
    for b, start in enumerate(range(0, n, batch_size)):
        m = min(batch_size, n - start)
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        y = labels[start : start + m] if labels is not None else None
        x_T = diffusion.prior((m, *sample_shape), generator=g)
        score_fn = model_score_fn(model, cfg, y)
        if cfg.sample.clip_denoised:
            score_fn = diffusion.clip_denoised(score_fn)
        out.append(
            diffusion.sample(score_fn, x_T, times, cfg.sample.method, generator=g,
                             progress=progress)
        )
    return torch.cat(out)
