"""Theorem 1 on real runs: the ring split across 10 workers by component, levels F/L/M/S.

For each level, a federated run with the estimators on (`theory.estimate: true`), then
Theorem 1 with the measured constants: Gamma*, w, sigma_1, sigma_2, L (a lower estimate),
the bound, its dominant term, whether its conditions hold, and the observed left-hand side.

Usage: python benchmarks/theory_levels.py [--out runs/theory-levels] [--rounds 20]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fedscore.config import load_config
from fedscore.runs.federated import train_federated
from fedscore.theory import constants_from_metrics, run_bound, theorem1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/theory-levels"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--policy", default="random")
    args = ap.parse_args()
    rows = []
    for level in "FLMS":
        cfg = load_config(
            None, name=f"{args.policy}-{level}", out_dir=str(args.out),
            data={"name": "gmm:ring8"},
            model={"kind": "mlp", "options": {"hidden": 64, "depth": 2}},
            diffusion={"grid": "exponential", "steps": 50, "T": 5.0, "delta": 1e-3},
            federation={"workers": 10, "rounds": args.rounds, "local_steps": 5,
                        "batch_size": 32, "lr": 1e-3, "optimizer": "sgd",
                        "policy": args.policy, "level": level,
                        "partition": {"scheme": "shards", "classes_per_worker": 2}},
            theory={"estimate": True, "every": 5, "full_batch": 512},
        )
        resume = (cfg.run_dir() / "checkpoint.safetensors").is_file()
        run = train_federated(cfg, resume=resume, progress=False)
        c = constants_from_metrics(run.folder.metrics())
        keys = ("L", "w", "sigma1", "sigma2", "N", "gamma_star", "S", "Q", "eta", "F0", "FQ",
                "theta0_sq")
        b = theorem1(**{k: c[k] for k in keys})
        run_bound(run.folder.path, None, None)
        rows.append((level, c, b))
    print("\n| level | Gamma* | w^2 | sigma1^2 | sigma2^2 | L (lower est.) | bound | dominant "
          "| conditions | observed LHS |\n|---|---|---|---|---|---|---|---|---|---|")
    for level, c, b in rows:
        ok = "met" if not b.violations else f"{len(b.violations)} violated"
        print(f"| {level} | {c['gamma_star']} | {c['w'] ** 2:.3f} | {c['sigma1'] ** 2:.3g} | "
              f"{c['sigma2'] ** 2:.3g} | {c['L']:.3g} | {b.total:.4g} | {b.dominant} | {ok} | "
              f"{c['observed_lhs']:.4g} |")
    below = all(c["observed_lhs"] <= b.total for _, c, b in rows if math.isfinite(b.total))
    print(f"\nobserved left-hand side below Theorem 1's bound at every level: {below}")
    print(f"per-level reports: {args.out}/<policy>-<level>/bound.md")


if __name__ == "__main__":
    main()
