"""How good is the demo's federated model for a given training budget, and which sampler
shows it best? Trains the demo's federation (10 workers, dominant silos, top-k level M,
tiny U-Net) for --rounds rounds and scores 100 class-conditional samples per sampler, with
and without clipping the denoised estimate (diffusion.clip_denoised), by class accuracy
under the project's mnist5k classifier (chance 0.10).

    .venv/bin/python benchmarks/demo_budget.py --rounds 80 --out runs/demo-budget

Prints wall time per round and one line per (sampler, steps, clip). Minutes per run on a
2-core CPU; numbers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fedscore import diffusion
from fedscore.experiments import load_preset
from fedscore.metrics import class_accuracy, get_extractor
from fedscore.runs.federated import train_federated
from fedscore.runs.folder import RunFolder
from fedscore.runs.sampling import model_score_fn

SAMPLERS = [("exp-integrator", 25), ("exp-integrator", 50), ("euler-maruyama", 50),
            ("ancestral", 30), ("ancestral", 50), ("ancestral", 100)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--base", type=int, default=16, help="tiny U-Net width")
    ap.add_argument("--strategy", default="vmap")
    ap.add_argument("--out", type=Path, default=Path("runs/demo-budget"))
    args = ap.parse_args()

    federation = {"rounds": args.rounds, "local_steps": args.local_steps,
                  "batch_size": args.batch, "strategy": args.strategy}
    preset = load_preset("demo", budget="full", overrides={
        "config": {"model": {"options": {"base": args.base}}},
        "cells": {"federated": {"config": {"federation": federation}}}})
    cfg = preset.cell_config("federated", args.out)
    t0 = time.perf_counter()
    model = train_federated(cfg, progress=True).model.eval()
    seconds = time.perf_counter() - t0
    rounds = RunFolder(cfg.run_dir()).metrics()
    print(f"{args.rounds} rounds x {args.local_steps} steps, batch {args.batch}, base "
          f"{args.base}, {args.strategy}: {seconds:.0f} s ({seconds / args.rounds:.2f} s/round); "
          f"final loss {rounds[-1]['loss']:.4f}, held-out eq. 9 {rounds[-1]['eq9_heldout']:.1f}")

    extractor = get_extractor("mnist5k", progress=False)
    labels = torch.arange(10).repeat_interleave(10)
    score = model_score_fn(model, cfg, labels)
    for method, steps in SAMPLERS:
        times = diffusion.time_grid("exponential", steps, T=cfg.diffusion.T,
                                    delta=cfg.diffusion.delta)
        for clip in (False, True):
            g = torch.Generator().manual_seed(1)
            x_T = diffusion.prior((len(labels), 1, 28, 28), generator=g)
            fn = diffusion.clip_denoised(score) if clip else score
            with torch.no_grad():
                x = diffusion.sample(fn, x_T, times, method, generator=g)
            acc = class_accuracy(extractor.logits(x.clamp(-1, 1)), labels)
            print(f"  {method:15s} {steps:4d} steps  clip={clip!s:5s}  class accuracy {acc:.2f}")


if __name__ == "__main__":
    main()
