"""The privacy-utility table of issue 19: epsilon in {inf, 8, 1} against FID and class
accuracy on mnist5k, each row a federated run of the demo's federation (ten silos, the FI
paper's `dominant` split, top-k masks at level M, the tiny class-conditional U-Net at 14x14)
trained, sampled and scored by the one experiment harness (`experiments.run_experiment`:
the same sampler, noise and `evaluate_samples` for every row).

    .venv/bin/python benchmarks/privacy_utility.py --budget quick   # a smoke test, ~minutes
    .venv/bin/python benchmarks/privacy_utility.py --budget cpu     # the table (CPU, long)

Prints a markdown table and writes `<out>/privacy_utility.json` (plus the harness's
report.md / results.json in <out>).

Why mode sample (DP-SGD, example-level) and not mode client (DP-FedAvg, silo-level): with
ten silos a silo-level guarantee is hopeless at this scale. DP-FedAvg's noise on eq. 8's sum
has std z*C per coordinate, divided by at most ten keepers, against a clipped update of
norm <= C spread over ~10^5 coordinates: at epsilon 8 over 50 rounds (q = 1, no
amplification) z is above 1, so the noise's norm is hundreds of times the signal's. DP-SGD
protects each silo's records (a hospital's patients), with amplification by sampling
(q = B / n_silo = 32 / 500) over S * Q local steps, and learns at epsilon 8 on MNIST-like
data in the literature. Its target epsilon is met by solving z for the largest silo's
sampling rate (`privacy.plan_for`); C = 1 (per-sample gradient norms of this U-Net are
mostly above 1 at the start, the usual regime where clipping bounds every sample).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from fedscore.experiments import run_experiment
from fedscore.experiments.preset import Preset, load_preset

EPSILONS = (math.inf, 8.0, 1.0)
CLIP = 1.0
DELTA = 1e-5

# the budgets: rounds x local steps at batch 32 (cpu: the demo's federation, 50 x 10), and
# samples per digit; quick: the smallest run that goes through every stage
BUDGETS = {
    "cpu": {"rounds": 50, "local_steps": 10, "batch_size": 32, "per_label": 10,
            "sampling_steps": 25, "model": {}, "diffusion_steps": 50},
    "quick": {"rounds": 2, "local_steps": 1, "batch_size": 4, "per_label": 2,
              "sampling_steps": 3, "model": {"base": 8, "groups": 4}, "diffusion_steps": 10},
}


def cell_name(eps: float) -> str:
    return "eps-inf" if math.isinf(eps) else f"eps-{eps:g}"


def preset_for(budget: str) -> Preset:
    """The demo preset's shared settings with one federated cell per epsilon."""
    b = BUDGETS[budget]
    base = load_preset("demo", budget="full")  # shared model, grid, sampler, dataset
    raw = base.model_dump()
    fed = {"workers": 10, "rounds": b["rounds"], "local_steps": b["local_steps"],
           "batch_size": b["batch_size"], "lr": 0.002, "optimizer": "adam",
           "adam_state": "keep", "policy": "topk", "level": "M", "strategy": "auto",
           "eval_every": max(1, b["rounds"] // 5), "partition": {"scheme": "dominant"}}
    cells = {}
    for eps in EPSILONS:
        config = {"train": {"eval_batch": 8}, "federation": fed}
        if not math.isinf(eps):
            config["privacy"] = {"mode": "sample", "clip": CLIP, "target_epsilon": eps,
                                 "delta": DELTA, "accountant": "rdp"}
        label = "no privacy (ε = ∞)" if math.isinf(eps) else f"DP-SGD ε = {eps:g}"
        cells[cell_name(eps)] = {"kind": "federated", "label": label, "panel": "training",
                                 "config": config,
                                 # the harness's pruning prose reads policy and level
                                 "tags": {"policy": "topk", "level": "M",
                                          "epsilon": str(eps)}}
    raw |= {"name": f"privacy-utility-{budget}", "title": "privacy-utility on mnist5k",
            "report": "pruning", "sections": ["loss"], "same_silos": None,
            "columns": ["fid", "class_accuracy", "recognisable", "final_loss"],
            "cells": cells, "budget": budget, "device_budgets": {}}
    raw["config"] = {**raw["config"],
                     "model": {**raw["config"]["model"],
                               "options": {**raw["config"]["model"]["options"], **b["model"]}},
                     "diffusion": {**raw["config"]["diffusion"], "steps": b["diffusion_steps"]}}
    raw["sampling"] = {**raw["sampling"], "per_label": b["per_label"],
                       "steps": b["sampling_steps"]}
    return Preset.model_validate(raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="quick")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path("runs") / f"privacy-utility-{args.budget}"
    preset = preset_for(args.budget)
    result = run_experiment(preset, out, progress=False)
    rows = []
    for eps in EPSILONS:
        name = cell_name(eps)
        row = next(r for r in result.rows if r["cell"] == name)
        run = out / name
        privacy = (json.loads((run / "privacy.json").read_text())
                   if (run / "privacy.json").is_file() else None)
        last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                if line.strip()][-1]
        rows.append({
            "target_epsilon": None if math.isinf(eps) else eps,
            # epsilon None: no privacy (inf; JSON has no infinity)
            "epsilon": last.get("epsilon"), "delta": DELTA if privacy else None,
            "noise_multiplier": privacy["noise_multiplier"] if privacy else None,
            "clip": CLIP if privacy else None,
            "clipped_fraction": last.get("clipped_fraction"),
            "fid": row.get("fid"), "class_accuracy": row.get("class_accuracy"),
            "final_loss": last.get("loss"),
        })
    print(f"\nprivacy-utility on mnist5k, budget {args.budget} (mode sample, C = {CLIP}, "
          f"δ = {DELTA:g}, RDP accountant; FID against the {preset.reference} split)\n")
    print("| target ε | ε reached | z | clipped fraction (last round) | FID ↓ | "
          "class accuracy ↑ |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fmt = (lambda v, f="{:.3g}": "–" if v is None else f.format(v))  # noqa: E731
        reached = "∞" if r["epsilon"] is None else fmt(r["epsilon"])
        print(f"| {fmt(r['target_epsilon'], '{:g}') if r['target_epsilon'] else '∞'} | "
              f"{reached} | {fmt(r['noise_multiplier'])} | "
              f"{fmt(r['clipped_fraction'])} | {fmt(r['fid'])} | {fmt(r['class_accuracy'])} |")
    payload = {"budget": args.budget, "mode": "sample", "clip": CLIP, "delta": DELTA,
               "reference": preset.reference,
               "rows": rows, "seconds": result.seconds, "report": str(result.report)}
    (out / "privacy_utility.json").write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nJSON: {out / 'privacy_utility.json'}; report: {result.report}")


if __name__ == "__main__":
    main()
