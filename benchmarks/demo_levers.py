"""What makes the demo fast on a CPU without bf16: image side, U-Net width, batch size, and
workers side by side, each measured in one run (img/s of Adam training steps, fp32).

    .venv/bin/python benchmarks/demo_levers.py

Part 1: one class-conditional U-Net's training step (plain torch.optim.Adam) at 28x28 and
14x14 for base 16 / 24, batch 16 / 32 / 64. Part 2: one round of the demo's federation (10
workers, top-k M, 3 local steps at batch 32, 14x14, base 16) under the engine's
"sequential" (torch's threads inside each op) and "threads" (workers side by side, one
intra-op thread each) strategies, alternating, with the largest difference of eq. 8's sums.
Numbers in BENCHMARKS.md ("The demo's budget on a 2-core AVX2 CPU").
"""

from __future__ import annotations

import time

import torch

from fedscore.experiments import load_preset
from fedscore.federated.engine import round_sums
from fedscore.federated.setup import prepare
from fedscore.models.unet import UNet


def train_rate(side: int, base: int, batch: int, steps: int = 4) -> float:
    torch.manual_seed(0)
    halvings = 1 if side % 4 else 2
    m = UNet(1, side, base=base, num_downsamples=halvings, num_classes=10)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    x, t = torch.randn(batch, 1, side, side), torch.rand(batch)
    y = torch.randint(10, (batch,))
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        loss = (m(x, t, y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    print(f"torch threads: {torch.get_num_threads()}")
    print("| side | base | batch 16 | batch 32 | batch 64 |")
    print("|---|---|---|---|---|")
    for side in (28, 14):
        for base in (16, 24):
            rates = [train_rate(side, base, b) for b in (16, 32, 64)]
            print(f"| {side}x{side} | {base} | " + " | ".join(f"{r:.0f}" for r in rates) + " |")

    preset = load_preset("demo", overrides={"cells": {"federated": {"config": {
        "federation": {"local_steps": 3}}}}})
    f = prepare(preset.cell_config("federated", "runs/demo-levers"))
    workers = list(range(f.fed.workers))
    images = f.fed.workers * 3 * f.fed.batch_size
    sums, times = {}, {"sequential": [], "threads": []}
    for strategy in ("sequential", "threads") * 3:
        t0 = time.perf_counter()
        sums[strategy], *_ = round_sums(
            f.init_params, f.masks(f.init_params, 0, workers), f.batches(0, workers),
            f.loss_fn, f.optimizer(), steps=3, strategy=strategy)
        times[strategy].append(time.perf_counter() - t0)
    best = {s: min(v) for s, v in times.items()}
    diff = max(float((sums["sequential"][k] - v).abs().max()) for k, v in sums["threads"].items())
    print(f"demo round (10 workers x 3 steps x batch 32, 14x14): sequential "
          f"{images / best['sequential']:.0f} img/s, threads {images / best['threads']:.0f} "
          f"img/s ({best['sequential'] / best['threads']:.2f}x; best of 3 each); "
          f"max |sums difference| {diff:.1e}")


if __name__ == "__main__":
    main()
