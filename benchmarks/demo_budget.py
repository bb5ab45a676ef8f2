"""How good is the demo's federated model for a given training budget? Trains the demo's
federation (10 workers, dominant silos, top-k level M) with the recipe given by the flags,
and after each of --checkpoints rounds (resuming the same run) scores 100 class-conditional
samples (ancestral sampler, denoised estimate clipped, as the demo samples) by class
accuracy under the dataset's own classifier (chance 0.10).

    .venv/bin/python benchmarks/demo_budget.py --dataset mnist5k:14x14 --checkpoints 20 40 \\
        --local-steps 10 --batch 32 --base 16 --out runs/demo-budget

Prints wall time per round and one line per checkpoint. Minutes per run on a 2-core CPU;
numbers in BENCHMARKS.md ("The demo's budget").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fedscore import data, diffusion
from fedscore.experiments import load_preset
from fedscore.metrics import class_accuracy, get_extractor
from fedscore.runs.federated import train_federated
from fedscore.runs.folder import RunFolder
from fedscore.runs.sampling import model_score_fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist5k:14x14")
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[20, 40])
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--base", type=int, default=16, help="tiny U-Net width")
    ap.add_argument("--downsamples", type=int, default=None, help="U-Net halvings")
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--level", default="M")
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--sampler-steps", type=int, default=25)
    ap.add_argument("--out", type=Path, default=Path("runs/demo-budget"))
    args = ap.parse_args()

    options = {"base": args.base}
    if args.downsamples is not None:
        options["num_downsamples"] = args.downsamples
    extractor = get_extractor(args.dataset, progress=False)
    shape = data.info(args.dataset).shape
    labels = torch.arange(10).repeat_interleave(10)
    seconds, done = 0.0, 0
    for rounds in args.checkpoints:
        federation = {"rounds": rounds, "local_steps": args.local_steps, "lr": args.lr,
                      "batch_size": args.batch, "strategy": args.strategy,
                      "level": args.level, "eval_every": 1000}
        preset = load_preset("demo", budget="full", overrides={
            "dataset": args.dataset,
            "config": {"model": {"options": options}},
            "cells": {"federated": {"config": {"federation": federation}}}})
        cfg = preset.cell_config("federated", args.out)
        t0 = time.perf_counter()
        model = train_federated(cfg, progress=False, resume=done > 0).model.eval()
        seconds += time.perf_counter() - t0
        log = RunFolder(cfg.run_dir()).metrics()
        score = model_score_fn(model, cfg, labels)
        times = diffusion.time_grid("exponential", args.sampler_steps, T=cfg.diffusion.T,
                                    delta=cfg.diffusion.delta)
        g = torch.Generator().manual_seed(1)
        x_T = diffusion.prior((len(labels), *shape), generator=g)
        with torch.no_grad():
            x = diffusion.sample(diffusion.clip_denoised(score), x_T, times, "ancestral",
                                 generator=g)
        acc = class_accuracy(extractor.logits(x.clamp(-1, 1)), labels)
        print(f"{rounds:4d} rounds x {args.local_steps} steps, batch {args.batch}, base "
              f"{args.base}, lr {args.lr}, {args.dataset}: {seconds:.0f} s "
              f"({seconds / rounds:.2f} s/round); loss {log[-1]['loss']:.4f}; "
              f"class accuracy {acc:.2f}", flush=True)
        done = rounds


if __name__ == "__main__":
    main()
