"""Reverse-SDE samplers: each a function of a score function, a grid and a generator.

Reverse time Y_tau = X_{T - tau} solves dY = (Y + 2 grad log q_{T-tau}(Y)) dtau + sqrt(2) dB
(eq. 3 for the OU process). A grid is the descending tensor of forward times
times[0] = T > ... > times[K] = delta; step k goes from forward time s = times[k] to
s' = times[k+1] with length h = gamma_k = s - s'.

Every sampler is one step rule `(score_fn, x, s, s_next, noise_fn) -> (x_next, score)` run
by the single loop in `sample` (k-diffusion's shape: no hidden step counter). After each
step the loop calls `observer.observe(x_prev, x_next, t_prev, t_next)` (the `Observer`
protocol; federated inference's mixture tracks its agents' densities this way), and the
optional `callback(dict)` with the step's score too. Before the first step it calls
`begin_sampling(x_T, times, method)` on the observer and on the score function where they
have one, so a stateful score function (federated inference's mixture and route) starts
afresh for each sampling call and can refuse a sampler it cannot follow.

Each stochastic step is a Gaussian transition x' = a x + c score(x) + sqrt(v) eps; KERNELS
gives its (a, c, v) for a step s -> s', so a watcher can read what the sampler injects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fedscore.errors import FedscoreError, unknown

ScoreFn = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[], Tensor]
Step = Callable[[ScoreFn, Tensor, float, float, NoiseFn], tuple[Tensor, Tensor]]


@runtime_checkable
class Observer(Protocol):
    """Watches the trajectory: called once after every step of `sample`, with the step's
    start and end x (B, ...) and forward times t_prev > t_next as (B,) tensors."""

    def observe(self, x_prev: Tensor, x_next: Tensor, t_prev: Tensor, t_next: Tensor) -> None:
        ...


def _t(x: Tensor, s: float) -> Tensor:
    return torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)


def exp_integrator_step(score_fn, x, s, s_next, noise):
    """Eq. 24 (Appendix C): the reverse SDE solved exactly with the score frozen at Y_k,

    Y_{k+1} = e^{h} Y_k + 2 (e^{h} - 1) s(Y_k, T - t_k) + sqrt(e^{2h} - 1) eps_k.
    """
    h = s - s_next
    score = score_fn(x, _t(x, s))
    x_next = math.exp(h) * x + 2.0 * math.expm1(h) * score + math.sqrt(math.expm1(2 * h)) * noise()
    return x_next, score


def euler_maruyama_step(score_fn, x, s, s_next, noise):
    """Euler–Maruyama on eq. 3: Y_{k+1} = Y_k + h (Y_k + 2 s(Y_k)) + sqrt(2 h) eps_k."""
    h = s - s_next
    score = score_fn(x, _t(x, s))
    return x + h * (x + 2.0 * score) + math.sqrt(2.0 * h) * noise(), score


def ancestral_step(score_fn, x, s, s_next, noise):
    """DDPM ancestral step (Ho et al. 2020) between OU times s > s'.

    With alpha = e^{-2h} (so beta = 1 - alpha) and alpha_bar_t = e^{-2t}, the posterior
    q(x_{s'} | x_s, x0-hat) with Tweedie's x0-hat has mean (x + beta s(x)) / sqrt(alpha) and
    variance beta (1 - alpha_bar_{s'}) / (1 - alpha_bar_s) (DDPM's beta-tilde choice).
    """
    h = s - s_next
    beta = -math.expm1(-2.0 * h)
    score = score_fn(x, _t(x, s))
    mean = (x + beta * score) / math.sqrt(1.0 - beta)
    var = beta * (-math.expm1(-2.0 * s_next)) / (-math.expm1(-2.0 * s))
    return mean + math.sqrt(var) * noise(), score


def pf_ode_step(score_fn, x, s, s_next, noise):
    """Probability-flow ODE dY = (Y + s(Y)) dtau, solved exactly with the score frozen:
    Y_{k+1} = e^{h} Y_k + (e^{h} - 1) s(Y_k). Deterministic: no noise is drawn."""
    h = s - s_next
    score = score_fn(x, _t(x, s))
    return math.exp(h) * x + math.expm1(h) * score, score


def pf_ode_heun_step(score_fn, x, s, s_next, noise):
    """Probability-flow ODE with Heun's second-order step (EDM): an Euler predictor and the
    trapezoid corrector on f(Y, s) = Y + s(Y, s). Two score evaluations per step."""
    h = s - s_next
    score = score_fn(x, _t(x, s))
    d = x + score
    x_pred = x + h * d
    d_next = x_pred + score_fn(x_pred, _t(x, s_next))
    return x + 0.5 * h * (d + d_next), score


def exp_integrator_kernel(s: float, s_next: float) -> tuple[float, float, float]:
    """(a, c, v) of eq. 24: a = e^h, c = 2 (e^h - 1), v = e^{2h} - 1."""
    h = s - s_next
    return math.exp(h), 2.0 * math.expm1(h), math.expm1(2 * h)


def euler_maruyama_kernel(s: float, s_next: float) -> tuple[float, float, float]:
    """(a, c, v) of Euler–Maruyama: a = 1 + h, c = 2h, v = 2h."""
    h = s - s_next
    return 1.0 + h, 2.0 * h, 2.0 * h


def ancestral_kernel(s: float, s_next: float) -> tuple[float, float, float]:
    """(a, c, v) of the DDPM ancestral step: a = 1/sqrt(alpha), c = beta/sqrt(alpha),
    v = beta (1 - alpha_bar_{s'}) / (1 - alpha_bar_s)."""
    h = s - s_next
    beta = -math.expm1(-2.0 * h)
    root = math.sqrt(1.0 - beta)
    return 1.0 / root, beta / root, beta * (-math.expm1(-2.0 * s_next)) / (-math.expm1(-2.0 * s))


SAMPLERS: dict[str, Step] = {
    "exp-integrator": exp_integrator_step,
    "euler-maruyama": euler_maruyama_step,
    "ancestral": ancestral_step,
    "pf-ode": pf_ode_step,
    "pf-ode-heun": pf_ode_heun_step,
}
STOCHASTIC = {"exp-integrator", "euler-maruyama", "ancestral"}
KERNELS: dict[str, Callable[[float, float], tuple[float, float, float]]] = {
    "exp-integrator": exp_integrator_kernel,
    "euler-maruyama": euler_maruyama_kernel,
    "ancestral": ancestral_kernel,
}
"""The stochastic samplers' steps as Gaussian transitions: KERNELS[m](s, s') = (a, c, v) with
x' = a x + c score(x, s) + sqrt(v) eps (the step functions compute the same numbers; a test
checks they agree). The deterministic samplers have none: they inject no noise."""


def prior(
    shape: tuple[int, ...], generator: torch.Generator | None = None, dtype=torch.float32
) -> Tensor:
    """Y_0 ~ N(0, I), the reverse process's start (q_T for large T)."""
    return torch.randn(shape, generator=generator, dtype=dtype)


def sample(
    score_fn: ScoreFn,
    x_T: Tensor,
    times: Tensor,
    method: str = "exp-integrator",
    generator: torch.Generator | None = None,
    *,
    observer: Observer | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> Tensor:
    """Run the reverse process from x_T at forward time times[0] down to times[-1].

    score_fn(x, t) -> score, with t a (B,) tensor of forward times.
    observer: its observe(x_prev, x_next, t_prev, t_next) is called once after every step
        (t's as (B,) tensors). Default: score_fn itself when it has an `observe` method
        (SPEC §6), so a mixture passed as score_fn tracks its weights unaided. Pass the
        observer explicitly when score_fn wraps it (e.g. `clip_denoised(mixture)` with
        observer=mixture); an explicit observer replaces the default, it is not added.
    callback: receives {"k", "x", "x_next", "t", "t_next", "score"} after every step.
    Before the first step, `begin_sampling(x_T, times, method)` is called on the observer and
    on score_fn (once each) where they define it: the hook by which a stateful score function
    resets itself, and refuses (FedscoreError) a sampler it cannot follow.
    """
    if method not in SAMPLERS:
        raise unknown("sampler", method, SAMPLERS)
    if times.ndim != 1 or len(times) < 2:
        raise FedscoreError("times must be a 1-D grid with at least two points")
    if not bool((times[:-1] > times[1:]).all()):
        raise FedscoreError("times must be forward times in strictly descending order")
    step = SAMPLERS[method]
    if observer is None:
        observe = getattr(score_fn, "observe", None)
    elif isinstance(observer, Observer):
        observe = observer.observe
    else:
        raise FedscoreError(
            f"observer must have a method observe(x_prev, x_next, t_prev, t_next); got "
            f"{type(observer).__name__}"
        )
    for watcher in {id(w): w for w in (observer, score_fn) if w is not None}.values():
        begin = getattr(watcher, "begin_sampling", None)
        if callable(begin):
            begin(x_T, times, method)
    x = x_T

    def noise() -> Tensor:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    grid = [float(s) for s in times]
    with torch.no_grad():
        for k in tqdm(range(len(grid) - 1), disable=not progress, desc=f"sampling ({method})"):
            s, s_next = grid[k], grid[k + 1]
            x_next, score = step(score_fn, x, s, s_next, noise)
            if observe is not None:
                observe(x, x_next, _t(x, s), _t(x, s_next))
            if callback is not None:
                callback(
                    {"k": k, "x": x, "x_next": x_next, "t": s, "t_next": s_next, "score": score}
                )
            x = x_next
    return x

