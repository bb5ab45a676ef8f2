"""The forward Ornstein–Uhlenbeck process, eq. 1: dX = -X dt + sqrt(2) dB.

Closed form: X_t | X_0 ~ N(e^{-t} X_0, sigma_t^2 I) with sigma_t^2 = 1 - e^{-2t}.
Every DDPM / VP schedule is this one SDE seen on another time grid (grids.py), so this is
the only diffusion process in the library.

Times are FORWARD times. A `t` argument is a float or a tensor broadcastable against the
batch axis (shape (B,)); the helpers reshape it to broadcast over the data dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_time(t: float | Tensor, like: Tensor) -> Tensor:
    """`t` as a tensor on `like`'s device/dtype, shaped (B, 1, ..., 1) to broadcast over `like`."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def mean_coef(t: float | Tensor) -> Tensor:
    """alpha_t = e^{-t}, the factor on X_0 in the marginal mean."""
    return torch.exp(-torch.as_tensor(t))


def sigma(t: float | Tensor) -> Tensor:
    """sigma_t = sqrt(1 - e^{-2t}), the marginal standard deviation (eq. 1's closed form).

    `-expm1(-2t)` keeps full precision at the small early-stopping times delta ~ 1e-3.
    """
    return torch.sqrt(-torch.expm1(-2.0 * torch.as_tensor(t)))


def marginal(x0: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std of X_t | X_0 = x0: (e^{-t} x0, sigma_t), broadcast over x0."""
    tt = as_time(t, x0)
    return mean_coef(tt) * x0, sigma(tt)


def perturb(x0: Tensor, t: float | Tensor, eps: Tensor) -> Tensor:
    """x_t = e^{-t} x0 + sigma_t eps, the reparameterised draw of X_t | X_0."""
    m, s = marginal(x0, t)
    return m + s * eps


def conditional_score(xt: Tensor, x0: Tensor, t: float | Tensor) -> Tensor:
    """grad log q(x_t | x_0) = -(x_t - e^{-t} x_0) / sigma_t^2 (the target in eq. 9)."""
    m, s = marginal(x0, t)
    return -(xt - m) / s**2


def t_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    """OU time of a DDPM step: e^{-2t} = alpha_bar, i.e. t = -0.5 log(alpha_bar)."""
    return -0.5 * torch.log(alpha_bar)


def alpha_bar(t: Tensor) -> Tensor:
    """DDPM's alpha_bar at OU time t: e^{-2t}."""
    return torch.exp(-2.0 * t)


def denoised(x: Tensor, score: Tensor, t: float | Tensor) -> Tensor:
    """Tweedie's formula for eq. 1: E[X_0 | X_t = x] = (x + sigma_t^2 grad log q_t(x)) / alpha_t."""
    tt = as_time(t, x)
    return (x + sigma(tt).pow(2) * score) / mean_coef(tt)


def clip_denoised(score_fn, low: float = -1.0, high: float = 1.0):
    """The score whose Tweedie estimate of X_0 (`denoised`) is clipped to [low, high].

    DDPM's samplers clip the predicted x_0 to the data range at every step (Ho et al. 2020,
    their released code); for a briefly trained network this keeps samples from drifting to
    saturated all-black or all-white images, the failure we saw on mnist5k after a few
    hundred steps. With s the network's score and x0 = clip(denoised(x, s, t)), the returned
    score is (alpha_t x0 - x) / sigma_t^2, exact where the estimate is already in range.
    Works on any (x, t) -> score callable, also stacked agents' (K, B, ...) scores.

    The result is a plain function: it carries none of score_fn's attributes. To clip a
    score function that watches the trajectory (the mixture aggregator), pass it to the
    sampler as the observer: `sample(clip_denoised(mix), ..., observer=mix)`.
    """

    def clipped(x: Tensor, t: Tensor) -> Tensor:
        x0 = denoised(x, score_fn(x, t), t).clamp(low, high)
        tt = as_time(t, x)
        return (mean_coef(tt) * x0 - x) / sigma(tt).pow(2)

    return clipped

