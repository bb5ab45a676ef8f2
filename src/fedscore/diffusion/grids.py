"""Time grids (SPEC §1): one SDE, many grids.

A grid is the (K+1,) tensor of FORWARD times s_0 = T > s_1 > ... > s_K = delta (as
k-diffusion passes sigmas); the reverse-time points are t_k = T - s_k and the step lengths
gamma_k = t_{k+1} - t_k = s_k - s_{k+1}.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedscore.errors import FedscoreError, unknown

DEFAULT_T = 5.0
DEFAULT_DELTA = 1e-3


def _check(steps: int, T: float, delta: float) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise FedscoreError(f"steps must be an integer >= 1 (got {steps!r})")
    if not delta > 0:
        raise FedscoreError(f"delta (early-stopping time) must be > 0 (got {delta!r})")
    if not delta < T:
        raise FedscoreError(f"delta must be smaller than T (got delta={delta!r}, T={T!r})")


def uniform(steps: int, T: float = DEFAULT_T, delta: float = DEFAULT_DELTA) -> Tensor:
    """K equal steps from forward time T down to delta."""
    _check(steps, T, delta)
    return torch.linspace(T, delta, steps + 1, dtype=torch.float64)


def exponential(steps: int, T: float = DEFAULT_T, delta: float = DEFAULT_DELTA) -> Tensor:
    """Benton et al. (2024)'s grid, the one Corollary 2 assumes.

    Uniform steps while the forward time is above 1, then geometrically shrinking steps
    s_{k+1} = s_k / r from forward time 1 down to delta. The split of the K steps between
    the two parts minimises kappa, the smallest constant with
    gamma_k <= kappa * min(1, T - t_{k+1}) (= kappa * min(1, s_{k+1})).
    """
    _check(steps, T, delta)
    if T <= 1.0 or steps == 1:
        return torch.logspace(math.log10(T), math.log10(delta), steps + 1, dtype=torch.float64)
    if delta >= 1.0:
        return uniform(steps, T, delta)
    best = None
    for k_geo in range(1, steps):
        k_uni = steps - k_geo
        kappa = max((T - 1.0) / k_uni, (1.0 / delta) ** (1.0 / k_geo) - 1.0)
        if best is None or kappa < best[0]:
            best = (kappa, k_uni, k_geo)
    _, k_uni, k_geo = best
    upper = torch.linspace(T, 1.0, k_uni + 1, dtype=torch.float64)
    lower = torch.logspace(0.0, math.log10(delta), k_geo + 1, dtype=torch.float64)
    return torch.cat([upper, lower[1:]])


def ddpm_betas(n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear beta schedule (Ho et al. 2020)."""
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)


def ddpm_linear(steps: int = 999, n_train: int = 1000) -> Tensor:
    """The grid of DDPM's linear betas (1e-4 .. 0.02, 1000 steps) in OU time.

    alpha_bar_i = prod_{j<=i} (1 - beta_j) maps to t_i = -0.5 log(alpha_bar_i), i = 1..1000.
    DDPM's own last step goes to t_0 = 0, which early stopping excludes, so the full grid is
    the 1000 points t_1000 > ... > t_1 (999 steps; T = t_1000 ~ 5.03, delta = t_1 = 5e-5) and
    the betas are recovered from it exactly. With fewer steps the grid keeps evenly spaced
    DDPM indices (always the first and the last), as DDIM-style samplers do.
    """
    if not isinstance(steps, int) or not 1 <= steps <= n_train - 1:
        raise FedscoreError(f"ddpm-linear takes 1 <= steps <= {n_train - 1} (got {steps!r})")
    t = -0.5 * torch.log(torch.cumprod(1.0 - ddpm_betas(n_train), 0))  # t_1 .. t_n, ascending
    idx = torch.linspace(n_train - 1, 0, steps + 1, dtype=torch.float64).round().long()
    return t[idx]


GRIDS = {"uniform": uniform, "exponential": exponential, "ddpm-linear": ddpm_linear}


def time_grid(
    name: str, steps: int, T: float | None = None, delta: float | None = None
) -> Tensor:
    """(steps+1,) forward times, times[0] = T > ... > times[steps] = delta (float64).

    `name` is one of GRIDS. For "ddpm-linear" T and delta are fixed by DDPM's betas; passing
    them is an error rather than a silent override.
    """
    if name not in GRIDS:
        raise unknown("time grid", name, GRIDS)
    if name == "ddpm-linear":
        if T is not None or delta is not None:
            raise FedscoreError(
                "the ddpm-linear grid takes its T and delta from DDPM's betas; leave T and "
                "delta unset (or pick the 'uniform' or 'exponential' grid)"
            )
        return ddpm_linear(steps)
    T = DEFAULT_T if T is None else float(T)
    delta = DEFAULT_DELTA if delta is None else float(delta)
    return GRIDS[name](steps, T, delta)


def step_sizes(times: Tensor) -> Tensor:
    """gamma_k = s_k - s_{k+1} for a descending grid of forward times, shape (K,)."""
    return times[:-1] - times[1:]


def kappa(times: Tensor) -> float:
    """The smallest kappa with gamma_k <= kappa * min(1, s_{k+1}) (Corollary 2's condition)."""
    s_next = times[1:]
    return float((step_sizes(times) / torch.clamp(s_next, max=1.0)).max())
