"""The experiment reports' figures: training losses, and what pruning did per round.

Both read only metrics.jsonl records (DESIGN principle 10: a report is rebuilt from the run
folders). pyplot is imported inside each function: importing this module draws nothing and
chooses no backend.
"""

from __future__ import annotations

from pathlib import Path


def loss_figure(federated: dict[str, dict[str, list[dict]]],
                agents: dict[str, dict[str, list[dict]]], path: Path) -> Path:
    """One panel per group of federated runs (panel title -> {run label: round records}),
    the training loss per round (the pruning paper's Figures 1-2: one line per level), then
    one panel per step-logged cell (title -> {run: step records}): a central model on the
    pooled data, or an agents cell with each agent's loss alone.
    A panel of one federated run also shows the min..max worker band and held-out eq. 9."""
    import matplotlib.pyplot as plt

    panels = [(t, runs, "round") for t, runs in federated.items()] + [
        (t, runs, "step") for t, runs in agents.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, runs, x_key) in zip(axes[0], panels):
        for name, records in runs.items():
            pts = [(r[x_key], r["loss"]) for r in records if "loss" in r]
            if pts:
                ax.plot(*zip(*pts), marker="." if x_key == "round" else None,
                        lw=1.5 if x_key == "round" else 1, label=name)
        if x_key == "round" and len(runs) == 1:
            _one_federation(ax, next(iter(runs.values())))
        ax.set(title=title, xlabel=x_key, ylabel="DSM loss (eps)", yscale="log")
        ax.legend(fontsize="small" if x_key == "round" else "x-small",
                  ncol=1 if x_key == "round" else 2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _one_federation(ax, records: list[dict]) -> None:
    rounds = [r["round"] for r in records]
    ax.fill_between(rounds, [min(r["worker_loss"]) for r in records],
                    [max(r["worker_loss"]) for r in records], alpha=0.25,
                    label="min..max worker")
    eq9 = [(r["round"], r["eq9_heldout"]) for r in records
           if r.get("eq9_heldout") is not None]
    if eq9:
        twin = ax.twinx()
        twin.plot(*zip(*eq9), color="tab:red", ls="--", marker=".", label="held-out eq. 9")
        twin.set_ylabel("held-out eq. 9", color="tab:red")


def pruning_figure(fed: list[dict], path: Path, title: str) -> Path:
    """Keep fraction per worker, the last round's coverage histogram (how many coordinates
    each number of workers kept: eq. 8 averages over that many), and bytes up per round
    beside what dense FedAvg would send."""
    import matplotlib.pyplot as plt

    last = fed[-1]
    n = len(last["keep_fraction"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].bar(range(n), last["keep_fraction"])
    axes[0].set(xlabel="worker", ylabel="kept / all coordinates", ylim=(0, 1.05),
                title=f"keep fraction ({title})")
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
