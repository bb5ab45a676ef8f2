"""Federated inference with exact agents (issue 17, item 5): how far each aggregator's
samples lie from the pooled mixture, against the number of steps K, and what a sample
costs in agent evaluations. No training: the agents are the exact scores of the
`two-clients` preset's halves (client 0: the modes at x = -3, pi 0.6; client 1: x = +3,
pi 0.4), so every gap is the aggregator's (or the sampler's) own.

Distances to the pooled mixture, per aggregator and K (exponential integrator, exponential
grid over [1e-3, 6], n samples from one seeded noise):
  TV    total variation between the samples' component frequencies (each sample's most
        responsible component) and the mixture's weights (0.3, 0.3, 0.2, 0.2);
  MMD^2 unbiased squared MMD (RBF, median bandwidth) to n exact draws.
Cost: agent evaluations per sample over the whole run, counted at the agents (hybrid
evaluates every agent and masks, as implemented). A row "pooled" drives the sampler with
the pooled mixture's own exact score: the floor the discretisation leaves.

Usage: python benchmarks/fi_exact.py [--n 2000] [--steps 10 25 50 100 200]
Prints markdown tables (paste into docs/federated-inference.md).
"""

from __future__ import annotations

import argparse

import torch

from fedscore import diffusion, inference, toy
from fedscore.metrics.toy import mmd2_rbf

GM = toy.preset("two-clients")
CLIENTS = (GM.components([0, 1]), GM.components([2, 3]))
PI = [0.6, 0.4]
AGGREGATORS = ("mean", "weighted", "hybrid", "mixture", "route")


class Counted:
    """An agent's exact score that counts the samples it is evaluated on."""

    def __init__(self, gm):
        self.gm, self.samples = gm, 0

    def __call__(self, x, t):
        self.samples += x.shape[0]
        return self.gm.score(x, t)


def run(name: str, steps: int, n: int, exact: torch.Tensor) -> tuple[float, float, float]:
    """(TV of component frequencies, MMD^2, agent evaluations per sample)."""
    agents = [Counted(gm) for gm in CLIENTS]
    if name == "pooled":
        score_fn = Counted(GM)
        agents = [score_fn]
    else:
        options = {"generator": torch.Generator().manual_seed(7)} if name == "route" else {}
        score_fn = inference.combine(agents, name, weights=PI, **options)
    times = diffusion.time_grid("exponential", steps, T=6.0, delta=1e-3)
    g = torch.Generator().manual_seed(0)
    x = diffusion.sample(score_fn, torch.randn(n, 2, generator=g), times, "exp-integrator", g)
    comp = GM.responsibilities(x, 0.0).argmax(1)
    freq = torch.bincount(comp, minlength=GM.n_components).double() / n
    tv = 0.5 * float((freq - GM.weights).abs().sum())
    return tv, float(mmd2_rbf(x, exact)), sum(a.samples for a in agents) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100, 200])
    args = ap.parse_args()
    ks = args.steps
    exact = GM.sample(args.n, generator=torch.Generator().manual_seed(1))
    floor = float(mmd2_rbf(GM.sample(args.n, generator=torch.Generator().manual_seed(2)),
                           exact))
    rows = {name: [run(name, k, args.n, exact) for k in ks]
            for name in ("pooled", *AGGREGATORS)}
    head = "| aggregator | " + " | ".join(f"K={k}" for k in ks) + " |"
    rule = "|---" * (len(ks) + 1) + "|"
    for title, col, fmt in (("TV of component frequencies to the pooled mixture", 0, ".3f"),
                            (f"Squared MMD to exact draws (exact vs exact: {floor:.1e})", 1,
                             ".1e"),
                            ("Agent evaluations per sample", 2, ".0f")):
        print(f"\n{title}; two-clients, pi = {PI}, n = {args.n}, exp-integrator")
        print(head + "\n" + rule)
        for name, cells in rows.items():
            print(f"| {name} | " + " | ".join(format(c[col], fmt) for c in cells) + " |")


if __name__ == "__main__":
    main()
