"""How good is the demo's federated inference for a given agent budget? Trains the demo's
ten agents (each alone on its silo of the FI paper's heterogeneous split) for --steps
optimiser steps each and scores 100 class-conditional samples per aggregator (the demo's
sampler) by class accuracy under the dataset's own classifier (chance 0.10).

    .venv/bin/python benchmarks/demo_agents_budget.py --dataset mnist5k:14x14 --steps 300 \\
        --batch 32 --base 16 --out runs/demo-agents-budget

Minutes on a 2-core CPU; numbers in BENCHMARKS.md ("The demo's budget").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fedscore import data, diffusion
from fedscore.experiments import load_preset
from fedscore.experiments.runner import train_agents_cell
from fedscore.inference.sampling import agents_score_fn, draw
from fedscore.metrics import class_accuracy, get_extractor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist5k:14x14")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--base", type=int, default=16, help="tiny U-Net width")
    ap.add_argument("--downsamples", type=int, default=None, help="U-Net halvings")
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--ema", type=float, default=None)
    ap.add_argument("--aggregators", nargs="+", default=["mean", "mixture"])
    ap.add_argument("--sampler-steps", type=int, default=25)
    ap.add_argument("--out", type=Path, default=Path("runs/demo-agents-budget"))
    args = ap.parse_args()

    options = {"base": args.base}
    if args.downsamples is not None:
        options["num_downsamples"] = args.downsamples
    train = {"steps": args.steps, "batch_size": args.batch, "lr": args.lr,
             "checkpoint_every": args.steps, "ema_decay": args.ema}
    preset = load_preset("demo", budget="full", overrides={
        "dataset": args.dataset, "config": {"model": {"options": options}},
        "cells": {"agents": {"config": {"train": train}}}})
    cfg = preset.cell_config("agents", args.out)
    extractor = get_extractor(args.dataset, progress=False)
    shape = data.info(args.dataset).shape
    t0 = time.perf_counter()
    trained = train_agents_cell(cfg, "heterogeneous", args.out / "agents", 10, progress=False)
    seconds = time.perf_counter() - t0
    print(f"10 agents x {args.steps} steps, batch {args.batch}, base {args.base}, lr {args.lr}, "
          f"ema {args.ema}, {args.dataset}: {seconds:.0f} s", flush=True)
    labels = torch.arange(10).repeat_interleave(10)
    times = diffusion.time_grid("exponential", args.sampler_steps, T=cfg.diffusion.T,
                                delta=cfg.diffusion.delta)
    for agg in args.aggregators:
        t1 = time.perf_counter()
        fn = agents_score_fn(trained.agents, labels, agg, clip=True)
        x = draw(fn, len(labels), tuple(shape), times, "ancestral", 1, progress=False)
        acc = class_accuracy(extractor.logits(x.clamp(-1, 1)), labels)
        print(f"  {agg:10s} class accuracy {acc:.2f} ({time.perf_counter() - t1:.0f} s to "
              f"sample)", flush=True)


if __name__ == "__main__":
    main()
