"""Sampling from a trained run: the model's score function, a grid and a seeded generator.

On a device (`runtime.Runtime`), only the network runs there (`on_device`): the sampler's
state, its noise (from the CPU generator, so every device draws the same noise) and the
update stay on the CPU in fp32; x and t go to the device for each call and the score comes
back in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedscore import diffusion
from fedscore.config import RunConfig
from fedscore.runtime import CPU_FP32, Runtime


class OnDevice:
    """A score callable (a ScoreModel, or StackedAgents (x, t[, y]) -> (K, B, ...)) whose
    network lies on `runtime.device`, evaluated there under `runtime.autocast()` from CPU
    inputs; returns fp32 on the inputs' device. Labels bound with `with_labels` move to the
    device; other attributes (n_agents, weights_for, counts, ...) are the wrapped one's."""

    def __init__(self, score, runtime: Runtime):
        labels = getattr(score, "labels", None)
        if isinstance(labels, Tensor) and labels.device != runtime.device:
            score = score.with_labels(labels.to(runtime.device))
        self.score, self.runtime = score, runtime

    def __call__(self, x: Tensor, t: Tensor, *rest) -> Tensor:
        dev = self.runtime.device
        rest = tuple(r.to(dev) if isinstance(r, Tensor) else r for r in rest)
        with torch.no_grad(), self.runtime.autocast():
            out = self.score(x.to(dev), t.to(dev), *rest)
        return out.to(device=x.device, dtype=torch.float32)

    def with_labels(self, labels: Tensor | None) -> OnDevice:
        return OnDevice(self.score.with_labels(labels), self.runtime)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("score", "runtime"):
            raise AttributeError(name)
        return getattr(self.score, name)


def on_device(score, runtime: Runtime):
    """`score` run on `runtime` (OnDevice), or `score` itself for the CPU in fp32."""
    if runtime.device.type == "cpu" and runtime.precision == "fp32":
        return score
    return OnDevice(score, runtime)


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
    runtime: Runtime | None = None,
) -> Tensor:
    """n samples with the run's sampler settings (cfg.sample), in batches; the model's
    network on `runtime` (where the model lies; default the CPU in fp32, see `on_device`).

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
        score_fn = on_device(model_score_fn(model, cfg, y), runtime or CPU_FP32)
        if cfg.sample.clip_denoised:
            score_fn = diffusion.clip_denoised(score_fn)
        out.append(
            diffusion.sample(score_fn, x_T, times, cfg.sample.method, generator=g,
                             progress=progress)
        )
    return torch.cat(out)
