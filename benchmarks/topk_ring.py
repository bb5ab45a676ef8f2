"""Why do top-k masks reach the lowest training loss but the worst score on the split ring?

Diagnostic for issue 15 item 7 (BENCHMARKS.md, "Federated training by pruning level on the
8-mode ring"): `gmm:ring8` over 4 workers by component (`shards`, 2 modes each), the score
MLP of `benchmarks/gmm_levels.py` (same config, seed, grid and exact-score metric), but the
round loop is driven here with the library's own pieces (`federated.setup.prepare`,
`engine.round_sums`, `loop.run_rounds`: the same seeds, masks, batches and eq. 8 as
`runs.federated.train_federated`, without the run folder), so the masks of every round and
the models around the last round can be measured. Nothing in `fedscore.federated` changes;
the counterfactual variants below are built in this file on top of it.

Per run, side by side:
  eps_score^2 of the global model theta_Q on the pooled ring (the gmm_levels number), and
    split by where x comes from: the modes of the full workers vs of the pruned workers
    (x drawn from those components, noised; the target is always the POOLED ring's score);
  eps_score^2 of the pruned workers' sub-model theta_Q ⊙ m (what eq. 7 starts them from);
  DSM loss on a fixed large batch of each worker's own data: of theta_Q, of theta_Q ⊙ m_n,
    and the reported training loss (mean over the last 10 rounds), full vs pruned workers;
  mask dynamics of the pruned workers: Jaccard overlap of consecutive kept sets (mean over
    the second half of training), the fraction of coordinates pruned in EVERY round of the
    second half (owned by the full workers alone), and the share ||theta_Q||^2 they hold.

Runs (`--runs` picks a subset): F; top-k S and random S (the anomaly and its control);
top-k S "frozen" (pruned workers train with the pruned coordinates held at theta_q instead
of zero: removes the sub-model/global mismatch, a counterfactual NOT in the paper); top-k
S with norm and bias tensors never pruned; top-k S with the pruned workers swapped (ratios
[0.75, 0.75, 1, 1]: other modes pruned); top-k S and F on an iid partition; top-k M and L.

Usage: python benchmarks/topk_ring.py [--rounds 150] [--mc 1000] [--runs F topk-S ...]
Prints markdown tables and writes benchmarks/out/topk_ring.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gmm_levels import GRID, SEED, exact_error  # noqa: E402

from fedscore import diffusion, toy  # noqa: E402
from fedscore.config import RunConfig, load_config  # noqa: E402
from fedscore.federated.engine import round_sums  # noqa: E402
from fedscore.federated.flat import FlatLayout  # noqa: E402
from fedscore.federated.loop import RoundEvent, RoundOutcome, run_rounds  # noqa: E402
from fedscore.federated.masks import build_masks  # noqa: E402
from fedscore.federated.seeding import MASKS, seed_for  # noqa: E402
from fedscore.federated.setup import FederationSetup, draw_batches, prepare  # noqa: E402
from fedscore.runs.sampling import model_score_fn  # noqa: E402

RUNS = {
    # name: (policy, level or keep ratios, partition, variant)
    "F": ("full", "F", "shards", "zeroed"),
    "topk-S": ("topk", "S", "shards", "zeroed"),
    "random-S": ("random", "S", "shards", "zeroed"),
    "topk-S-frozen": ("topk", "S", "shards", "frozen"),
    "topk-S-keepnorms": ("topk", "S", "shards", "keepnorms"),
    "topk-S-swapped": ("topk", [0.75, 0.75, 1.0, 1.0], "shards", "zeroed"),
    "topk-S-iid": ("topk", "S", "iid", "zeroed"),
    "F-iid": ("full", "F", "iid", "zeroed"),
    "topk-M": ("topk", "M", "shards", "zeroed"),
    "topk-L": ("topk", "L", "shards", "zeroed"),
}


def config(policy: str, level, scheme: str, rounds: int) -> RunConfig:
    partition = ({"scheme": "shards", "classes_per_worker": 2} if scheme == "shards"
                 else {"scheme": "iid"})
    ratios = {"level": level} if isinstance(level, str) else {"keep_ratios": level,
                                                              "level": None}
    return load_config(
        None, name="topk-ring", out_dir="/tmp/unused", seed=SEED,
        data={"name": "gmm:ring8"},
        model={"kind": "mlp", "options": {"hidden": 32, "depth": 2}},
        diffusion=GRID, train={"eval_batch": 256},
        federation={"workers": 4, "rounds": rounds, "local_steps": 5, "batch_size": 64,
                    "lr": 2e-3, "optimizer": "adam", "adam_state": "reset",
                    "policy": policy, "partition": partition, **ratios},
    )


def is_norm_or_bias(name: str) -> bool:
    return name.endswith(".bias") or ".norm" in name or name.startswith("out_norm")


@dataclass
class DiagTransport:
    """The in-process transport (`federated.inprocess`) plus a record of every round's masks.

    variant "zeroed": eq. 7 as the library runs it. "frozen": each worker's loss sees
    theta ⊙ m + theta_q ⊙ (1 - m) (pruned coordinates held at the global value, still not
    updated and still ignored by eq. 8). "keepnorms": norm and bias tensors never pruned."""

    f: FederationSetup
    variant: str = "zeroed"
    masks_seen: list = field(default_factory=list)  # flat (N, D) bool per round

    def masks(self, q: int, params: dict) -> dict:
        if self.variant != "keepnorms":
            return self.f.masks(params, q, list(range(self.f.fed.workers)))
        gens = [torch.Generator().manual_seed(seed_for(self.f.cfg.seed, q, n, MASKS))
                for n in range(self.f.fed.workers)]
        return build_masks({k: v.detach() for k, v in params.items()}, self.f.fed.policy,
                           self.f.ratios, gens, exclude=is_norm_or_bias)

    def run_round(self, q: int, params: dict) -> RoundOutcome:
        masks = self.masks(q, params)
        batches = self.f.batches(q, list(range(self.f.fed.workers)))
        loss_fn = self.f.loss_fn
        if self.variant == "frozen":
            n, s = self.f.fed.workers, self.f.steps
            held = {k: torch.where(masks[k], 0.0, params[k][None])[:, None]
                    .expand(n, s, *params[k].shape) for k in params}
            batches = (*batches, held)
            base = self.f.loss_fn

            def loss_fn(p, b):
                return base({k: p[k] + b[4][k] for k in p}, b[:4])

        sums, counts, _, losses = round_sums(params, masks, batches, loss_fn,
                                             self.f.optimizer(), steps=self.f.steps)
        self.masks_seen.append(FlatLayout(params).flatten(masks, 1).clone())
        return RoundOutcome(sums=sums, counts=counts, masks=masks,
                            workers=list(range(losses.shape[0])),
                            worker_loss=losses.mean(dim=1).tolist())


def mode_error(score_fn, gm, modes: list[int], n: int) -> float:
    """eps_score^2 with x drawn from the components `modes` of the ring (noised), against the
    POOLED ring's exact score; fixed draws."""
    times = diffusion.time_grid(GRID["grid"], GRID["steps"], T=GRID["T"], delta=GRID["delta"])
    times = torch.as_tensor(times, dtype=torch.float64)
    sub = gm.components(modes)
    g = torch.Generator().manual_seed(4321)
    total = 0.0
    with torch.no_grad():
        for k in range(len(times) - 1):
            s = float(times[k])
            x0 = sub.sample(n, generator=g).double()
            z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
            x = math.exp(-s) * x0 + math.sqrt(-math.expm1(-2 * s)) * z
            t = torch.full((n,), s, dtype=torch.float64)
            err = score_fn(x.float(), t.float()).double() - gm.score(x, t).double()
            total += float(times[k] - times[k + 1]) * float(err.square().sum(1).mean())
    return total


def score_of(f: FederationSetup, params: dict):
    f.model.load_state_dict(params, strict=False)
    net = model_score_fn(f.model, f.cfg)
    frozen = {k: v.clone() for k, v in params.items()}

    def fn(x, t):  # bind these params (the module is reused for the next model)
        f.model.load_state_dict(frozen, strict=False)
        return net(x, t)

    return fn


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(1, float((a | b).sum()))


def diagnose(name: str, rounds: int, mc: int) -> dict:
    policy, level, scheme, variant = RUNS[name]
    cfg = config(policy, level, scheme, rounds)
    f = prepare(cfg)
    gm = toy.preset("ring8")
    transport = DiagTransport(f, variant)
    losses = []

    def hook(e: RoundEvent) -> None:
        losses.append(e.record["worker_loss"])

    t0 = time.perf_counter()
    out = run_rounds(f.init_params, transport, rounds=rounds, uncovered=f.fed.uncovered,
                     hooks=[hook])
    theta = out.params
    ratios = f.ratios
    full = [n for n, r in enumerate(ratios) if r == 1.0]
    pruned = [n for n, r in enumerate(ratios) if r < 1.0]
    modes = [sorted(f.labels[p].unique().tolist()) for p in f.parts]
    full_modes = sorted({m for n in full for m in modes[n]})
    pruned_modes = sorted({m for n in pruned for m in modes[n]})

    row = {"run": name, "policy": policy, "level": level if isinstance(level, str) else
           str(level), "partition": scheme, "variant": variant, "ratios": ratios,
           "worker_modes": modes, "gamma_star": out.gamma_star}
    g_fn = score_of(f, theta)
    row["eps_global"] = exact_error(g_fn, mc)
    if scheme == "shards" and pruned:
        row["eps_global_full_modes"] = mode_error(g_fn, gm, full_modes, mc)
        row["eps_global_pruned_modes"] = mode_error(g_fn, gm, pruned_modes, mc)

    # theta_Q ⊙ m_{Q,n}: the sub-model a pruned worker would start round Q+1 from
    masks = transport.masks(rounds, theta)
    layout = FlatLayout(theta)
    sub = {n: {k: torch.where(masks[k][n], v, 0.0) for k, v in theta.items()} for n in pruned}
    if pruned:
        n0 = pruned[0]  # (top-k: every pruned worker of one ratio has the same mask)
        s_fn = score_of(f, sub[n0])
        row["eps_sub"] = exact_error(s_fn, mc)
        if scheme == "shards":
            row["eps_sub_pruned_modes"] = mode_error(s_fn, gm, pruned_modes, mc)
            row["eps_sub_full_modes"] = mode_error(s_fn, gm, full_modes, mc)

    # DSM loss on a fixed large batch of each worker's own data (fixed noise)
    ev = draw_batches(f.images, f.labels, f.parts, 1, 4096, f.times,
                      cfg.diffusion.weighting, 10_000 + SEED, 0)
    with torch.no_grad():
        def dsm(p, n):
            return float(f.loss_fn(p, tuple(b[n, 0] for b in ev)))
        loss_global = [dsm(theta, n) for n in range(len(ratios))]
        loss_sub = [dsm(sub[n], n) if n in sub else loss_global[n] for n in range(len(ratios))]
    reported = [statistics.fmean(r[n] for r in losses[-10:]) for n in range(len(ratios))]

    def avg(xs, who):
        return statistics.fmean(xs[n] for n in who) if who else float("nan")

    row |= {"loss_reported": reported, "loss_global": loss_global, "loss_sub": loss_sub,
            "loss_reported_mean": statistics.fmean(reported),
            "loss_global_mean": statistics.fmean(loss_global)}
    for tag, who in (("full", full), ("pruned", pruned)):
        row[f"loss_reported_{tag}"] = avg(reported, who)
        row[f"loss_global_{tag}"] = avg(loss_global, who)
        row[f"loss_sub_{tag}"] = avg(loss_sub, who)

    # mask dynamics of the pruned workers over the second half of training
    if pruned:
        seen = torch.stack(transport.masks_seen)[:, pruned]  # (Q, P, D)
        half = seen[rounds // 2:]
        row["jaccard_consecutive"] = statistics.fmean(
            jaccard(half[q, i], half[q + 1, i])
            for q in range(len(half) - 1) for i in range(len(pruned)))
        always_pruned = (~half).all(0).all(0)  # pruned by every pruned worker, every round
        row["frac_always_pruned"] = float(always_pruned.float().mean())
        flat = layout.flatten(theta)
        row["norm2_share_always_pruned"] = float(flat[always_pruned].square().sum()
                                                 / flat.square().sum())
        identical = [bool((seen[:, i] == seen[:, 0]).all()) for i in range(len(pruned))]
        row["pruned_masks_identical"] = all(identical)
    row["seconds"] = time.perf_counter() - t0
    return row


def fmt(x, spec=".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--mc", type=int, default=1000, help="MC points per grid time")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    t_start = time.perf_counter()
    rows = []
    for name in args.runs:
        rows.append(diagnose(name, args.rounds, args.mc))
        print(f"  {name}: eps {rows[-1]['eps_global']:.3f} ({rows[-1]['seconds']:.0f} s)",
              flush=True)

    print(f"\n{args.rounds} rounds, {args.mc} MC points per grid time; 'full modes' / "
          "'pruned modes': x drawn from the modes of the full / pruned workers, target the "
          "pooled ring's score\n")
    print("| run | eps global | on full workers' modes | on pruned workers' modes | "
          "eps sub-model theta⊙m | sub on pruned modes | Jaccard consecutive masks | "
          "always pruned (frac / share of norm^2) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ap_ = (f"{fmt(r.get('frac_always_pruned'))} / "
               f"{fmt(r.get('norm2_share_always_pruned'), '.4f')}"
               if "frac_always_pruned" in r else "—")
        print(f"| {r['run']} | {fmt(r['eps_global'])} | {fmt(r.get('eps_global_full_modes'))} "
              f"| {fmt(r.get('eps_global_pruned_modes'))} | {fmt(r.get('eps_sub'))} | "
              f"{fmt(r.get('eps_sub_pruned_modes'))} | {fmt(r.get('jaccard_consecutive'))} | "
              f"{ap_} |")
    print("\nDSM loss on each worker's own data (fixed batch of 4096 and noise); reported = "
          "the training loss the run logs (mean of the last 10 rounds)\n")
    print("| run | reported (all) | reported full / pruned | theta_Q (all) | "
          "theta_Q full / pruned | theta_Q⊙m on pruned workers |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {fmt(r['loss_reported_mean'], '.4f')} | "
              f"{fmt(r['loss_reported_full'], '.4f')} / {fmt(r['loss_reported_pruned'], '.4f')}"
              f" | {fmt(r['loss_global_mean'], '.4f')} | {fmt(r['loss_global_full'], '.4f')} / "
              f"{fmt(r['loss_global_pruned'], '.4f')} "
              f"| {fmt(r['loss_sub_pruned'], '.4f')} |")
    print(f"\nload average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}; "
          f"wall {time.perf_counter() - t_start:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "topk_ring.json"
    path.write_text(json.dumps({"rounds": args.rounds, "mc": args.mc, "rows": rows},
                               indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
