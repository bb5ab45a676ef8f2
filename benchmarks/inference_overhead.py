"""The cost of federated inference: K agents per reverse step, batched or not.

K = 10 agents, 100 steps of the exponential integrator, batch 16, `mean` aggregator:
  (a) fedscore's agent batching: StackedAgents with its "auto" strategy (also both named
      strategies, "vmap" and "sequential", for the record);
  (b) a Python loop over K separate nn.Modules (inference.stack_scores);
  (c) ONE model at batch K x 16 = 160: the floor (the same arithmetic, one call);
and the `mixture` aggregator (Itô density tracking) against `mean`, both through (a).
Networks, all class-conditional as the FI agents are: the toy score MLP (2-D data; the
defaults of configs/toy-gmm.yaml, hidden 128, depth 3), a small MLP (hidden 32, depth 2,
the size of round_overhead.py's "mlp-small") and the `tiny` U-Net (28x28, 1 channel).

Time: every measurement runs in a FRESH subprocess (set-up, a 3-step warm-up sampling run
for first-call allocations and vmap tracing, then one timed 100-step run), one torch thread
by default (a shared 2-core CPU: see round_overhead.py). For the MLPs, whose runs take a
second, the variants are run in P interleaved passes (default 3) and the median is kept;
a U-Net run takes minutes, so one pass. The explicit strategy that "auto" resolves to is the
same code as "auto" and is not run again (its row repeats "auto"'s numbers).

Memory: "peak RSS MB" is the process's resident high-water mark (VmHWM) at the end of the
timed run, reset (Linux: "5" > /proc/self/clear_refs) after the warm-up, so it is the peak
of the 100-step run itself (interpreter, torch and the K models included); "sampling MB" is
that minus the resident size just before the run, i.e. what sampling added (activations,
the stacked scores). On CUDA both are torch.cuda.max_memory_allocated (total, and above
what was allocated before the run). tracemalloc is not used: it does not see tensor
storage.

Targets (issue 6): MLP (b)/(a) >= 3; U-Net (a)/(c) <= 1.15; mixture <= 1.1 x mean.

Usage: python benchmarks/inference_overhead.py [--quick] [--device cpu|cuda] [--out DIR]
Prints one markdown table per network (paste into BENCHMARKS.md), the target checks and the
load average at start and end, and writes DIR/inference_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fedscore import diffusion, inference
from fedscore.inference.agents import StackedAgents
from fedscore.models import build_model, count_params

CLASSES = 10
VARIANTS = ("a-auto", "a-vmap", "a-sequential", "b-python-loop", "c-one-model", "mixture")
STRATEGY = {"a-auto": "auto", "a-vmap": "vmap", "a-sequential": "sequential"}
KINDS = {
    "mlp": ("mlp", {"dim": 2}, (2,)),  # the toy score MLP: hidden 128, depth 3
    "mlp-small": ("mlp", {"dim": 2, "hidden": 32, "depth": 2}, (2,)),
    "unet": ("unet", {"size": "tiny", "in_channels": 1, "image_size": 28}, (1, 28, 28)),
}


def networks(kind: str, k: int, device: str):
    """k networks of one architecture with different weights, and the data shape."""
    arch, options, shape = KINDS[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        models = [build_model(arch, num_classes=CLASSES, **options) for _ in range(k)]
    return [m.to(device).eval() for m in models], shape


def score_fn_factory(variant: str, models, labels):
    """A function building a fresh score function per sampling run (the mixture's tracked
    weights are per run); the agents are stacked once, here, as part of the set-up."""
    k = len(models)
    if variant == "c-one-model":
        big = labels.repeat(k)  # K x B samples through one network
        fn = diffusion.score_fn_of(lambda x, t: models[0](x, t, big), "eps")
        return lambda: fn
    if variant == "b-python-loop":
        fns = [diffusion.score_fn_of(lambda x, t, m=m: m(x, t, labels), "eps") for m in models]
        return lambda: inference.combine(inference.stack_scores(fns), "mean")
    agents = StackedAgents(models[0], models, "eps", labels=labels,
                           strategy=STRATEGY.get(variant, "auto"))
    return lambda: inference.combine(agents, "mixture" if variant == "mixture" else "mean")


def reset_peak_rss() -> bool:
    """Reset the process's resident high-water mark (Linux: "5" > /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (high-water mark) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(kind: str, variant: str, k: int, batch: int, steps: int, device: str) -> dict:
    """One timing in this process: seconds and peak memory of one sampling run."""
    models, shape = networks(kind, k, device)
    labels = torch.arange(batch, device=device) % CLASSES
    n = batch * k if variant == "c-one-model" else batch
    times = diffusion.time_grid("exponential", steps, T=5.0, delta=1e-3)
    make = score_fn_factory(variant, models, labels)

    def run(grid):
        g = torch.Generator(device=device).manual_seed(0)
        x_T = torch.randn((n, *shape), generator=g, device=device)
        out = diffusion.sample(make(), x_T, grid, "exp-integrator", g)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run(times[:3])  # warm-up: first-call allocations and vmap tracing are not timed
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    hwm_reset = reset_peak_rss()
    rss0 = rss_mb("VmRSS")
    t0 = time.perf_counter()
    run(times)
    seconds = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        added = peak - base
    else:
        peak = rss_mb("VmHWM")
        added = peak - rss0
    chosen = StackedAgents(models[0], models).strategy
    return {"kind": kind, "variant": variant, "seconds": [seconds], "peak_mb": peak,
            "sampling_mb": added, "hwm_reset": hwm_reset, "params": count_params(models[0]),
            "auto_strategy": chosen, "threads": torch.get_num_threads()}


def in_subprocess(kind, variant, k, batch, steps, device, threads) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, variant, "--k", str(k), "--batch",
           str(batch), "--steps", str(steps), "--device", device, "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind}/{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def merge(old: dict | None, new: dict) -> dict:
    """Pool one more process's measurement: all times, the largest memory."""
    if old is None:
        return new
    return dict(new, seconds=old["seconds"] + new["seconds"],
                peak_mb=max(old["peak_mb"], new["peak_mb"]),
                sampling_mb=max(old["sampling_mb"], new["sampling_mb"]))


def med(row: dict) -> float:
    return statistics.median(row["seconds"])


def table(kind: str, rows: dict, device: str) -> list[str]:
    floor, loop = med(rows["c-one-model"]), med(rows["b-python-loop"])
    first = rows["a-auto"]
    what = "CUDA" if device == "cuda" else "RSS"
    lines = [f"### {kind} ({first['params']:,} parameters per agent; auto -> "
             f"{first['auto_strategy']}, {first['threads']} threads, device {device})", "",
             f"| variant | runs | median s | x floor (c) | (b) / this | peak {what} MB | "
             "sampling MB |", "|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        r = rows[v]
        name = f"{v} (= a-auto)" if r.get("same_as_auto") else v
        lines.append(f"| {name} | {len(r['seconds'])} | {med(r):.3f} | {med(r) / floor:.2f} | "
                     f"{loop / med(r):.2f} | {r['peak_mb']:.0f} | {r['sampling_mb']:.1f} |")
    return lines


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min, {os.cpu_count()} cores)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="10 steps instead of 100, one pass (smoke run)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="reverse steps (default 100)")
    ap.add_argument("--passes", type=int, default=None,
                    help="interleaved passes for the MLPs (default 3; the U-Net: 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in every measurement (default 1)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (10 if args.quick else 100)
    if args.worker:
        kind, variant = args.worker
        print(json.dumps(measure(kind, variant, args.k, args.batch, steps, args.device)))
        return

    def passes_for(kind: str) -> int:
        if args.passes:
            return args.passes
        return 1 if args.quick or kind == "unet" else 3

    load_start, t_start = load_average(), time.perf_counter()
    print(f"load average at start: {load_start}", flush=True)
    results = {}
    for kind in args.kinds:
        rows: dict = {}
        for p in range(passes_for(kind)):
            for v in VARIANTS:
                if (v in STRATEGY and v != "a-auto"
                        and STRATEGY[v] == rows["a-auto"]["auto_strategy"]):
                    continue  # what "auto" resolves to: the same code, filled in below
                r = in_subprocess(kind, v, args.k, args.batch, steps, args.device,
                                  args.threads)
                rows[v] = merge(rows.get(v), r)
                print(f"  pass {p + 1}: {kind} {v}: {r['seconds'][0]:.3f} s", file=sys.stderr,
                      flush=True)
        for v, strategy in STRATEGY.items():
            if v != "a-auto" and strategy == rows["a-auto"]["auto_strategy"]:
                rows[v] = dict(rows["a-auto"], variant=v, same_as_auto=True)
        results[kind] = rows
    load_end = load_average()

    print(f"\nK = {args.k} agents, {steps} steps of the exponential integrator, batch "
          f"{args.batch} (c: {args.k * args.batch}), device {args.device}, {args.threads} "
          "torch thread(s)\n")
    for kind in results:
        print("\n".join(table(kind, results[kind], args.device)) + "\n")
    checks = []
    for kind, rows in results.items():
        if kind.startswith("mlp"):
            checks.append((f"{kind}: (b)/(a) >= 3", med(rows["b-python-loop"]) /
                           med(rows["a-auto"]), 3.0, "ge"))
        else:
            checks.append((f"{kind}: (a)/(c) <= 1.15", med(rows["a-auto"]) /
                           med(rows["c-one-model"]), 1.15, "le"))
        checks.append((f"{kind}: mixture / mean <= 1.1", med(rows["mixture"]) /
                       med(rows["a-auto"]), 1.1, "le"))
    print("| target | measured | met |\n|---|---|---|")
    for name, value, bound, how in checks:
        ok = value >= bound if how == "ge" else value <= bound
        print(f"| {name} | {value:.2f} | {'yes' if ok else 'NO'} |")
    print(f"\nload average at start: {load_start}; at end: {load_end}; "
          f"wall time {time.perf_counter() - t_start:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "inference_overhead.json"
    path.write_text(json.dumps({"k": args.k, "steps": steps, "batch": args.batch,
                                "device": args.device, "threads": args.threads,
                                "load_start": load_start, "load_end": load_end,
                                "results": results,
                                "checks": [{"target": c[0], "measured": c[1]} for c in checks]},
                               indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
