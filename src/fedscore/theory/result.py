"""What every bound of `fedscore.theory` returns, and the checks the bounds share.

`Bound` holds a bound split into its additive terms with the paper's conditions (met or
violated, each violation named with its numbers). The public helpers below are what
bounds.py (Theorem 1, Corollaries 1-2, Remark 1) and report.py build on:

- validation: `check_number` (one constant), `common_constants` (Theorem 1's set),
  `check_grid` (a grid of forward times against T, delta, K);
- conditions: `Checks` collects them; `check_w_gamma` (w < sqrt(2)/2, 1 <= Gamma* <= N),
  `check_q` (Corollary 1's bounds on Q), with `drift_sum` the sum they share;
- arithmetic and text: `div_or_inf` (a void bound is +inf), `ceil_count` (a Theta(.)
  recommendation as a count), `fmt` (numbers as the reports print them), `loss_notes`.

The condition keys `COND_*` are the conditions as the paper writes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedscore.errors import FedscoreError

SQRT2_2 = math.sqrt(2.0) / 2.0

# Keys of Bound.conditions: the conditions as the paper writes them.
COND_ETA_STEP = "eta <= 1/(27 S L)"
COND_ETA_DRIFT = "eta <= sqrt(1/(3(8 L^2 S^2 + 16 S^2 L^2 w^2/(1-2w^2))))"
COND_W = "w < sqrt(2)/2"
COND_GAMMA_MIN = "Gamma* >= 1"
COND_GAMMA_N = "Gamma* <= N"
COND_Q_STEP = "Q >= 729 Gamma* S L^2"
COND_Q_GS = "Q >= Gamma* S"
COND_Q_DRIFT = "Q >= 3 Gamma* (8 S L^2 + 16 S L^2 w^2/(1-2w^2))"
COND_T = "T >= 1"
COND_GRID = "gamma_k <= kappa min(1, T - t_{k+1})"
COND_DELTA = "delta < 1"
COND_T_DELTA = "T > delta"
COND_K = "K >= log(1/delta)"
COND_FORWARD = "d e^{-2T} <= eps^2"
COND_DSM = "C (T - delta) <= eps^2"
COND_SIGMA = "sigma1 = sigma2 = 0"


@dataclass(frozen=True)
class Bound:
    """A bound evaluated term by term.

    `terms[name]` is one additive term of the right-hand side, `formulas[name]` the paper's
    expression for it; `conditions[key]` says whether the paper's condition `key` holds and
    `violations` names each failed one with its numbers; `derived` holds auxiliary numbers
    (eta, thresholds), `recommended` Remark 1's choices of Q, T, K, kappa.
    """

    statement: str
    terms: dict[str, float]
    formulas: dict[str, str]
    conditions: dict[str, bool]
    violations: list[str]
    notes: list[str] = field(default_factory=list)
    derived: dict[str, float] = field(default_factory=dict)
    recommended: dict[str, float] = field(default_factory=dict)  # Q and K as int

    @property
    def total(self) -> float:
        """The right-hand side: the sum of the terms (+inf if any term is)."""
        values = list(self.terms.values())
        return math.inf if any(math.isinf(v) for v in values) else math.fsum(values)

    @property
    def dominant(self) -> str:
        """Name of the largest term."""
        return max(self.terms, key=self.terms.__getitem__)

    @property
    def eta(self) -> float | None:
        """The step size the bound is evaluated at (None for Remark 1)."""
        return self.derived.get("eta")

    def to_markdown(self) -> str:
        """The terms as a table (value and share of the total), then conditions and notes."""
        total = self.total
        lines = [f"**{self.statement}**", "", "| term | paper expression | value | share |"]
        lines.append("|---|---|---:|---:|")
        for name, value in self.terms.items():
            share = f"{100 * value / total:.1f}%" if math.isfinite(total) and total else "-"
            lines.append(f"| {name} | `{_cell(self.formulas[name])}` | {value:.4g} | {share} |")
        lines += [f"| **total** | | **{total:.4g}** | |", "", f"Dominant term: `{self.dominant}`"]
        if self.recommended:
            rec = ", ".join(f"{k} = {fmt(v)}" for k, v in self.recommended.items())
            lines += ["", f"Recommended: {rec}"]
        if self.derived:
            der = ", ".join(f"{k} = {fmt(v)}" for k, v in self.derived.items())
            lines += ["", f"Derived: {der}"]
        lines += ["", "Conditions:"]
        lines += [f"- [{'x' if ok else ' '}] `{key}`" for key, ok in self.conditions.items()]
        if self.violations:
            lines += ["", "Violated:"] + [f"- {v}" for v in self.violations]
        if self.notes:
            lines += ["", "Notes:"] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def fmt(x: float) -> str:
    """A number as reports print it: counts (Q, K, thresholds like 729 G S L^2) in full,
    everything else to 4 significant digits."""
    x = float(x)
    return str(int(x)) if math.isfinite(x) and x.is_integer() and abs(x) < 1e15 else f"{x:.4g}"


def check_number(name: str, value, *, minimum=0.0, strict=False, integer=False) -> float:
    """Validate one constant: a finite number >= minimum (> if strict), whole if `integer`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = float(value)  # numpy / 0-d torch scalars
        except (TypeError, ValueError):
            raise FedscoreError(f"{name} must be a number (got {value!r})") from None
    x = float(value)
    if not math.isfinite(x):
        raise FedscoreError(f"{name} must be finite (got {value!r})")
    if x < minimum or (strict and x == minimum):
        raise FedscoreError(f"{name} must be {'>' if strict else '>='} {minimum:g} (got {value!r})")
    if integer and not x.is_integer():
        raise FedscoreError(f"{name} must be a whole number (got {value!r})")
    return x


def div_or_inf(num: float, den: float) -> float:
    """num / den, or +inf when den <= 0."""
    # Every denominator here is positive where the paper's conditions hold; a zero or
    # negative one (Gamma* = 0, 1 - 2w^2 <= 0) means the bound is void, shown as +inf.
    return num / den if den > 0 else math.inf


class Checks:
    """The paper's conditions of one bound: key -> met, and a sentence per violated one."""

    def __init__(self) -> None:
        self.conditions: dict[str, bool] = {}
        self.violations: list[str] = []

    def need(self, key: str, ok: bool, why: str) -> None:
        self.conditions[key] = bool(ok)
        if not ok:
            self.violations.append(why)


def check_w_gamma(checks: Checks, w: float | None, gamma_star: float, N: float | None):
    """w < sqrt(2)/2 (Theorem 1; skipped if w is None), Gamma* >= 1 and Gamma* <= N (eq. 8)."""
    if w is not None:
        checks.need(
            COND_W,
            w < SQRT2_2,
            f"w={fmt(w)} >= sqrt(2)/2={fmt(SQRT2_2)}: 1-2w^2={fmt(1 - 2 * w * w)} <= 0, "
            "the pruning terms are unbounded",
        )
    checks.need(
        COND_GAMMA_MIN,
        gamma_star >= 1,
        f"Gamma*={fmt(gamma_star)} < 1: some coordinate was kept by no worker (eq. 8)",
    )
    if N is not None:
        checks.need(
            COND_GAMMA_N,
            gamma_star <= N,
            f"Gamma*={fmt(gamma_star)} > N={fmt(N)}: no coordinate is kept by more workers than N",
        )


def drift_sum(L: float, S: float, w: float) -> float:
    """8 L^2 S^2 + 16 S^2 L^2 w^2/(1-2w^2), the sum in H_0 >= 2/3 (Appendix D)."""
    one_m = 1.0 - 2.0 * w * w
    return 8 * L**2 * S**2 + div_or_inf(16 * S**2 * L**2 * w**2, one_m)


def check_q(checks: Checks, *, Q: float, gamma_star: float, S: float, L: float, w: float):
    """Corollary 1's Q conditions (Appendix E: eta = sqrt(Gamma*/(S Q)) meets Theorem 1's)."""
    q_step = 729 * gamma_star * S * L**2
    q_gs = gamma_star * S
    q_drift = 3 * gamma_star * div_or_inf(drift_sum(L, S, w), S)  # = 3 G (8 S L^2 + 16 S L^2 ...)
    checks.need(COND_Q_STEP, Q >= q_step, f"Q={fmt(Q)} < 729 Gamma* S L^2={fmt(q_step)}")
    checks.need(COND_Q_GS, Q >= q_gs, f"Q={fmt(Q)} < Gamma* S={fmt(q_gs)}")
    checks.need(
        COND_Q_DRIFT,
        Q >= q_drift,
        f"Q={fmt(Q)} < 3 Gamma* (8 S L^2 + 16 S L^2 w^2/(1-2w^2))={fmt(q_drift)}",
    )
    return {"Q_min": max(q_step, q_gs, q_drift)}


def common_constants(L, w, sigma1, sigma2, N, gamma_star, S, Q, F0, theta0_sq) -> tuple[float, ...]:
    """The validated (L, w, sigma1, sigma2, N, S, Q, gamma_star, F0, theta0_sq)."""
    counts = {"N": N, "S": S, "Q": Q}
    reals = {"L": L, "w": w, "sigma1": sigma1, "sigma2": sigma2}
    return (
        *(check_number(k, v) for k, v in reals.items()),
        *(check_number(k, v, minimum=1, integer=True) for k, v in counts.items()),
        check_number("gamma_star", gamma_star),
        check_number("F0", F0, minimum=-math.inf),
        check_number("theta0_sq", theta0_sq),
    )


def loss_notes(F0: float, FQ: float) -> list[str]:
    """A note when the optimisation term F(theta_0) - F(theta_Q) is negative."""
    if F0 < FQ:
        return [f"F(theta_0)={fmt(F0)} < F(theta_Q)={fmt(FQ)}: the optimisation term is negative"]
    return []


def check_grid(times, T, delta, K) -> tuple[list[float], float, float, float]:
    """Validate a (K+1,) grid of forward times T = s_0 > ... > s_K = delta against T, delta, K."""
    values = times.tolist() if hasattr(times, "tolist") else list(times)
    if len(values) < 2 or any(isinstance(v, list) for v in values):
        raise FedscoreError("times must be a 1-D grid of at least 2 forward times (T ... delta)")
    s = [check_number("times", v, strict=True) for v in values]
    if any(a <= b for a, b in zip(s[:-1], s[1:])):
        raise FedscoreError("times must be strictly decreasing forward times, T first, delta last")
    for name, given, actual in (("T", T, s[0]), ("delta", delta, s[-1]), ("K", K, len(s) - 1)):
        if given is not None and not math.isclose(float(given), actual, rel_tol=1e-9):
            raise FedscoreError(f"{name}={given!r} disagrees with the grid `times` ({actual:g})")
    return s, s[0], s[-1], float(len(s) - 1)


def ceil_count(x: float) -> int:
    """x rounded up to a count >= 1."""
    # Round a Theta(.) recommendation up to a count, forgiving float noise (16.000000001).
    return max(1, math.ceil(x * (1 - 1e-12)))
