"""`fedscore bound`: Theorem 1 (and Corollary 1) evaluated at a run's measured constants or at
given ones, set beside the observed left-hand side (SPEC §4).

`bound_report` writes `bound.md` (the constants and where each came from, the terms, the
dominant term, the conditions met or violated, the observed (1/Q) sum_q ||grad F(theta_q)||^2
beside the bound and, if the observation exceeds the bound, which estimate is most likely
too small) and `bound_vs_Q.png` (the bound and its terms against Q, the observation marked).
`load_params` reads given constants from YAML; `run_bound` is the CLI's single entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedscore.errors import FedscoreError
from fedscore.io import read_jsonl
from fedscore.plotting import pyplot
from fedscore.theory.bounds import corollary1, theorem1
from fedscore.theory.estimate import constants_from_metrics
from fedscore.theory.result import Bound, fmt

REQUIRED = ("L", "w", "sigma1", "sigma2", "N", "gamma_star", "S", "Q", "F0", "FQ", "theta0_sq")
OPTIONAL = ("eta", "observed_lhs")
INTEGERS = ("N", "S", "Q")
# what constants_from_metrics adds beside the constants
EXTRAS = ("sigma1_mean", "sigma2_mean", "lhs_curve", "sources", "notes")
_HINTS = {
    "L": "L needs at least two theory observations (theory.every < the number of rounds)",
    "S": "S and eta are recorded when the run loop builds Estimator(S=..., eta=...)",
    "sigma1": "sigma1 needs the round's mini-batches passed to the estimator",
    "gamma_star": "Gamma* and w come from the rounds' min_coverage and w2 in metrics.jsonl",
    "w": "Gamma* and w come from the rounds' min_coverage and w2 in metrics.jsonl",
}
_SQUARED = {"sigma1_sq": "sigma1", "sigma2_sq": "sigma2", "w2": "w", "w_sq": "w"}


def _split(constants: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """(theorem1's keyword arguments, the rest); missing constants named with a hint."""
    missing = [k for k in REQUIRED if k not in constants]
    if missing:
        hints = sorted({_HINTS[k] for k in missing if k in _HINTS})
        raise FedscoreError(
            f"missing constant(s) {', '.join(missing)} for Theorem 1"
            + (f" ({'; '.join(hints)})" if hints else "")
            + "; give them in a YAML file with `fedscore bound --params`"
        )
    kwargs = {k: constants[k] for k in REQUIRED}
    notes = list(constants.get("notes", []))
    if constants.get("eta") is None:
        kwargs["eta"] = math.sqrt(float(kwargs["gamma_star"]) / (kwargs["S"] * kwargs["Q"]))
        notes.append(f"eta not given: Corollary 1's eta = sqrt(Gamma*/(S Q))={fmt(kwargs['eta'])}")
    else:
        kwargs["eta"] = constants["eta"]
    rest = {k: v for k, v in constants.items() if k not in kwargs}
    rest["notes"] = notes
    return kwargs, rest


def _needed(total: Callable[[float], float], target: float, start: float) -> float | None:
    """The smallest c >= start with total(c) >= target (total non-decreasing), or None."""
    lo, hi = start, max(start, 1e-12) * 2
    if total(lo) >= target:
        return lo
    while total(hi) < target:
        lo, hi = hi, hi * 2
        if hi > 1e30:
            return None
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if total(mid) >= target else (mid, hi)
    return hi


def suspects(kwargs: Mapping[str, float], bound: Bound, observed: float) -> list[str]:
    """Why an observed left-hand side can exceed Theorem 1's bound, most likely first: the
    hypotheses fail, L or sigma_1, sigma_2 are too small (with the values that would close
    the gap), F(theta_0) - F(theta_Q) is off, or the observation itself is inflated."""
    out = []
    if bound.violations:
        out.append(
            "Theorem 1's hypotheses fail (" + "; ".join(bound.violations) + "): the bound is "
            "not guaranteed for this run, so exceeding it contradicts nothing."
        )

    def at(**change: float) -> float:
        return theorem1(**{**kwargs, **change}).total

    L = float(kwargs["L"])
    c = _needed(lambda v: at(L=v), observed, L)
    if c is None:
        out.append("L: no value of L makes the bound reach the observation (w = 0 and "
                   "sigma_1 = sigma_2 = 0 leave no term that grows with L).")  # fmt: skip
    else:
        eta_max = theorem1(**{**kwargs, "L": c}).derived["eta_max"]
        out.append(
            f"L is a LOWER estimate (the largest gradient-difference ratio seen along the "
            f"trajectory; Assumption 1 needs the sup over all pairs). The bound reaches the "
            f"observation at L >= {fmt(c)} ({fmt(c / L) if L > 0 else 'inf'} x the estimate), "
            f"where eta <= {fmt(eta_max)} would be needed."
        )
    s1, s2 = float(kwargs["sigma1"]), float(kwargs["sigma2"])
    if s1 > 0 or s2 > 0:
        c = _needed(lambda k: at(sigma1=k * s1, sigma2=k * s2), observed, 1.0)
        if c is not None:
            out.append(
                f"sigma_1, sigma_2 are measured only at the observed checkpoints, whereas "
                f"Assumption 3 bounds every theta; the bound reaches the observation if both "
                f"are {fmt(c)} x larger (sigma1 >= {fmt(c * s1)}, sigma2 >= {fmt(c * s2)})."
            )
    gap = (observed - bound.total) * kwargs["eta"] * kwargs["S"] * kwargs["Q"] / 6
    out.append(
        f"F(theta_0) - F(theta_Q) = {fmt(kwargs['F0'] - kwargs['FQ'])} comes from finite-batch "
        f"loss estimates; the bound reaches the observation if it is {fmt(gap)} larger."
    )
    out.append(
        "The observed left-hand side averages ||grad F(theta_q)||^2 over the sampled rounds, "
        "with grad F a finite-batch mean: its noise inflates the squared norm, so the "
        "observation itself may be too large. w and Gamma* are exact for the run's masks."
    )
    return out


def _constants_table(
    kwargs: Mapping[str, float], rest: Mapping[str, Any], given: Mapping[str, Any]
) -> list[str]:
    sources = dict(rest.get("sources") or {k: "given" for k in given})
    if given.get("eta") is None:
        sources["eta"] = "Corollary 1's eta = sqrt(Gamma*/(S Q))"
    lines = ["| constant | value | how obtained |", "|---|---:|---|"]
    for k in (*REQUIRED, "eta", "observed_lhs", "sigma1_mean", "sigma2_mean"):
        value = kwargs.get(k, rest.get(k))
        if value is not None:
            lines.append(f"| {k} | {fmt(value)} | {sources.get(k, '')} |")
    return lines


def bound_report(constants: Mapping[str, Any], out_dir: Path, *, title: str = "") -> Path:
    """Write bound.md and bound_vs_Q.png into out_dir; returns the path of bound.md.

    constants: theorem1's keyword arguments (eta optional: Corollary 1's eta if absent),
    optionally observed_lhs and the extras of `constants_from_metrics`."""
    kwargs, rest = _split(constants)
    b1 = theorem1(**kwargs)
    c1 = corollary1(**{k: v for k, v in kwargs.items() if k != "eta"})
    observed = rest.get("observed_lhs")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_bound_vs_q(kwargs, observed, rest.get("lhs_curve"), out_dir / "bound_vs_Q.png")
    total = b1.total
    share = b1.terms[b1.dominant] / total if math.isfinite(total) and total > 0 else math.nan
    lines = [f"# Theorem 1{': ' + title if title else ''}", "", "## Verdict", ""]
    lines.append(f"Theorem 1's bound: **{fmt(total)}** (dominant term `{b1.dominant}`"
                 + (f", {100 * share:.1f}% of it)" if math.isfinite(share) else ")"))  # fmt: skip
    if observed is None:
        lines.append("\nNo observed left-hand side given (`observed_lhs`).")
    else:
        observed = float(observed)
        lines.append(f"\nObserved (1/Q) sum_q ||grad F(theta_q)||^2: **{fmt(observed)}**")
        if observed <= total:
            lines.append(f"\nThe observation sits BELOW the bound (observed / bound = "
                         f"{fmt(observed / total) if math.isfinite(total) else 0}).")  # fmt: skip
        else:
            ratio = fmt(observed / total)
            lines += ["", f"**The bound is VIOLATED by the observation** (observed / bound = "
                      f"{ratio}). Which estimate is likely too small:", ""]  # fmt: skip
            lines += [f"{i}. {s}" for i, s in enumerate(suspects(kwargs, b1, observed), 1)]
    lines.append("")
    if b1.violations:
        lines += ["Theorem 1's conditions VIOLATED:"] + [f"- {v}" for v in b1.violations]
    else:
        lines.append("Theorem 1's conditions: all met.")
    lines += ["", "## Constants", "", *_constants_table(kwargs, rest, constants)]
    lines += ["", "## Theorem 1", "", b1.to_markdown(), "## Corollary 1", "", c1.to_markdown()]
    lines += ["## Bound against Q", "", "![bound and terms against Q](bound_vs_Q.png)", "",
              "Theorem 1 at the given eta and Corollary 1 (eta = sqrt(Gamma*/(S Q))) for Q' "
              "rounds, every other constant (F(theta_0) - F(theta_Q) included) held at its "
              "value; the observed running mean of ||grad F(theta_q)||^2 is marked."]  # fmt: skip
    if rest["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in rest["notes"]]
    path = out_dir / "bound.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_bound_vs_q(
    kwargs: Mapping[str, float], observed: float | None, curve, path: Path
) -> Path:
    """Theorem 1's total and terms (at the run's eta) and Corollary 1's total against Q' on
    log axes; the observed left-hand side at the run's Q (and its running curve) marked."""
    plt = pyplot()
    Q = int(kwargs["Q"])
    grid = np.unique(np.round(np.logspace(0, math.log10(max(100 * Q, 1000)), 120)).astype(int))
    bounds = [theorem1(**{**kwargs, "Q": int(q)}) for q in grid]
    rest = {k: v for k, v in kwargs.items() if k not in ("eta", "Q")}
    cor = [corollary1(**rest, Q=int(q)).total for q in grid]

    def positive(values):
        v = np.asarray(values, dtype=float)
        return np.where(np.isfinite(v) & (v > 0), v, np.nan)

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    ax.plot(grid, positive([b.total for b in bounds]), "k-", lw=2, label="Theorem 1 (total)")
    ax.plot(grid, positive(cor), "k--", lw=1.5, label="Corollary 1 (total)")
    for name in bounds[0].terms:
        ax.plot(grid, positive([b.terms[name] for b in bounds]), lw=1, alpha=0.8, label=name)
    if curve:
        xs, ys = zip(*curve)
        ax.plot(xs, positive(ys), "o", ms=3, color="tab:red", label="observed running mean")
    if observed is not None and observed > 0:
        ax.plot([Q], [observed], "*", ms=14, color="tab:red", label="observed LHS at Q")
    ax.axvline(Q, color="grey", ls=":", lw=1)
    q_min = corollary1(**rest, Q=Q).derived["Q_min"]
    if 1 <= q_min <= grid[-1]:
        ax.axvline(q_min, color="k", ls="--", lw=0.8, alpha=0.5)
        ax.annotate("Corollary 1's Q_min", (q_min, 0.02), xycoords=("data", "axes fraction"),
                    fontsize=7, rotation=90, ha="right")  # fmt: skip
    if not np.isfinite(positive([b.total for b in bounds])).any():
        ax.text(0.5, 0.5, "Theorem 1's bound is +inf or <= 0 here", transform=ax.transAxes,
                ha="center")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Q (rounds)")
    ax.set_ylabel("(1/Q) sum_q ||grad F(theta_q)||^2")
    ax.set_title(f"Theorem 1 against Q (eta={fmt(kwargs['eta'])}, run Q={Q})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def load_params(path: Path) -> dict[str, float]:
    """Given constants from YAML: the keys of REQUIRED (numbers; N, S, Q whole), optionally
    eta (Corollary 1's if absent) and observed_lhs. sigma1, sigma2, w are standard
    deviations / ratios, not squares."""
    path = Path(path)
    if not path.is_file():
        raise FedscoreError(f"params file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise FedscoreError(f"params file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise FedscoreError(
            f"params file {str(path)!r} must be a mapping of constant: number, e.g. `L: 2.0`"
        )
    allowed = (*REQUIRED, *OPTIONAL)
    for key in raw:
        if key in _SQUARED:
            raise FedscoreError(
                f"params: unknown key {key!r}; give {_SQUARED[key]} (not its square), "
                f"e.g. {_SQUARED[key]}: {math.sqrt(abs(_number(key, raw[key]))):.4g}"
            )
        if key not in allowed:
            raise FedscoreError(
                f"params: unknown key {key!r}; allowed keys: {', '.join(allowed)}"
            )
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise FedscoreError(
            f"params: missing key(s) {', '.join(missing)} in {str(path)!r}; Theorem 1 needs "
            f"{', '.join(REQUIRED)} (eta and observed_lhs optional)"
        )
    out = {k: _number(k, v) for k, v in raw.items() if v is not None or k not in OPTIONAL}
    for k in INTEGERS:
        if not out[k].is_integer():
            raise FedscoreError(f"params: {k} must be a whole number (got {raw[k]!r})")
        out[k] = int(out[k])
    return out


def _number(key: str, value: Any) -> float:
    # PyYAML reads 1e-4 (no dot) as a string: accept any string float() reads.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise FedscoreError(f"params: {key} must be a number (got {value!r})")
    try:
        x = float(value)
    except ValueError:
        raise FedscoreError(f"params: {key} must be a number (got {value!r})") from None
    if not math.isfinite(x):
        raise FedscoreError(f"params: {key} must be finite (got {value!r})")
    return x


def run_bound(run_dir: Path | None, params: Path | None, out: Path | None) -> Path:
    """`fedscore bound RUN_DIR` or `fedscore bound --params file.yaml`: the bound.md path.

    RUN_DIR: constants measured by the run's theory estimator (metrics.jsonl), report in
    RUN_DIR unless `out`; params: given constants, report in runs/bound-<file stem> unless
    `out`."""
    if (run_dir is None) == (params is None):
        raise FedscoreError("give either a run folder (fedscore bound RUN_DIR) or "
                            "--params file.yaml, not both and not neither")  # fmt: skip
    if run_dir is not None:
        metrics = Path(run_dir) / "metrics.jsonl"  # a run folder's log (runs/folder.py)
        if not metrics.is_file():
            raise FedscoreError(f"{str(run_dir)!r} is not a run folder: no metrics.jsonl in it")
        constants = constants_from_metrics(read_jsonl(metrics))
        return bound_report(constants, Path(out or run_dir), title=f"run {Path(run_dir).name}")
    constants = load_params(Path(params))
    target = Path(out) if out is not None else Path("runs") / f"bound-{Path(params).stem}"
    return bound_report(constants, target, title=f"constants from {Path(params).name}")
