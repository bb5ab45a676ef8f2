"""How well the mixture aggregator tracks its weights, before and after step-consistent
increments (issue 17, item 3), with exact agent scores.

The test of the issue: d = 32, agent A = N(mu, 0.09 I) with pi = 0.7, agent B =
N(-mu, 0.36 I) with pi = 0.3 (mu = 0.2 * ones, |mu| = 1.13), exponential grid over
[1e-3, 5], 1,000 samples. The exact posterior weight w*_A(x, t) = pi_A q_t^A / q_t is known
at every step; the error is the mean over samples of |w_A - w*_A|, at the worst time of the
grid (where the agents' laws overlap most; at t = delta the weights are 0 or 1 and every
variant looks exact). "before": the Itô increment of the previous version (noise variance
taken as 2h whatever the sampler); "after": each sampler's own transition
(diffusion.samplers.KERNELS). Also: the fraction of the samples that land in A's part of
space (w*_A > 1/2 at t = delta; target 0.70). The deterministic samplers are run "before"
only: they are refused now.

Usage: python benchmarks/mixture_weights.py [--n 1000] [--steps 25 100 400]
Prints one markdown table (paste into docs/federated-inference.md).
"""

from __future__ import annotations

import argparse
import math

import torch

from fedscore import diffusion, inference, toy

D, T, DELTA, PI = 32, 5.0, 1e-3, (0.7, 0.3)


def agents() -> tuple[toy.GaussianMixture, toy.GaussianMixture]:
    mu = 0.2 * torch.ones(1, D, dtype=torch.float64)
    return (toy.GaussianMixture.isotropic([1.0], mu, 0.3),
            toy.GaussianMixture.isotropic([1.0], -mu, 0.6))


def exact_weight(a, b, x: torch.Tensor, t: float) -> torch.Tensor:
    """w*_A(x, t) = pi_A q_t^A(x) / (pi_A q_t^A(x) + pi_B q_t^B(x)), (n,)."""
    la = a.log_prob(x.double(), t) + math.log(PI[0])
    lb = b.log_prob(x.double(), t) + math.log(PI[1])
    return torch.sigmoid(la - lb)


def run(method: str, steps: int, n: int, after: bool, seed: int = 0) -> tuple[float, float]:
    """(worst-time mean |w_A - w*_A|, fraction of samples in A's part) for one sampler."""
    a, b = agents()
    mix = inference.combine([a.score, b.score], "mixture", weights=list(PI))
    errors = []

    class Watch:
        """Forwards to the mixture and measures after every step; forwards the sampler's
        begin_sampling (the "after" increments) or not (the Itô increment, "before")."""

        def __call__(self, x, t):
            return mix(x, t)

        def observe(self, x_prev, x_next, t_prev, t_next):
            mix.observe(x_prev, x_next, t_prev, t_next)
            w_star = exact_weight(a, b, x_next, float(t_next[0]))
            errors.append(float((mix.weights_now()[:, 0] - w_star).abs().mean()))

        def begin_sampling(self, x_T, times, method):
            if after:
                mix.begin_sampling(x_T, times, method)

    times = diffusion.time_grid("exponential", steps, T=T, delta=DELTA)
    g = torch.Generator().manual_seed(seed)
    x = diffusion.sample(Watch(), torch.randn(n, D, generator=g), times, method, g)
    in_a = float((exact_weight(a, b, x, DELTA) > 0.5).double().mean())
    return max(errors), in_a


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 100, 400])
    args = ap.parse_args()
    ks = args.steps
    print(f"\nMixture weight error, worst time on the grid, mean |w_A - w*_A| (fraction of "
          f"samples in A's part, target 0.70); d={D}, n={args.n}, exponential grid, T={T}")
    print("| sampler | increments | " + " | ".join(f"K={k}" for k in ks) + " |")
    print("|---|---|" + "---|" * len(ks))
    for method in ("euler-maruyama", "exp-integrator", "ancestral", "pf-ode"):
        variants = [False, True] if method in diffusion.samplers.KERNELS else [False]
        for after in variants:
            cells = [run(method, k, args.n, after) for k in ks]
            name = "after (own kernel)" if after else "before (Itô, 2h)"
            print(f"| {method} | {name} | "
                  + " | ".join(f"{e:.3f} ({f:.2f})" for e, f in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
