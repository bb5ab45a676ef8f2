"""The cost of one federated round (SPEC §2, eqs. 7-8): the in-process engine against a naive
per-worker loop and against centralised training on the same samples.

One round: N = 10 workers, S = 5 local Adam steps at batch 32 each, pruning level M, top-k
masks, fresh Adam moments (adam_state: reset), DSM loss (eps weighting). Same model, same
data, same pre-drawn batches and noise, same masks for every variant:

  (a) fedscore's engine, `federated.run_round` with strategy "auto" (and, for the record,
      every explicit strategy: "vmap", "chunked" (4 workers per call), "sequential");
  (b) NAIVE BASELINE, written below as most research code writes it: per worker a
      `copy.deepcopy` of the nn.Module, its parameters multiplied by the mask, a fresh
      `torch.optim.Adam`, S steps of loss.backward() with the gradient masked (eq. 7) and the
      parameters re-masked after each step, then eq. 8 by coverage counts;
  (c) centralised training: ONE model, torch.optim.Adam, S steps at batch N x 32 (the same
      N * S * 32 samples): the floor, no masks and no aggregation.

Top-k masks (`federated.build_masks`) are built once, before timing, and given to (a) and
(b) alike: the round's time is the local training plus aggregation. The mask construction
time is printed on its own line.

Time: the median over P interleaved passes (default 3): each pass runs (a) "auto", (b) and
(c) once, in turn, each in a FRESH subprocess that builds the set-up, runs a warm-up round
of one local step (first-call allocations) and then R timed rounds (3 for the MLPs, 1 for
the U-Net). Interleaving spreads the swings of a shared machine's load over all variants
alike. The explicit strategies are measured for the record in the first pass only (a U-Net
round under "vmap" costs a minute and ~5 GB on a CPU); the one "auto" resolves to is the
same code as "auto" and is not run again (its row repeats "auto"'s numbers).

Memory, per variant process: after the set-up (data, model, masks, batches) and the
libraries every variant loads on first use (torch.func and torch.optim both import
torch._dynamo, ~150 MB), the process's RSS high-water mark is reset (Linux: "5" >
/proc/self/clear_refs), so neither hides the rounds' own peak. "peak RSS" is then
resource.getrusage(RUSAGE_SELF).ru_maxrss at the end: the largest resident size while the
rounds ran (interpreter, torch, data and model included); "round MB" is that minus the
resident size just before the warm-up, i.e. what the rounds added. Largest over passes. On
CUDA the peak is torch.cuda.max_memory_allocated instead.

Threads: every measurement uses ONE torch thread by default (--threads). The reference
machine is a 2-core CPU shared with other jobs (load average ~3): with 2 threads, OpenMP's
barriers wait on cores that other processes hold and the same vmapped MLP round varied from
0.2 s to 2.3 s between repeats; with one thread it stayed within 0.05-0.11 s. The load
average is printed at start and end.

Sanity check: before timing, (a) and (b) are run for two local steps from the same start
and their parameters compared (they implement the same algorithm; Adam by hand vs
torch.optim.Adam differ only by float rounding).

Targets (issue 5): MLP (b)/(a) >= 3; U-Net (a)/(c) <= 1.15; peak memory (a)/(b) <= 1.5.

Usage: python benchmarks/round_overhead.py [--quick] [--device cpu|cuda] [--kinds ...]
Prints markdown tables (paste into BENCHMARKS.md), the target checks and the load average
at start and end (the machine is shared), and writes benchmarks/out/round_overhead.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from fedscore import data as datasets
from fedscore import diffusion, federated
from fedscore.federated.setup import draw_batches
from fedscore.models import build_model, count_params

WORKERS = 10
BATCH = 32
LEVEL = "M"
LR = 1e-3
SEED = 0
KINDS = {
    # the toy score MLP of configs/toy-gmm.yaml on the 8-mode ring (2-D)
    "mlp": ("gmm:ring8", {"kind": "mlp", "dim": 2, "hidden": 128, "depth": 3}),
    # the small MLP of the prototype measurement (~19 k parameters) and of
    # benchmarks/gmm_levels.py
    "mlp-small": ("gmm:ring8", {"kind": "mlp", "dim": 2, "hidden": 32, "depth": 2}),
    # the tiny U-Net on 28x28 MNIST digits, unconditional
    "unet": ("mnist5k", {"kind": "unet", "size": "tiny", "in_channels": 1, "image_size": 28}),
}
VARIANTS = ("a-auto", "a-vmap", "a-chunked", "a-sequential", "b-naive-loop", "c-central")
STRATEGY = {"a-auto": "auto", "a-vmap": "vmap", "a-chunked": "chunked",
            "a-sequential": "sequential"}


# ---------------------------------------------------------------- the shared set-up


def setup(kind: str, steps: int, device: str):
    """Model, global params, stacked masks, per-worker batches (x0, t, eps) of shape
    (N, S, B, ...), all on `device`."""
    name, spec = KINDS[kind]
    spec = dict(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = build_model(spec.pop("kind"), **spec).to(device)
    images, labels = datasets.load(name, split="train")
    parts = [torch.as_tensor(p, dtype=torch.long) for p in datasets.partition(
        labels.numpy(), "iid", n_workers=WORKERS, seed=SEED)]
    times = diffusion.time_grid("exponential", 100, T=5.0, delta=1e-3)
    x0, _, t, eps = draw_batches(images, labels, parts, steps, BATCH, times, "eps", SEED, 0)
    batches = tuple(v.to(device) for v in (x0, t, eps))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    masks = build_masks(params)
    return model, params, masks, batches


def build_masks(params: dict[str, Tensor]) -> dict[str, Tensor]:
    ratios = federated.level_ratios(LEVEL, n_workers=WORKERS)
    return federated.build_masks(params, "topk", ratios, None)


def dsm(net, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    return diffusion.dsm_loss(net, x0, t, eps, weighting="eps", parameterisation="eps")


# ---------------------------------------------------------------- (a) the engine


def engine_round(model, params, masks, batches, steps: int, strategy: str):
    loss_fn = federated.make_loss_fn(model, lambda net, b: dsm(net, *b))
    new, *_ = federated.run_round(params, masks, batches, loss_fn, federated.Adam(lr=LR),
                                  steps=steps, strategy=strategy)
    return new


# ---------------------------------------------------------------- (b) NAIVE BASELINE


def naive_round(model: nn.Module, params, masks, batches, steps: int) -> dict[str, Tensor]:
    """NAIVE BASELINE (not fedscore's engine): what most research code does per round."""
    x0, t, eps = batches
    sums = {k: torch.zeros_like(v) for k, v in params.items()}
    counts = {k: torch.zeros_like(v) for k, v in params.items()}
    for n in range(WORKERS):
        local = copy.deepcopy(model)  # one full model copy per worker
        named = dict(local.named_parameters())
        mask = {k: masks[k][n].to(v.dtype) for k, v in named.items()}
        with torch.no_grad():
            for k, p in named.items():  # eq. 7's start: theta_q ⊙ m_n
                p.copy_(params[k] * mask[k])
        opt = torch.optim.Adam(local.parameters(), lr=LR)
        for s in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = dsm(local, x0[n, s], t[n, s], eps[n, s])
            loss.backward()
            for k, p in named.items():  # eq. 7: masked gradient
                p.grad.mul_(mask[k])
            opt.step()
            with torch.no_grad():  # keep pruned coordinates at zero
                for k, p in named.items():
                    p.mul_(mask[k])
        with torch.no_grad():  # eq. 8: sum over keepers, divided by their count
            for k, p in named.items():
                sums[k] += p * mask[k]
                counts[k] += mask[k]
    return {k: torch.where(counts[k] > 0, sums[k] / counts[k].clamp(min=1), params[k])
            for k in params}


# ---------------------------------------------------------------- (c) centralised floor


def central_steps(model: nn.Module, batches, steps: int) -> None:
    """S Adam steps of ONE model at batch N x 32 (the round's samples pooled)."""
    x0, t, eps = batches
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = dsm(model, x0[:, s].flatten(0, 1), t[:, s].flatten(0, 1),
                   eps[:, s].flatten(0, 1))
        loss.backward()
        opt.step()


def run_variant(variant: str, model, params, masks, batches, steps: int):
    if variant in STRATEGY:
        return engine_round(model, params, masks, batches, steps, STRATEGY[variant])
    if variant == "b-naive-loop":
        return naive_round(model, params, masks, batches, steps)
    central_steps(copy.deepcopy(model), batches, steps)  # fresh copy: every repeat alike
    return None


# ---------------------------------------------------------------- one measurement (child)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def prime(model: nn.Module, batches) -> None:
    """Load what every variant loads on first use, a cost that is not a round's: torch.func
    (vmap, grad) and torch.optim both import torch._dynamo (~150 MB resident), and the first
    backward pages in autograd's kernels."""
    import torch._dynamo  # noqa: F401

    x0, t, eps = (v[0, 0, :1] for v in batches)
    dsm(copy.deepcopy(model), x0, t, eps).backward()


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux: "5" > /proc/self/clear_refs), so
    ru_maxrss measures the rounds, not the transient peak of loading the data."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(kind: str, variant: str, steps: int, repeats: int, device: str) -> dict:
    """Run in a fresh process: warm-up, then `repeats` timed rounds; seconds and memory."""
    model, params, masks, batches = setup(kind, steps, device)
    out = {"kind": kind, "variant": variant, "params": count_params(model),
           "threads": torch.get_num_threads(),
           "auto_strategy": federated.choose_strategy(params)}
    if variant == "masks":  # build_masks alone (shared by (a) and (b))
        build_masks(params)
        t0 = time.perf_counter()
        for _ in range(repeats):
            build_masks(params)
        out["seconds"] = [(time.perf_counter() - t0) / repeats]
        return out
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prime(model, batches)
    out["hwm_reset"] = reset_peak_rss()
    base_kb = current_rss_kb()  # resident just before any round ran
    run_variant(variant, model, params, masks, batches, 1)  # warm-up: one local step
    _sync(device)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_variant(variant, model, params, masks, batches, steps)
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out["seconds"] = seconds
    out["peak_rss_mb"] = peak_kb / 1024
    out["round_mb"] = (peak_kb - base_kb) / 1024
    if device == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def in_subprocess(kind: str, variant: str, steps: int, repeats: int, device: str,
                  threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, variant, "--steps", str(steps),
           "--repeats", str(repeats), "--device", device, "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind}/{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def merge(old: dict | None, new: dict) -> dict:
    """Pool one more process's measurement: all round times, the largest memory."""
    if old is None:
        return new
    out = dict(new, seconds=old["seconds"] + new["seconds"])
    for key in ("peak_rss_mb", "round_mb", "cuda_peak_mb"):
        if key in new:
            out[key] = max(old[key], new[key])
    return out


def equivalence(kind: str, device: str) -> float:
    """max |theta_a - theta_b| / max |theta| after a 2-step round: (a) and (b) agree."""
    model, params, masks, batches = setup(kind, 2, device)
    a = engine_round(model, params, masks, batches, 2, "auto")
    b = naive_round(model, params, masks, batches, 2)
    diff = max(float((a[k] - b[k]).abs().max()) for k in params)
    scale = max(float(v.abs().max()) for v in params.values())
    return diff / scale


# ---------------------------------------------------------------- report


def table(kind: str, rows: dict, mask_s: float, rel_diff: float, device: str) -> list[str]:
    floor = statistics.median(rows["c-central"]["seconds"])
    naive = statistics.median(rows["b-naive-loop"]["seconds"])
    first = rows["a-auto"]
    mem_col = "CUDA peak MB" if device == "cuda" else "peak RSS MB"
    lines = [
        f"### {kind} ({first['params']:,} parameters; auto -> {first['auto_strategy']}, "
        f"{first['threads']} threads, device {device})", "",
        f"| variant | rounds | median s | min s | x floor (c) | (b) / this | {mem_col} | "
        "round MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        r = rows[v]
        med = statistics.median(r["seconds"])
        peak = r["cuda_peak_mb"] if device == "cuda" else r["peak_rss_mb"]
        name = f"{v} (= a-auto)" if r.get("same_as_auto") else v
        lines.append(f"| {name} | {len(r['seconds'])} | {med:.3f} | {min(r['seconds']):.3f} | "
                     f"{med / floor:.2f} | {naive / med:.2f} | {peak:.0f} | "
                     f"{r['round_mb']:.0f} |")
    lines += ["", f"Top-k masks for the round (`build_masks`, shared by (a) and (b), not in the "
                  f"times above): {mask_s:.4f} s. (a) vs (b) after a 2-step round: "
                  f"max |diff| / max |theta| = {rel_diff:.1e}."]
    return lines


def checks(results: dict, device: str) -> list[tuple[str, float, float, str]]:
    def med(kind, v):
        return statistics.median(results[kind][v]["seconds"])

    def mem(kind, v, key):
        r = results[kind][v]
        return r["cuda_peak_mb"] if device == "cuda" and key == "peak_rss_mb" else r[key]

    out = []
    for kind in results:
        if kind.startswith("mlp"):
            out.append((f"{kind}: (b)/(a) time >= 3", med(kind, "b-naive-loop") /
                        med(kind, "a-auto"), 3.0, "ge"))
        else:
            out.append((f"{kind}: (a)/(c) time <= 1.15", med(kind, "a-auto") /
                        med(kind, "c-central"), 1.15, "le"))
        out.append((f"{kind}: (a)/(b) peak memory <= 1.5",
                    mem(kind, "a-auto", "peak_rss_mb") / mem(kind, "b-naive-loop",
                                                              "peak_rss_mb"), 1.5, "le"))
        a_mb, b_mb = mem(kind, "a-auto", "round_mb"), mem(kind, "b-naive-loop", "round_mb")
        if device != "cuda" and b_mb >= 20:  # below that, page-granular noise
            out.append((f"{kind}: (a)/(b) round MB <= 1.5 ({a_mb:.0f} / {b_mb:.0f} MB)",
                        a_mb / b_mb, 1.5, "le"))
    return out


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min, {os.cpu_count()} cores)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="S = 2, one repeat (smoke run)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--steps", type=int, default=None, help="S (default 5; 2 with --quick)")
    ap.add_argument("--passes", type=int, default=None,
                    help="interleaved passes over the variants, each in fresh processes "
                         "(default 3; 1 with --quick)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed rounds per process (default 3 for the MLPs, 1 for the U-Net)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in every measurement (default 1, see the docstring)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = args.steps or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(*args.worker, steps, args.repeats or 1, args.device)))
        return

    passes = args.passes or (1 if args.quick else 3)

    def repeats_for(kind: str) -> int:
        return args.repeats or (1 if args.quick or kind == "unet" else 3)

    load_start = load_average()
    t_start = time.perf_counter()
    print(f"load average at start: {load_start}", flush=True)
    results, masks_s, rel = {}, {}, {}
    for kind in args.kinds:
        rel[kind] = equivalence(kind, args.device)
        masks_s[kind] = in_subprocess(kind, "masks", steps, 5, args.device,
                                      args.threads)["seconds"][0]
        results[kind] = {}
        for p in range(passes):  # interleaved, so load swings hit every variant alike
            for v in VARIANTS:
                if v in STRATEGY and v != "a-auto" and p > 0:
                    continue  # explicit strategies: for the record, first pass only
                if (v in STRATEGY and v != "a-auto"
                        and STRATEGY[v] == results[kind]["a-auto"]["auto_strategy"]):
                    continue  # what "auto" resolves to: the same code, filled in below
                r = in_subprocess(kind, v, steps, repeats_for(kind), args.device, args.threads)
                results[kind][v] = merge(results[kind].get(v), r)
                print(f"  pass {p + 1}: {kind} {v}: {[round(x, 3) for x in r['seconds']]} s",
                      file=sys.stderr, flush=True)
        auto = results[kind]["a-auto"]
        for v, strategy in STRATEGY.items():
            if v != "a-auto" and strategy == auto["auto_strategy"]:
                results[kind][v] = dict(auto, variant=v, same_as_auto=True)
    load_end = load_average()

    print(f"\nN = {WORKERS} workers, S = {steps} local Adam steps, batch {BATCH}, level "
          f"{LEVEL}, top-k masks; median of "
          f"{', '.join(f'{passes * repeats_for(k)} ({k})' for k in results)} rounds "
          f"({passes} interleaved passes of fresh processes, a warm-up in each); "
          f"device {args.device}, {args.threads} torch thread(s)\n")
    for kind in results:
        print("\n".join(table(kind, results[kind], masks_s[kind], rel[kind], args.device))
              + "\n")
    found = checks(results, args.device)
    print("| target | measured | met |\n|---|---|---|")
    for name, value, bound, how in found:
        ok = value >= bound if how == "ge" else value <= bound
        print(f"| {name} | {value:.2f} | {'yes' if ok else 'NO'} |")
    print(f"\nload average at start: {load_start}; at end: {load_end}; "
          f"wall time {time.perf_counter() - t_start:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "round_overhead.json"
    path.write_text(json.dumps({
        "workers": WORKERS, "steps": steps, "batch": BATCH, "level": LEVEL,
        "passes": passes, "repeats": {k: repeats_for(k) for k in results},
        "threads": args.threads,
        "device": args.device, "load_start": load_start,
        "load_end": load_end, "mask_seconds": masks_s, "relative_diff_a_b": rel,
        "results": results,
        "checks": [{"target": c[0], "measured": c[1]} for c in found]}, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
