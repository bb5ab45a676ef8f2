"""The demo report's two figures: training losses, and what pruning did per round.

Both read only metrics.jsonl records (DESIGN principle 10: a report is rebuilt from the
run folders)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_figure(fed: list[dict], agents: dict[str, list[dict]], path: Path) -> Path:
    """Left: the federation's training loss per round (mean over workers, band = min..max
    worker) and eq. 9 on held-out digits; right: each agent's loss per step, alone."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rounds = [r["round"] for r in fed]
    left.plot(rounds, [r["loss"] for r in fed], marker=".", label="training loss (mean)")
    left.fill_between(rounds, [min(r["worker_loss"]) for r in fed],
                      [max(r["worker_loss"]) for r in fed], alpha=0.25, label="min..max worker")
    left.set(xlabel="round", ylabel="DSM loss (eps)", yscale="log",
             title="federated training (eqs. 7-8)")
    eq9 = [(r["round"], r["eq9_heldout"]) for r in fed if r.get("eq9_heldout") is not None]
    if eq9:
        twin = left.twinx()
        twin.plot(*zip(*eq9), color="tab:red", ls="--", marker=".", label="held-out eq. 9")
        twin.set_ylabel("held-out eq. 9", color="tab:red")
    left.legend(loc="upper right", fontsize="small")
    for name, records in agents.items():
        pts = [(r["step"], r["loss"]) for r in records if "loss" in r]
        if pts:
            right.plot(*zip(*pts), lw=1, label=name)
    right.set(xlabel="step", ylabel="DSM loss (eps)", yscale="log",
              title="federated inference: each agent alone on its silo")
    right.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def pruning_figure(fed: list[dict], path: Path) -> Path:
    """Keep fraction per worker, the last round's coverage histogram (how many coordinates
    each number of workers kept: eq. 8 averages over that many), and bytes up per round
    beside what dense FedAvg would send."""
    last = fed[-1]
    n = len(last["keep_fraction"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].bar(range(n), last["keep_fraction"])
    axes[0].set(xlabel="worker", ylabel="kept / all coordinates", ylim=(0, 1.05),
                title="keep fraction (top-k, level M)")
    hist = last["coverage_hist"]
    axes[1].bar(range(len(hist)), hist)
    axes[1].set(xlabel="workers that kept a coordinate", ylabel="coordinates", yscale="log",
                title=f"coverage, round {last['round']} (Γ* = {last['gamma_star']})")
    rounds = [r["round"] for r in fed]
    axes[2].plot(rounds, [sum(r["bytes_sent"]) / 1e6 for r in fed], marker=".",
                 label="pruned (sent)")
    axes[2].plot(rounds, [n * r["bytes_received"] / 1e6 for r in fed], ls="--",
                 label="dense FedAvg")
    axes[2].set(xlabel="round", ylabel="MB up, all workers", ylim=(0, None),
                title="upload per round")
    axes[2].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
