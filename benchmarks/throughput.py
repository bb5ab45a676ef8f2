"""Training and sampling throughput of the project's U-Nets, fp32 against bf16, side by side.

Networks (32x32x3 images, unconditional, as CIFAR-10): the `tiny` (~0.6 M parameters) and
`small` (~3.5 M) U-Nets, and `paper`, the pruning paper's network, built from
configs/pruning-cifar10.yaml's `model:` section (DDPM's CIFAR-10 U-Net, 34.6 M parameters;
it is the project's `paper` preset).

  train   one optimiser step of centralised training as runs/train.py takes it: the DSM loss
          (eps parameterisation and weighting, the pruning config's), forward under the
          runtime's autocast, backward, torch.optim.Adam; img/s = batch / seconds per step.
  sample  one reverse step of DDPM's ancestral sampler (`diffusion.sample`, no_grad, under
          autocast); img/s = batch / seconds per step (a 999-step sampling run of n images
          takes n * 999 / that seconds).

Method: one process; per network, every precision's step is timed in turn, alternating
(fp32, bf16, fp32, bf16, ...), so a shared machine's swings hit both alike; the first
`--warmup` steps of each (allocations, cuDNN autotuning, autocast caches) are not timed;
the median step is reported. On CUDA every timed step ends with a synchronize, and the
peak memory of each (network, precision) is torch.cuda.max_memory_allocated.

On CUDA (or with --extras) it also measures, at fp32:
  (a) strategies: one federated round (N = 10 workers, S local Adam steps at batch
      --fed-batch, top-k masks of level M) under the engine's "vmap", "chunked",
      "sequential" and "threads" strategies (`federated.run_round`): evidence for the
      engine's "auto" rule (vmap on accelerators, threads on a multi-core CPU); an
      out-of-memory is recorded as such;
  (b) federated vs centralised: that round under "auto" against the floor, ONE model doing
      N * S plain torch.optim.Adam steps at the same batch on the same samples (target: the
      round <= 1.10 x the floor);
  (c) federated inference: K = 10 agents (`inference.StackedAgents`, "auto", mean
      aggregator) for 20 reverse steps at batch --fed-batch, against the floor, ONE model at
      batch K x fed-batch over the same steps (target <= 1.3 x).

bf16 on a CPU without avx512_bf16/AMX is emulated (this project's 2-core AVX2 machine: ~10x
slower than fp32); `runtime.bf16_supported` says which case holds, and the table says it.

Usage:
  python benchmarks/throughput.py --quick    # CPU: tiny + small, batch 16, a few minutes
  python benchmarks/throughput.py --device cuda --out benchmarks/out/throughput.json
Flags: --device auto|cpu|cuda[:N], --models tiny small paper, --batch 128, --steps N,
--precisions fp32 bf16, --quick, --extras, --out FILE.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from fedscore import diffusion, federated, runtime
from fedscore.config import load_config
from fedscore.inference import combine
from fedscore.inference.agents import StackedAgents
from fedscore.models import count_params
from fedscore.models.build import build_model_for

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (3, 32, 32)
MODELS = ("tiny", "small", "paper")
WORKERS, AGENTS, LEVEL, LR = 10, 10, "M", 1e-4


def pruning_config():
    return load_config(ROOT / "configs" / "pruning-cifar10.yaml")


def build(name: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The named U-Net at 32x32x3; `paper` is the pruning config's model section as is."""
    if name == "paper":
        spec = pruning_config().model
    else:
        spec = SimpleNamespace(kind="unet", size=name, conditional=False, options={})
    return build_model_for(spec, SHAPE, None, seed=seed).to(device)


def grid() -> torch.Tensor:
    cfg = pruning_config().diffusion
    return diffusion.time_grid(**cfg.grid_kwargs())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dsm(net, x0, t, eps, rt: runtime.Runtime):
    def f(x, tt):
        with rt.autocast():
            out = net(x, tt)
        return out.float()

    return diffusion.dsm_loss(f, x0, t, eps, weighting="eps", parameterisation="eps")


# ---------------------------------------------------------------- fp32 vs bf16, alternating


class Trainer:
    """One network's centralised training step on `rt`, on fixed pre-drawn batches."""

    def __init__(self, name, rt: runtime.Runtime, batch: int, times: torch.Tensor):
        self.rt, self.model = rt, build(name, rt.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR)
        g = torch.Generator().manual_seed(0)
        x0 = torch.rand((batch, *SHAPE), generator=g) * 2 - 1
        t, eps = diffusion.draw_noise(x0, times, "eps", g)
        self.batch = tuple(v.to(rt.device) for v in (x0, t, eps))

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = dsm(self.model, *self.batch, self.rt)
        loss.backward()
        self.opt.step()
        return loss


class Sampler:
    """One network's reverse step (ancestral, DDPM's sampler) on `rt`."""

    def __init__(self, name, rt: runtime.Runtime, batch: int, times: torch.Tensor):
        self.rt = rt
        model = build(name, rt.device).eval()

        def net(x, t):
            with torch.no_grad(), rt.autocast():
                return model(x, t).float()

        self.score = diffusion.score_fn_of(net, "eps")
        self.times = times[len(times) // 2:len(times) // 2 + 2]  # one step, mid-trajectory
        self.x = torch.randn((batch, *SHAPE), device=rt.device)
        self.g = torch.Generator(device=rt.device).manual_seed(0)

    def step(self):
        return diffusion.sample(self.score, self.x, self.times, "ancestral", self.g)


def alternate(makers: dict, steps: int, warmup: int, device: torch.device) -> dict:
    """Median seconds per step of each maker's `step`, timed in turn; peak CUDA memory."""
    subjects = {p: make() for p, make in makers.items()}
    times = {p: [] for p in subjects}
    peak = {p: 0.0 for p in subjects}
    for i in range(warmup + steps):
        for p, s in subjects.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            out = s.step()
            sync(device)
            dt = time.perf_counter() - t0
            if not torch.isfinite(torch.as_tensor(out).float()).all():
                raise RuntimeError(f"non-finite output in {p}")
            if i >= warmup:
                times[p].append(dt)
            if device.type == "cuda":
                peak[p] = max(peak[p], torch.cuda.max_memory_allocated(device) / 2**20)
    del subjects
    return {p: {"median_s": statistics.median(v), "steps": len(v), "peak_mb": peak[p]}
            for p, v in times.items()}


def precision_table(args, device) -> list[dict]:
    times = grid()
    rows = []
    for name in args.models:
        steps = args.steps if args.steps else (
            max(2, args.default_steps // (4 if name == "paper" and device.type == "cpu" else 1)))
        params = count_params(build(name, torch.device("cpu")))
        for kind, cls in (("train", Trainer), ("sample", Sampler)):
            makers = {p: (lambda p=p, cls=cls, name=name:
                          cls(name, runtime.Runtime(device, p), args.batch, times))
                      for p in args.precisions}
            got = alternate(makers, steps, args.warmup, device)
            for p, r in got.items():
                rows.append({"model": name, "params": params, "kind": kind, "precision": p,
                             "batch": args.batch, **r, "img_per_s": args.batch / r["median_s"]})
            print(fmt_pair(rows[-len(got):]), flush=True)
    return rows


def fmt_pair(rows) -> str:
    r0 = rows[0]
    parts = [f"{r['precision']} {r['img_per_s']:.1f} img/s" for r in rows]
    return f"  {r0['model']:>6} {r0['kind']:<6} " + ", ".join(parts)


# ---------------------------------------------------------------- (a), (b), (c)


def round_setup(name, device, steps: int, batch: int):
    model = build(name, device)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    ratios = federated.level_ratios(LEVEL, n_workers=WORKERS)
    masks = federated.build_masks({k: v.cpu() for k, v in params.items()}, "topk", ratios, None)
    masks = {k: v.to(device) for k, v in masks.items()}
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand((WORKERS, steps, batch, *SHAPE), generator=g) * 2 - 1
    t, eps = diffusion.draw_noise(x0.flatten(0, 2), grid(), "eps", g)
    batches = (x0.to(device), t.reshape(WORKERS, steps, batch).to(device),
               eps.reshape(x0.shape).to(device))
    return model, params, masks, batches


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def federated_round(name, device, steps, batch, repeats) -> dict:
    """(a) the strategies and (b) the round against the centralised floor, fp32."""
    model, params, masks, batches = round_setup(name, device, steps, batch)
    rt = runtime.Runtime(device, "fp32")
    loss_fn = federated.make_loss_fn(model, lambda net, b: dsm(net, *b, rt))
    out = {"model": name, "workers": WORKERS, "local_steps": steps, "batch": batch,
           "auto": federated.choose_strategy(params)}
    for strategy in ("vmap", "chunked", "sequential", "threads"):
        def one(strategy=strategy):
            federated.run_round(params, masks, batches, loss_fn, federated.Adam(lr=LR),
                                steps=steps, strategy=strategy)
        try:
            out[strategy] = timed(one, device, repeats)
        except torch.cuda.OutOfMemoryError:
            out[strategy] = "OOM"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  (a) {name} {strategy}: {out[strategy]}", flush=True)

    def central():  # ONE model, N * S plain Adam steps at the same batch, same samples
        m = copy.deepcopy(model)
        opt = torch.optim.Adam(m.parameters(), lr=LR)
        x0, t, eps = (v.flatten(0, 1) for v in batches)
        for i in range(x0.shape[0]):
            opt.zero_grad(set_to_none=True)
            dsm(m, x0[i], t[i], eps[i], rt).backward()
            opt.step()

    out["central_floor"] = timed(central, device, repeats)
    auto = out[out["auto"]]
    out["round_over_floor"] = auto / out["central_floor"] if isinstance(auto, float) else None
    print(f"  (b) {name} round ({out['auto']}) / central floor: {out['round_over_floor']}",
          flush=True)
    return out


def federated_inference(name, device, steps, batch, repeats) -> dict:
    """(c) K agents through StackedAgents ("auto", mean) vs one model at batch K x B."""
    models = [build(name, device, seed=k).eval() for k in range(AGENTS)]
    agents = StackedAgents(models[0], models, "eps")
    times = grid()[:: max(1, len(grid()) // steps)][:steps + 1]
    agg = combine(agents, "mean")
    one = diffusion.score_fn_of(lambda x, t: models[0](x, t), "eps")

    def run(score, n):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn((n, *SHAPE), generator=g, device=device)
        with torch.no_grad():
            diffusion.sample(score, x, times, "ancestral", g)

    out = {"model": name, "agents": AGENTS, "steps": len(times) - 1, "batch": batch,
           "strategy": agents.strategy}
    out["agents_s"] = timed(lambda: run(agg, batch), device, repeats)
    out["one_model_floor_s"] = timed(lambda: run(one, batch * AGENTS), device, repeats)
    out["agents_over_floor"] = out["agents_s"] / out["one_model_floor_s"]
    print(f"  (c) {name} K={AGENTS} agents / one model at K x B: "
          f"{out['agents_over_floor']:.2f}", flush=True)
    return out


# ---------------------------------------------------------------- report


def markdown(rows, precisions) -> list[str]:
    base = precisions[0]
    head = ["model", "params", "kind"] + [f"{p} img/s" for p in precisions]
    head += [f"{p}/{base}" for p in precisions[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r["model"], r["kind"]) for r in rows},
                  key=lambda k: (MODELS.index(k[0]) if k[0] in MODELS else 9, k[1] != "train"))
    for model, kind in keys:
        by = {r["precision"]: r for r in rows if r["model"] == model and r["kind"] == kind}
        cells = [model, f"{by[base]['params'] / 1e6:.2f} M", kind]
        cells += [f"{by[p]['img_per_s']:.1f}" for p in precisions]
        cells += [f"{by[p]['img_per_s'] / by[base]['img_per_s']:.2f}x" for p in precisions[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda[:N]")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=None,
                    help="default: all three (--quick on a CPU: tiny small)")
    ap.add_argument("--batch", type=int, default=None,
                    help="default 128 (--quick on a CPU: 16, bf16 being emulated there)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per (network, precision); default 20 (--quick: 5, "
                         "on a CPU 2; the paper network on a CPU: a quarter, at least 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; quick 1)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                    choices=list(runtime.PRECISIONS))
    ap.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    ap.add_argument("--extras", action=argparse.BooleanOptionalAction, default=None,
                    help="(a)-(c): strategies, round vs floor, K agents (default: on CUDA)")
    ap.add_argument("--extras-models", nargs="+", choices=MODELS, default=None,
                    help="networks of (a)-(c) (default: tiny small paper; quick: tiny)")
    ap.add_argument("--fed-batch", type=int, default=None,
                    help="batch of (a)-(c) (default 32; quick 8)")
    ap.add_argument("--fed-steps", type=int, default=None,
                    help="local steps S of (a)-(b) (default 5; quick 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    rt = runtime.resolve(args.device, "fp32")
    device = rt.device
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_quick = args.quick and device.type == "cpu"
    args.models = args.models or (["tiny", "small"] if cpu_quick else list(MODELS))
    args.batch = args.batch or (16 if cpu_quick else 128)
    args.default_steps = (2 if cpu_quick else 5) if args.quick else 20
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    extras = device.type == "cuda" if args.extras is None else args.extras
    fed_batch = args.fed_batch or (8 if args.quick else 32)
    fed_steps = args.fed_steps or (2 if args.quick else 5)
    extras_models = args.extras_models or (["tiny"] if args.quick else list(MODELS))

    bf16 = runtime.bf16_supported(device)
    chip = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    print(f"device {device} ({chip}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 "
          f"{'native' if bf16 else 'EMULATED (slow)'}; batch {args.batch}; load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    rows = precision_table(args, device)
    table = markdown(rows, args.precisions)
    result = {"device": str(device), "torch": torch.__version__, "bf16_native": bf16,
              "threads": torch.get_num_threads(), "batch": args.batch, "rows": rows}
    if extras:
        result["strategies_and_floor"] = [
            federated_round(m, device, fed_steps, fed_batch, 1 if args.quick else 3)
            for m in extras_models]
        result["federated_inference"] = [
            federated_inference(m, device, 5 if args.quick else 20, fed_batch,
                                1 if args.quick else 3)
            for m in extras_models]
    result["seconds"] = time.perf_counter() - t0
    print()
    print("\n".join(table))
    for r in result.get("strategies_and_floor", []):
        cells = ", ".join(f"{s} {r[s] if isinstance(r[s], str) else f'{r[s]:.3f} s'}"
                          for s in ("vmap", "chunked", "sequential", "threads"))
        print(f"(a) {r['model']} round, N={r['workers']} S={r['local_steps']} "
              f"B={r['batch']}: {cells}; auto -> {r['auto']}")
        ratio = r["round_over_floor"]
        print(f"(b) {r['model']} round / centralised floor ({r['central_floor']:.3f} s): "
              + (f"{ratio:.2f}x (target <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'})"
                 if ratio else "n/a"))
    for r in result.get("federated_inference", []):
        ratio = r["agents_over_floor"]
        print(f"(c) {r['model']} K={r['agents']} agents ({r['strategy']}) "
              f"{r['agents_s']:.3f} s / one model at K x B {r['one_model_floor_s']:.3f} s: "
              f"{ratio:.2f}x (target <= 1.3: {'met' if ratio <= 1.3 else 'NOT met'})")
    print(f"total {result['seconds']:.0f} s; load {os.getloadavg()[0]:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
