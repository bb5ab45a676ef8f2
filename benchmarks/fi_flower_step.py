"""What federated inference costs on Flower, against in-process: one reverse step of a
per-step aggregator (`mixture`), and the whole sample set with `route` (one message per
silo, no per-step exchange).

Setting: K tiny class-conditional MLP agents (gmm:two-clients, hidden 16, trained 3 steps:
the network's cost is negligible, so what is measured is the deployment), `fedscore agents
sample` with each --aggregator (default: mixture and route), 4 labels x --per-label
samples, --steps exponential-integrator steps, seed 0, each deployment on the same agents:

  in-process   `sample_agents`: K agents stacked in one process;
  simulation   Flower's simulation runtime (Ray), K virtual SuperNodes;
  loopback     a SuperLink + K `flower-supernode` processes on 127.0.0.1.

Per deployment and aggregator: wall time of the whole command (Flower's start-up
included), the messages each agent received, and the server's time from push to holding
all replies: per step (one round of K query.score messages) the median and max over the
steps after the first; for route its one call (every silo's whole reverse process). Then
the agents' own compute (forward pass; route: the silo's whole sampling) and the ClientApp
process's age when fedscore's code started (flwr 1.42 starts a fresh `flwr-clientapp` per
message on a deployment SuperNode); the rest of a loopback exchange is the SuperNode's
hard-coded 3 s sleep between pulls when it found no message, and transport. In-process:
the sampler's mean step, the agents already loaded. Last column: the largest difference
to the in-process samples of the same aggregator (same seed).

Usage: python benchmarks/fi_flower_step.py [--agents 2] [--steps 5] [--per-label 4]
           [--aggregators mixture route]
Prints a markdown table; writes DIR/fi_flower_step.json. One thread per process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from fedscore import diffusion  # noqa: E402
from fedscore.config import load_config  # noqa: E402
from fedscore.experiments.agents import SAMPLER, load_agents, train_agents  # noqa: E402
from fedscore.flower.fi_run import STATUS, sample_agents_on  # noqa: E402
from fedscore.inference import agents_score_fn, draw  # noqa: E402
from fedscore.inference.sampling import route_generator  # noqa: E402
from fedscore.runs.evaluate import load_samples  # noqa: E402


def make_agents(root: Path, k: int) -> list[Path]:
    cfg = load_config(
        None, name="agents", out_dir=str(root), data={"name": "gmm:two-clients"},
        model={"kind": "mlp", "conditional": True, "options": {"hidden": 16, "depth": 1}},
        diffusion={"grid": "exponential", "steps": 10, "T": 5.0, "delta": 1e-3},
        train={"steps": 3, "batch_size": 16, "checkpoint_every": 3, "log_every": 3,
               "eval_batch": 8})
    return train_agents(cfg, "heterogeneous", root / "agents", n_agents=k, progress=False)


def run(dirs, out: Path, deployment: str, aggregator: str, steps: int, per_label: int
        ) -> dict:
    t0 = time.perf_counter()
    paths = sample_agents_on(dirs, out, deployment=deployment, aggregator=aggregator,
                             per_label=per_label, steps=steps, seed=0, step_timeout=300)
    row = {"deployment": deployment, "aggregator": aggregator,
           "wall_s": time.perf_counter() - t0,
           "samples": load_samples(paths["samples"], (2,))[0]}
    if deployment == "inprocess":  # the sampler alone, on the agents loaded once
        agents = load_agents(dirs)
        labels = torch.arange(4).repeat_interleave(per_label)
        times = diffusion.time_grid("exponential", steps, T=5.0, delta=1e-3)
        score_fn = agents_score_fn(agents, labels, aggregator,
                                   generator=route_generator(0))
        t1 = time.perf_counter()
        draw(score_fn, len(labels), (2,), times, SAMPLER, 0)
        row["step_s"] = [(time.perf_counter() - t1) / steps]
        return row
    calls = json.loads((out / STATUS).read_text())["calls"]
    if aggregator != "route":
        calls = calls[1:]  # per step, after the first
    row |= {"messages": len(calls) if aggregator == "route" else len(calls) + 1,
            "step_s": [c["seconds"] for c in calls],
            "score_s": [max(c["score_seconds"]) for c in calls],
            "age_s": [max(c["process_age_seconds"]) for c in calls]}
    return row


def table(rows: list[dict]) -> None:
    print("| deployment | aggregator | wall s | messages per agent | exchange s: per step "
          "(median, max); route: its one call | agent compute s | ClientApp process age s "
          "(simulation: one kept process) | max abs diff to in-process |")
    print("|---|---|---|---|---|---|---|---|")
    ref = {r["aggregator"]: r["samples"] for r in rows if r["deployment"] == "inprocess"}
    for r in rows:
        diff = float((r["samples"] - ref[r["aggregator"]]).abs().max())
        head = f"| {r['deployment']} | {r['aggregator']} | {r['wall_s']:.1f} |"
        if "score_s" not in r:
            print(f"{head} — | {r['step_s'][0]:.4f} (in-process step, mean) | — | — | "
                  f"{diff:.1e} |")
            continue
        med, mx = statistics.median(r["step_s"]), max(r["step_s"])
        print(f"{head} {r['messages']} | {med:.2f}, {mx:.2f} | "
              f"{statistics.median(r['score_s']):.4f} | "
              f"{statistics.median(r['age_s']):.2f} | {diff:.1e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--per-label", type=int, default=4)
    p.add_argument("--aggregators", nargs="+", default=["mixture", "route"])
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    root = a.out or Path(tempfile.mkdtemp(prefix="fi-flower-"))
    dirs = make_agents(root, a.agents)
    rows = [run(dirs, root / f"{d}-{agg}", d, agg, a.steps, a.per_label)
            for d in ("inprocess", "simulation", "loopback") for agg in a.aggregators]
    print(f"K = {a.agents} agents, {a.steps} steps, {4 * a.per_label} samples\n")
    table(rows)
    for r in rows:
        r["samples"] = None
    (root / "fi_flower_step.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{root / 'fi_flower_step.json'}")


if __name__ == "__main__":
    main()
