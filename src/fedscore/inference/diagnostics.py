"""Score diagnostics of the FI paper (its eqs. 9-13, Tables 3-4).

For each label l, time t and input kind n (pure noise, or real images of label l), with
agents' scores v_i = a_i(s_j, t, l) (eq. 9) and their aggregate v-bar (eq. 10; the paper's
uniform mean, or any aggregator here):
    m-bar = (1/S) sum_j ||v-bar_j||                                   (eq. 11)
    c_j   = (1/K) sum_i cos(v_ij, v-bar_j),  c-bar = (1/S) sum_j c_j   (eqs. 12-13)
Times are given as fractions of the run's T: the paper's t in {1.0, 0.5, 0.1, 0.01} lives
on a [0, 1] diffusion clock, so t = 1 means the start of the reverse process.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from fedscore.inference.aggregators import combine

PAPER_TIMES = (1.0, 0.5, 0.1, 0.01)


def batch_diagnostics(scores: Tensor, aggregate: Tensor) -> tuple[float, float]:
    """(m-bar, c-bar) of eqs. 11 and 13 from agents' scores (K, S, ...) and their aggregate
    (S, ...)."""
    v = scores.flatten(2).double()  # (K, S, D)
    vbar = aggregate.flatten(1).double()  # (S, D)
    magnitude = vbar.norm(dim=1).mean()
    cos = torch.nn.functional.cosine_similarity(v, vbar.expand_as(v), dim=2)  # (K, S)
    return float(magnitude), float(cos.mean(0).mean())


def score_diagnostics(
    agent_scores: Callable[[Tensor, Tensor, Tensor], Tensor],
    inputs: dict[int, dict[str, Tensor]],
    *,
    T: float,
    fractions: tuple[float, ...] = PAPER_TIMES,
    aggregator: str = "mean",
    weights: Callable[[Tensor], Tensor] | None = None,
) -> list[dict]:
    """One record per (label, t, input kind) with the paper's magnitude and cosine.

    agent_scores(x, t, y) -> (K, B, ...): the K agents' scores for labels y.
    inputs[label] = {"noise": (S, ...), "real": (S, ...)}.
    weights(y) -> (B, K) agent weights for the weighted/hybrid/mixture aggregators.
    """
    records = []
    with torch.no_grad():
        for label, kinds in sorted(inputs.items()):
            for frac in fractions:
                for kind, x in kinds.items():
                    y = torch.full((x.shape[0],), label, dtype=torch.long)
                    t = torch.full((x.shape[0],), frac * T, dtype=x.dtype)
                    v = agent_scores(x, t, y)
                    # the aggregator reads the precomputed scores instead of the networks
                    agg = combine(lambda _x, _t, v=v: v, aggregator,
                                  weights=weights(y) if weights is not None else None)
                    magnitude, cosine = batch_diagnostics(v, agg(x, t))
                    records.append({"label": label, "t": frac, "input": kind,
                                    "magnitude": magnitude, "cosine": cosine})
    return records


def write_csv(records: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["label", "t", "input", "magnitude", "cosine"])
        w.writeheader()
        w.writerows(records)
    return Path(path)


def markdown_table(records: list[dict]) -> str:
    """Laid out like the FI paper's Tables 3-4: a row per (label, input), a column pair
    (magnitude, cosine) per time."""
    fractions = sorted({r["t"] for r in records}, reverse=True)
    head = "| label | input | " + " | ".join(f"t={f:g} mag | t={f:g} cos" for f in fractions)
    lines = [head + " |", "|---|---|" + "---|---|" * len(fractions)]
    index = {(r["label"], r["input"], r["t"]): r for r in records}
    for label in sorted({r["label"] for r in records}):
        for kind in ("noise", "real"):
            if (label, kind, fractions[0]) not in index:
                continue
            cells = []
            for f in fractions:
                r = index[(label, kind, f)]
                cells.append(f"{r['magnitude']:.2f} | {r['cosine']:.3f}")
            lines.append(f"| {label} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
