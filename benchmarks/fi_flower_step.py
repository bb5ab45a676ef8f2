"""What one reverse step of federated inference costs on Flower, against in-process.

Setting: K tiny class-conditional MLP agents (gmm:two-clients, hidden 16, trained 3 steps:
the network's cost is negligible, so what is measured is the deployment), `fedscore agents
sample` with the `mixture` aggregator, 4 labels x --per-label samples, --steps
exponential-integrator steps, seed 0, each deployment on the same agents:

  in-process   `sample_agents`: K agents stacked in one process;
  simulation   Flower's simulation runtime (Ray), K virtual SuperNodes;
  loopback     a SuperLink + K `flower-supernode` processes on 127.0.0.1.

Per deployment: wall time of the whole command (Flower's start-up included) and, per step
(one round of K query.score messages), the server's time from push to holding all K
replies: median and max over the steps after the first (in-process: the sampler's mean
step, the agents already loaded). Loopback splits it: the agents'
forward pass, the ClientApp process's age when fedscore's code started (flwr 1.42 starts a
fresh `flwr-clientapp` per message) and the rest (the SuperNode's hard-coded 3 s sleep
between pulls when it found no message, transport).

Usage: python benchmarks/fi_flower_step.py [--agents 2] [--steps 5] [--per-label 4]
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
from fedscore.runs.evaluate import load_samples  # noqa: E402


def make_agents(root: Path, k: int) -> list[Path]:
    cfg = load_config(
        None, name="agents", out_dir=str(root), data={"name": "gmm:two-clients"},
        model={"kind": "mlp", "conditional": True, "options": {"hidden": 16, "depth": 1}},
        diffusion={"grid": "exponential", "steps": 10, "T": 5.0, "delta": 1e-3},
        train={"steps": 3, "batch_size": 16, "checkpoint_every": 3, "log_every": 3,
               "eval_batch": 8})
    return train_agents(cfg, "heterogeneous", root / "agents", n_agents=k, progress=False)


def run(dirs, out: Path, deployment: str, steps: int, per_label: int) -> dict:
    t0 = time.perf_counter()
    paths = sample_agents_on(dirs, out, deployment=deployment, aggregator="mixture",
                             per_label=per_label, steps=steps, seed=0, step_timeout=300)
    row = {"deployment": deployment, "wall_s": time.perf_counter() - t0,
           "samples": load_samples(paths["samples"], (2,))[0]}
    if deployment == "inprocess":  # the sampler alone, on the agents loaded once
        agents = load_agents(dirs)
        labels = torch.arange(4).repeat_interleave(per_label)
        times = diffusion.time_grid("exponential", steps, T=5.0, delta=1e-3)
        t1 = time.perf_counter()
        draw(agents_score_fn(agents, labels, "mixture"), len(labels), (2,), times,
             SAMPLER, 0)
        row["step_s"] = [(time.perf_counter() - t1) / steps]
    else:
        calls = json.loads((out / STATUS).read_text())["calls"][1:]  # after the first
        row |= {"step_s": [c["seconds"] for c in calls],
                "score_s": [max(c["score_seconds"]) for c in calls],
                "age_s": [max(c["process_age_seconds"]) for c in calls]}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--per-label", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    root = a.out or Path(tempfile.mkdtemp(prefix="fi-flower-"))
    dirs = make_agents(root, a.agents)
    rows = [run(dirs, root / d, d, a.steps, a.per_label)
            for d in ("inprocess", "simulation", "loopback")]
    ref = rows[0]["samples"]
    print(f"K = {a.agents} agents, {a.steps} steps, {4 * a.per_label} samples, mixture\n")
    print("| deployment | wall s | step s (median, max) | agent forward s | ClientApp "
          "process age s (simulation: one kept process) | max abs diff to in-process |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        diff = float((r["samples"] - ref).abs().max())
        if "score_s" not in r:
            print(f"| {r['deployment']} | {r['wall_s']:.1f} | {r['step_s'][0]:.4f} (mean) | "
                  f"— | — | {diff:.1e} |")
            continue
        med, mx = statistics.median(r["step_s"]), max(r["step_s"])
        print(f"| {r['deployment']} | {r['wall_s']:.1f} | {med:.2f}, {mx:.2f} | "
              f"{statistics.median(r['score_s']):.4f} | "
              f"{statistics.median(r['age_s']):.2f} | {diff:.1e} |")
    for r in rows:
        r["samples"] = None
    (root / "fi_flower_step.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{root / 'fi_flower_step.json'}")


if __name__ == "__main__":
    main()
