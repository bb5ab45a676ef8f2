"""Peak memory of ONE federated round at the pruning paper's CIFAR-10 shape: the round's
mini-batches and DSM noise pre-drawn as tensors (N, S, B, ...) (the old way) against drawn
per local step (`federated.batches.RoundBatches`, what the engine does now).

Shape (configs/pruning-cifar10.yaml): N = 10 workers, the 34.6 M-parameter "paper" U-Net,
batch B = 128, S = ceil(5 local epochs * 5000 images / 128) = 196 local steps per worker,
Adam with moments reset each round, top-k masks at level M. Data: 50,000 synthetic images
of CIFAR's shape 3x32x32 in [-1, 1] (nothing is downloaded), split iid over the workers.

Each variant runs in a FRESH subprocess that builds the set-up (model, data, masks), then
resets the RSS high-water mark (Linux: "5" > /proc/self/clear_refs) and runs one round:

  pre-drawn  the round's batches of all N workers and S steps drawn first, into tensors
             (N, S, B, ...) filled in place (the same numbers as the lazy source; the
             removed `draw_batches` built them with torch.stack over per-worker lists, which
             held about twice that while stacking), then the round trains on them;
  per-step   the round trains on `FederationSetup.batches(q, workers)`, which draws each
             (worker, step) when that step runs.

Training every worker for all S steps of a 35 M U-Net takes hours on a CPU, so by default
the round trains --train-workers 1 worker for --steps 1 local step (the batches of the
whole round are still pre-drawn in the old way: that is its cost); raise them on a faster
machine. "peak RSS" is resource.getrusage(RUSAGE_SELF).ru_maxrss at the end (interpreter,
torch, data and model included), "round adds" that minus the resident size just before the
round. On CUDA (--device cuda) the data live on the GPU and the peak is
torch.cuda.max_memory_allocated over the round.

Usage: python benchmarks/round_memory.py [--workers 10] [--train-workers 1] [--steps 1]
         [--device cpu|cuda] [--threads 2]
Prints the command, a markdown table and the computed size of a pre-drawn round.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from fedscore import federated
from fedscore.config import load_config
from fedscore.federated.engine import DEFAULT_CHUNK
from fedscore.federated.setup import FederationSetup, local_steps, make_loss, model_setup
from fedscore.runtime import Runtime

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pruning-cifar10.yaml"
IMAGES, SHAPE, SEED = 50_000, (3, 32, 32), 0
MODES = ("pre-drawn", "per-step")


def rss_bytes() -> int:
    """The resident size now (Linux /proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak then includes the set-up
        pass


def build(workers: int, device: str) -> FederationSetup:
    """The config's model on `device` and synthetic CIFAR-shaped data split iid."""
    cfg = load_config(CONFIG, overrides=[f"federation.workers={workers}"])
    runtime = Runtime(torch.device(device), "fp32")
    base = model_setup(cfg, runtime)
    g = torch.Generator().manual_seed(SEED)
    images = torch.rand((IMAGES, *SHAPE), generator=g) * 2 - 1
    labels = torch.randint(10, (IMAGES,), generator=g)
    parts = list(torch.randperm(IMAGES, generator=g).chunk(workers))
    total_time = float(base.times[0] - base.times[-1])
    return FederationSetup(
        **vars(base), images=images.to(device), labels=labels.to(device),
        parts=[p.to(device) for p in parts], loss_fn=make_loss(base.model, cfg, total_time),
        steps=local_steps(cfg.federation, [len(p) for p in parts]),
    )


def predraw(source) -> tuple[torch.Tensor, ...]:
    """The whole round (N, S, B, ...) in tensors filled in place: the least memory any
    pre-drawing needs (the old code's torch.stack held about twice this while stacking)."""
    n, s = source.leading_size(0), source.leading_size(1)
    first = source[0, 0]
    out = tuple(torch.empty((n, s, *v.shape), dtype=v.dtype, device=v.device) for v in first)
    for i in range(n):
        for j in range(s):
            for buf, v in zip(out, source[i, j], strict=True):
                buf[i, j] = v
    return out


def nbytes(batches) -> int:
    return sum(v.numel() * v.element_size() for v in batches)


def measure(mode: str, workers: int, train_workers: int, steps: int, device: str,
            strategy: str) -> dict:
    f = build(workers, device)
    train = list(range(train_workers))
    masks = f.masks(f.init_params, 0, train)
    opt = f.optimizer()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    reset_peak()
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    if mode == "pre-drawn":  # every worker's round, as the in-process transport drew it
        everyone = predraw(f.batches(0, list(range(workers))))
        held = nbytes(everyone)
        batches = tuple(v[:train_workers] for v in everyone)  # views: all of it stays alive
    else:
        batches = f.batches(0, train)
        one = f.batches(0, [0])[0, 0]
        resolved = (federated.choose_strategy(f.init_params) if strategy == "auto"
                    else strategy)
        per_step = {"vmap": train_workers, "chunked": min(DEFAULT_CHUNK, train_workers)}
        held = nbytes(one) * per_step.get(resolved, 1)  # one step of one call's workers
    t_draw = time.perf_counter() - t0
    _, _, _, _, losses = federated.run_round(f.init_params, masks, batches, f.loss_fn, opt,
                                             steps=steps, strategy=strategy)
    seconds = time.perf_counter() - t0
    out = {
        "mode": mode, "workers": workers, "S": f.steps, "B": f.fed.batch_size,
        "trained": f"{train_workers} x {steps}", "batches_held": held,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before": rss_before, "draw_s": t_draw, "round_s": seconds,
        "loss": float(losses.mean()),
        "params": sum(v.numel() for v in f.init_params.values()),
    }
    if cuda:
        torch.cuda.synchronize()
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
        out["cuda_before"] = before
    return out


def in_subprocess(mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--workers", str(args.workers),
           "--train-workers", str(args.train_workers), "--steps", str(args.steps),
           "--device", args.device, "--strategy", args.strategy, "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def mib(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=10, help="N (the config's 10)")
    ap.add_argument("--train-workers", type=int, default=1,
                    help="how many of the N workers train this round (default 1)")
    ap.add_argument("--steps", type=int, default=1, help="local steps each trains (default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--strategy", default="auto", help="engine strategy (auto: sequential "
                    "on the CPU for this U-Net, vmap on CUDA)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not 1 <= args.train_workers <= args.workers:
        ap.error("--train-workers must be between 1 and --workers")
    if args.child:
        print(json.dumps(measure(args.child, args.workers, args.train_workers, args.steps,
                                 args.device, args.strategy)))
        return

    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)
    rows = [in_subprocess(mode, args) for mode in MODES]
    r = rows[0]
    print(f"\none federated round, {r['workers']} workers, {r['params'] / 1e6:.1f} M-parameter "
          f"U-Net, B = {r['B']}, S = {r['S']} (pruning-cifar10), {args.device}, "
          f"{args.threads} threads, strategy {args.strategy}\n")
    cuda = "cuda_peak" in r
    head = "| batches | drawn | trained (workers x steps) | batch tensors held (MiB) | "
    head += "GPU peak (GiB) | " if cuda else ""
    print(head + "peak RSS (GiB) | round adds (GiB) | draw s | round s |")
    print("|" + "---|" * (8 + cuda))
    for r in rows:
        drawn = (f"{r['workers']} x {r['S']} steps at once" if r["mode"] == "pre-drawn"
                 else "one step at a time")
        line = f"| {r['mode']} | {drawn} | {r['trained']} | {mib(r['batches_held'])} | "
        line += f"{gib(r['cuda_peak'])} | " if cuda else ""
        print(line + f"{gib(r['peak_rss'])} | {gib(r['peak_rss'] - r['rss_before'])} | "
              f"{r['draw_s']:.1f} | {r['round_s']:.1f} |")
    item = 2 * 4 * SHAPE[0] * SHAPE[1] * SHAPE[2] + 8 + 4  # x0 + eps fp32, y int64, t fp32
    whole = rows[0]["workers"] * rows[0]["S"] * rows[0]["B"] * item
    print(f"\ncomputed: a pre-drawn round is N*S*B*(2*3*32*32*4 + 12) bytes = {gib(whole)} GiB; "
          f"one step of one worker {mib(rows[0]['B'] * item)} MiB "
          f"(x {rows[0]['workers']} for a vmapped step of all workers)")
    print(f"losses agree: {rows[0]['loss']:.6f} vs {rows[1]['loss']:.6f}")


if __name__ == "__main__":
    main()
