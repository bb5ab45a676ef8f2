"""The exact law of a sampler's output when the data are one Gaussian.

For data N(mu, S) the exact score at every t is affine in x, and every sampler step of
`fedscore.diffusion.samplers` is then affine in (x, noise): x' = A x + b + G eps. Reading
A, b and G off the step function itself (by evaluating it on basis vectors) and pushing the
mean and covariance through the K steps gives the output law exactly, with no Monte Carlo
error. Its KL divergence to q_delta measures discretisation error alone, which makes the
"error shrinks as K grows" claims sharp in tests and benchmarks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedscore.diffusion.samplers import SAMPLERS
from fedscore.toy.gmm import GaussianMixture


def gaussian_kl(m1: Tensor, c1: Tensor, m2: Tensor, c2: Tensor) -> float:
    """KL(N(m1, c1) || N(m2, c2)) in nats."""
    d = m1.shape[0]
    c2_inv = torch.linalg.inv(c2)
    diff = m2 - m1
    _, logdet1 = torch.linalg.slogdet(c1)
    _, logdet2 = torch.linalg.slogdet(c2)
    return 0.5 * float(torch.trace(c2_inv @ c1) + diff @ c2_inv @ diff - d + logdet2 - logdet1)


def sampler_output_law(
    method: str, gm: GaussianMixture, times: Tensor, start_cov: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Mean (d,) and covariance (d, d) of `method`'s output from Y_0 ~ N(0, start_cov)
    (identity by default) driven by the exact score of the one-component mixture `gm`."""
    if gm.n_components != 1:
        raise ValueError("the exact output law needs a one-component (Gaussian) mixture")
    step = SAMPLERS[method]
    d = gm.dim
    eye = torch.eye(d, dtype=torch.float64)
    zero = torch.zeros(1, d, dtype=torch.float64)
    m = torch.zeros(d, dtype=torch.float64)
    c = eye.clone() if start_cov is None else start_cov.to(torch.float64)
    grid = [float(s) for s in times]
    for k in range(len(grid) - 1):
        s, s_next = grid[k], grid[k + 1]

        def run(x: Tensor, noise: Tensor, s: float = s, s_next: float = s_next) -> Tensor:
            return step(gm.score, x, s, s_next, lambda: noise)[0][0]

        b = run(zero, zero)
        a = torch.stack([run(eye[i : i + 1], zero) - b for i in range(d)], 1)
        g = torch.stack([run(zero, eye[j : j + 1]) - b for j in range(d)], 1)
        m = a @ m + b
        c = a @ c @ a.T + g @ g.T
    return m, c


def target_law(gm: GaussianMixture, t: float) -> tuple[Tensor, Tensor]:
    """Mean and covariance of q_t for a one-component mixture."""
    a = math.exp(-t)
    d = gm.dim
    cov = a**2 * gm.covs[0] + (-math.expm1(-2 * t)) * torch.eye(d, dtype=torch.float64)
    return a * gm.means[0], cov


def sampler_kl(method: str, gm: GaussianMixture, times: Tensor) -> float:
    """KL(law of the sampler's output || q_delta), delta = times[-1]; start N(0, I).

    Includes the (tiny, e^{-2T}-sized) error of starting from N(0, I) instead of q_T."""
    m, c = sampler_output_law(method, gm, times)
    mt, ct = target_law(gm, float(times[-1]))
    return gaussian_kl(m, c, mt, ct)
