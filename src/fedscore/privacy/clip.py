"""Clipping a worker's update to L2 norm C over its kept coordinates, and Gaussian noise:
the two pure functions of DP-FedAvg (McMahan et al. 2018, "Learning differentially private
recurrent language models", Alg. 1) on eq. 8's inputs.

A worker's update is Delta_n = theta_{q,n,S} - theta_q on the coordinates it kept
(m_{q,n} = 1). A pruned coordinate is not part of its contribution to eq. 8 at all (the sums
never see it and it stays zero in the worker's model), so the norm is taken over the kept
coordinates of all tensors together, and clipping never touches a pruned one:

    Delta_n <- Delta_n * min(1, C / ||Delta_n ⊙ m_n||_2)

Three forms of the same maths: one worker as dicts (`clip_update`), N workers stacked as
one flat (N, D) matrix (`clip_rows`, the in-process engine), and a Flower reply's kept values
in mask order (`clip_kept`, `flower.transport`).
"""

from __future__ import annotations

import torch
from torch import Tensor

Params = dict[str, Tensor]


def clip_factor(norm: Tensor, clip: float) -> Tensor:
    """min(1, C / ||Delta||), elementwise over a tensor of norms (1 where the norm is 0)."""
    return torch.clamp(clip / norm.clamp(min=torch.finfo(norm.dtype).tiny), max=1.0)


def clip_update(theta: Params, theta_q: Params, mask: Params, clip: float
                ) -> tuple[Params, float]:
    """One worker's clipped model and its update's norm before clipping.

    theta: theta_{q,n,S}; theta_q: the global model it started from; mask: m_{q,n} (bool);
    all name -> same shape. Returns (theta_q + Delta * min(1, C / ||Delta||) on kept
    coordinates, 0 on pruned ones (as eq. 7 leaves them); ||Delta|| over kept coordinates of
    all tensors together, as a float)."""
    with torch.no_grad():
        deltas = {k: torch.where(mask[k], theta[k] - theta_q[k].to(theta[k].dtype), 0)
                  for k in theta}
        norm = torch.sqrt(sum(d.double().pow(2).sum() for d in deltas.values()))
        factor = clip_factor(norm, clip)
        out = {k: torch.where(mask[k], theta_q[k].to(d.dtype) + d * factor.to(d.dtype), 0)
               for k, d in deltas.items()}
    return out, float(norm)


def clip_rows(worker_flat: Tensor, theta_flat: Tensor, masks_flat: Tensor, clip: float
              ) -> tuple[Tensor, Tensor]:
    """`clip_update` for N workers stacked: worker_flat (N, D), theta_flat (D,) = theta_q,
    masks_flat (N, D) bool. Returns (clipped (N, D), norms before clipping (N,))."""
    with torch.no_grad():
        delta = torch.where(masks_flat, worker_flat - theta_flat[None], 0)
        norms = delta.double().pow(2).sum(1).sqrt()
        factor = clip_factor(norms, clip).to(delta.dtype)
        clipped = torch.where(masks_flat, theta_flat[None] + delta * factor[:, None], 0)
    return clipped, norms


def clip_kept(kept: Params, masks: Params, theta_q: Params, clip: float
              ) -> tuple[Params, float]:
    """`clip_update` on a Flower reply's form: kept[name] is the worker's kept values (1-D,
    in mask order, `flower.payload`), masks[name] its mask (bool, theta_q's shape). Returns
    (the clipped kept values, same form; the norm before clipping)."""
    with torch.no_grad():
        base = {k: theta_q[k].reshape(-1)[masks[k].reshape(-1)].to(v.dtype)
                for k, v in kept.items()}
        deltas = {k: v - base[k] for k, v in kept.items()}
        norm = torch.sqrt(sum(d.double().pow(2).sum() for d in deltas.values()))
        factor = clip_factor(norm, clip)
        out = {k: base[k] + d * factor.to(d.dtype) for k, d in deltas.items()}
    return out, float(norm)


def gaussian_noise(like: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """N(0, std^2) per coordinate, shaped and typed like `like`, drawn from `generator` on
    the generator's device (then moved to like's), so the same seed gives the same noise
    whoever draws it (seeds: `federated.seeding.noise_seed`)."""
    draw = torch.randn(like.shape, generator=generator, dtype=torch.float32,
                       device=generator.device)
    return (draw * std).to(device=like.device, dtype=like.dtype)


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed` (noise is drawn on the CPU: the same bits on every
    device)."""
    return torch.Generator().manual_seed(seed)
