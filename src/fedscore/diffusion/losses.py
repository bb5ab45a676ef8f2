"""Denoising score matching: eq. 9 and DDPM's simple loss, as pure functions.

A network's raw output is read through a parameterisation:
  - "score": the output is the score s_theta(x, t);
  - "eps":   the output is eps_theta and s_theta = -eps_theta / sigma_t (DDPM's).

Randomness (which grid point, which eps) is drawn by `draw_noise` OUTSIDE the loss so the
loss is a pure function of tensors: the federated engine can vmap it over workers and the
vectorised and sequential engines see the same noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fedscore.diffusion.grids import step_sizes
from fedscore.diffusion.sde import as_time, conditional_score, perturb, sigma
from fedscore.errors import unknown

NetFn = Callable[[Tensor, Tensor], Tensor]  # raw network output (x, t) -> out, out.shape == x.shape
ScoreFn = Callable[[Tensor, Tensor], Tensor]  # (x, t) -> score

PARAMETERISATIONS = ("score", "eps")
WEIGHTINGS = ("paper", "eps")


def to_score(out: Tensor, t: Tensor, parameterisation: str = "eps") -> Tensor:
    """The score a network output stands for: out itself, or -out / sigma_t."""
    if parameterisation == "score":
        return out
    if parameterisation == "eps":
        return -out / sigma(as_time(t, out))
    raise unknown("parameterisation", parameterisation, PARAMETERISATIONS)


def to_eps(out: Tensor, t: Tensor, parameterisation: str = "eps") -> Tensor:
    """The eps a network output stands for: out itself, or -sigma_t * out."""
    if parameterisation == "eps":
        return out
    if parameterisation == "score":
        return -sigma(as_time(t, out)) * out
    raise unknown("parameterisation", parameterisation, PARAMETERISATIONS)


def score_fn_of(net_fn: NetFn, parameterisation: str = "eps") -> ScoreFn:
    """Wrap a raw network (x, t) -> out into a score function (x, t) -> score."""

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        return to_score(net_fn(x, t), t, parameterisation)

    return score_fn


def draw_noise(
    x0: Tensor, times: Tensor, weighting: str = "paper", generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Forward times t (B,) and noise eps (like x0) for one DSM mini-batch.

    `paper`: grid point k in 0..K-1 drawn with probability gamma_k / sum(gamma), so that
    (sum gamma) * ||s - target||^2 is an unbiased estimate of eq. 9's sum over k.
    `eps`: k uniform over 0..K-1 (DDPM draws its step index uniformly).
    """
    if weighting not in WEIGHTINGS:
        raise unknown("loss weighting", weighting, WEIGHTINGS)
    gammas = step_sizes(times)
    probs = gammas if weighting == "paper" else torch.ones_like(gammas)
    k = torch.multinomial(probs, x0.shape[0], replacement=True, generator=generator)
    t = times[k].to(x0.dtype)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    return t.to(x0.device), eps


def dsm_loss(
    net_fn: NetFn,
    x0: Tensor,
    t: Tensor,
    eps: Tensor,
    *,
    weighting: str = "paper",
    parameterisation: str = "eps",
    total_time: float = 1.0,
) -> Tensor:
    """One mini-batch of denoising score matching; a scalar.

    `paper` (eq. 9): total_time * mean_b || s_theta(x_t, t) - grad log q(x_t | x_0) ||^2 with
    t drawn by `draw_noise` proportionally to gamma_k and total_time = sum_k gamma_k = T -
    delta: an unbiased estimate of F_n(theta).
    `eps` (DDPM's simple loss): mean || eps_theta(x_t, t) - eps ||^2 over batch and pixels.
    Both have the same minimiser; eq. 9's value is always available from `eq9_value`.
    """
    xt = perturb(x0, t, eps)
    out = net_fn(xt, t)
    if weighting == "paper":
        err = to_score(out, t, parameterisation) - conditional_score(xt, x0, t)
        return total_time * err.pow(2).flatten(1).sum(1).mean()
    if weighting == "eps":
        return (to_eps(out, t, parameterisation) - eps).pow(2).mean()
    raise unknown("loss weighting", weighting, WEIGHTINGS)


@torch.no_grad()
def eq9_value(
    score_fn: ScoreFn,
    x0: Tensor,
    times: Tensor,
    generator: torch.Generator | None = None,
    repeats: int = 1,
) -> float:
    """Eq. 9 evaluated on a fixed batch over the whole grid (stratified over k):

        sum_{k=0}^{K-1} gamma_k E || s(Y_{t_k}, T - t_k) - grad log q(Y_{t_k} | X_0) ||^2.

    Every run reports this value on a held-out batch so that runs trained with either
    weighting compare on one scale. By Appendix B it exceeds the true score error
    sum_k gamma_k E||s - grad log q_t||^2 by a constant that does not depend on s.
    """
    gammas = step_sizes(times)
    total = 0.0
    for _ in range(repeats):
        for k in range(len(gammas)):
            t = torch.full((x0.shape[0],), float(times[k]), dtype=x0.dtype, device=x0.device)
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
            xt = perturb(x0, t, eps.to(x0.device))
            err = score_fn(xt, t) - conditional_score(xt, x0, t)
            total += float(gammas[k]) * float(err.pow(2).flatten(1).sum(1).mean())
    return total / repeats
