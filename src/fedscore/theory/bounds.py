"""Theorem 1, Corollaries 1-2 and Remark 1 of the pruning paper, term by term (SPEC §4).

Every function returns a `Bound`: the right-hand side split into its additive terms, the
paper's conditions (met or not, each violation named with its numbers) and the auxiliary
numbers (step size, thresholds). Violated conditions are reported, never raised; only an
input that means nothing (negative, non-finite, a zero count) raises `FedscoreError`.

Conventions (the paper's symbols):
- `sigma1`, `sigma2` are the standard deviations of Assumption 3 (they enter squared);
- `w` is the pruning factor of Assumption 2, `||theta - theta*m||^2 <= w^2 ||theta||^2`
  (pass w, not w^2);
- `theta0_sq` = E||theta_0||^2, `F0` = F(theta_0), `FQ` = F(theta_Q);
- hidden constants of the paper's O(.) and Theta(.) are set to 1.

Where a condition that makes the bound meaningful fails (w >= sqrt(2)/2 makes 1 - 2w^2 <= 0;
Gamma* = 0 divides by zero) the affected terms, and so the total, are +inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fedscore.errors import FedscoreError
from fedscore.theory.result import (
    COND_DELTA,
    COND_DSM,
    COND_ETA_DRIFT,
    COND_ETA_STEP,
    COND_FORWARD,
    COND_GAMMA_MIN,
    COND_GAMMA_N,
    COND_GRID,
    COND_K,
    COND_Q_DRIFT,
    COND_Q_GS,
    COND_Q_STEP,
    COND_SIGMA,
    COND_T,
    COND_T_DELTA,
    COND_W,
    SQRT2_2,
    Bound,
    Checks,
    ceil_count,
    check_grid,
    check_number,
    check_q,
    check_w_gamma,
    common_constants,
    div_or_inf,
    drift_sum,
    fmt,
    loss_notes,
)

# The condition keys are re-exported: callers test `Bound.conditions` against them.
__all__ = ["Bound", "corollary1", "corollary2", "remark1", "theorem1", "COND_DELTA", "COND_DSM",
    "COND_ETA_DRIFT", "COND_ETA_STEP", "COND_FORWARD", "COND_GAMMA_MIN", "COND_GAMMA_N",
    "COND_GRID", "COND_K", "COND_Q_DRIFT", "COND_Q_GS", "COND_Q_STEP", "COND_SIGMA", "COND_T",
    "COND_T_DELTA", "COND_W", "SQRT2_2"]  # fmt: skip


_T1_FORMULAS = {
    "optimisation": "6 (F(theta_0) - F(theta_Q)) / (eta S Q)",
    "pruning_init": "(54 eta S L^3 w^4/(Q(1-2w^2)) + 18 L^2 w^4/(Q(1-2w^2))) E||theta_0||^2",
    "sgd_noise_coverage": "9 eta L N sigma_1^2 / (Gamma*)^2",
    "sgd_noise": "(9 eta S L/2 + 3/2) sigma_1^2",
    "heterogeneity": "(9 eta S L/2 + 3/2) sigma_2^2",
}
_C1_FORMULAS = {
    "optimisation": "6 (F(theta_0) - F(theta_Q)) / sqrt(Gamma* S Q)",
    "pruning_init": "(2 L^2 w^4/(Q(1-2w^2)) + 18 L^2 w^4/(Q(1-2w^2))) E||theta_0||^2",
    "sgd_noise_coverage": "9 L N sigma_1^2 / (Gamma* sqrt(Gamma* S Q))",
    "sgd_noise": "5/3 sigma_1^2",
    "heterogeneity": "5/3 sigma_2^2",
}


def theorem1(
    *, L: float, w: float, sigma1: float, sigma2: float, N: int, gamma_star: float, S: int,
    Q: int, eta: float, F0: float, FQ: float, theta0_sq: float,
) -> Bound:  # fmt: skip
    """Theorem 1 (Section 4; proof Appendix D): the bound on (1/Q) sum_q E||grad F(theta_q)||^2

        6 (F(theta_0) - F(theta_Q)) / (eta S Q)                                 optimisation
      + (54 eta S L^3 w^4/(Q(1-2w^2)) + 18 L^2 w^4/(Q(1-2w^2))) E||theta_0||^2  pruning_init
      + 9 eta L N sigma_1^2 / (Gamma*)^2                                  sgd_noise_coverage
      + (9 eta S L/2 + 3/2) sigma_1^2                                              sgd_noise
      + (9 eta S L/2 + 3/2) sigma_2^2                                          heterogeneity

    (the paper's last term (9 eta S L/2 + 3/2)(sigma_1^2 + sigma_2^2) is split by source).
    Conditions: eta <= min{1/(27 S L), sqrt(1/(3(8 L^2 S^2 + 16 S^2 L^2 w^2/(1-2w^2))))}
    (H_1 <= -eta S/6 and H_0 >= 2/3 in Appendix D), w in [0, sqrt(2)/2), Gamma* >= 1.
    The bound never falls below (3/2)(sigma_1^2 + sigma_2^2), whatever Q.
    """
    L, w, s1, s2, N, S, Q, gs, F0, th = common_constants(
        L, w, sigma1, sigma2, N, gamma_star, S, Q, F0, theta0_sq
    )
    eta = check_number("eta", eta, strict=True)
    FQ = check_number("FQ", FQ, minimum=-math.inf)
    checks = Checks()
    eta_step = div_or_inf(1.0, 27 * S * L)
    drift = drift_sum(L, S, w)
    eta_drift = 0.0 if math.isinf(drift) else div_or_inf(1.0, math.sqrt(3 * drift))
    checks.need(COND_ETA_STEP, eta <= eta_step, f"eta={fmt(eta)} > 1/(27 S L)={fmt(eta_step)}")
    checks.need(
        COND_ETA_DRIFT,
        eta <= eta_drift,
        f"eta={fmt(eta)} > sqrt(1/(3(8 L^2 S^2 + 16 S^2 L^2 w^2/(1-2w^2))))={fmt(eta_drift)}",
    )
    check_w_gamma(checks, w, gs, N)
    one_m = 1.0 - 2.0 * w * w
    var = 9 * eta * S * L / 2 + 1.5
    terms = {
        "optimisation": 6 * (F0 - FQ) / (eta * S * Q),
        "pruning_init": div_or_inf((54 * eta * S * L**3 + 18 * L**2) * w**4 * th, Q * one_m),
        "sgd_noise_coverage": div_or_inf(9 * eta * L * N * s1**2, gs**2),
        "sgd_noise": var * s1**2,
        "heterogeneity": var * s2**2,
    }
    derived = {
        "eta": eta,
        "eta_max": min(eta_step, eta_drift),
        "eta_max_step": eta_step,
        "eta_max_drift": eta_drift,
    }
    return Bound(
        "Theorem 1: (1/Q) sum_q E||grad F(theta_q)||^2 <=", terms, _T1_FORMULAS,
        checks.conditions, checks.violations, loss_notes(F0, FQ), derived,
    )  # fmt: skip


def corollary1(
    *, L: float, w: float, sigma1: float, sigma2: float, N: int, gamma_star: float, S: int,
    Q: int, F0: float, FQ: float, theta0_sq: float,
) -> Bound:  # fmt: skip
    """Corollary 1 (Section 4; proof Appendix E): Theorem 1 at eta = sqrt(Gamma*/(S Q)),

        6 (F(theta_0) - F(theta_Q)) / sqrt(Gamma* S Q)                          optimisation
      + (2 L^2 w^4/(Q(1-2w^2)) + 18 L^2 w^4/(Q(1-2w^2))) E||theta_0||^2         pruning_init
      + 9 L N sigma_1^2 / (Gamma* sqrt(Gamma* S Q))                       sgd_noise_coverage
      + 5/3 sigma_1^2  +  5/3 sigma_2^2                          sgd_noise, heterogeneity

    if Q >= max{729 Gamma* S L^2, Gamma* S, 3 Gamma*(8 S L^2 + 16 S L^2 w^2/(1-2w^2))} and
    w in [0, sqrt(2)/2). The first and third terms are Theorem 1's with eta substituted;
    the 2 L^2 w^4 and 5/3 coefficients are not substitutions but Appendix E's upper bound
    eta <= 1/(27 S L) (54 eta S L^3 <= 2 L^2, 9 eta S L/2 <= 1/6). Printed as in the paper;
    `derived["theorem1_at_eta"]` is Theorem 1 with eta substituted in every term, which the
    printed bound dominates whenever the Q conditions hold.
    """
    L, w, s1, s2, N, S, Q, gs, F0, th = common_constants(
        L, w, sigma1, sigma2, N, gamma_star, S, Q, F0, theta0_sq
    )
    FQ = check_number("FQ", FQ, minimum=-math.inf)
    eta = math.sqrt(gs / (S * Q))
    checks = Checks()
    derived = {"eta": eta, **check_q(checks, Q=Q, gamma_star=gs, S=S, L=L, w=w)}
    check_w_gamma(checks, w, gs, N)
    root = math.sqrt(gs * S * Q)
    one_m = 1.0 - 2.0 * w * w
    terms = {
        "optimisation": div_or_inf(6 * (F0 - FQ), root),
        "pruning_init": div_or_inf((2 + 18) * L**2 * w**4 * th, Q * one_m),
        "sgd_noise_coverage": div_or_inf(9 * L * N * s1**2, gs * root),
        "sgd_noise": 5 / 3 * s1**2,
        "heterogeneity": 5 / 3 * s2**2,
    }
    if eta > 0:
        derived["theorem1_at_eta"] = theorem1(
            L=L, w=w, sigma1=s1, sigma2=s2, N=N, gamma_star=gs, S=S, Q=Q, eta=eta,
            F0=F0, FQ=FQ, theta0_sq=th,
        ).total  # fmt: skip
    return Bound(
        "Corollary 1: (1/Q) sum_q E||grad F(theta_q)||^2 <= (eta = sqrt(Gamma*/(S Q)))",
        terms, _C1_FORMULAS, checks.conditions, checks.violations, loss_notes(F0, FQ), derived,
    )  # fmt: skip


def corollary2(
    *, L: float, w: float, sigma1: float, sigma2: float, N: int, gamma_star: float, S: int,
    Q: int, F0: float, theta0_sq: float, Fn0_minus_F0: float, theta_dist: float, d: int,
    C: float, T: float | None = None, delta: float | None = None, K: int | None = None,
    kappa: float | None = None, times: Sequence[float] | None = None,
) -> Bound:  # fmt: skip
    """Corollary 2 (Section 4; proof sketch §5.2 and Appendix F, eqs. 15, 18, 21, 41):

      KL(q_{n,delta} || p_{n,t_K}) = O(F(theta_0))                                init_loss
      + (sqrt(G S Q) L^2 w^4/(3Q(1-2w^2)) + 3 sqrt(G S Q) L^2 w^4/(Q(1-2w^2))) E||theta_0||^2
                                                                                pruning_init
      + 3 L N sigma_1^2 / (2 Gamma*)                                      sgd_noise_coverage
      + 5 sqrt(Gamma* S Q)/18 (sigma_1^2 + sigma_2^2)            sgd_noise, heterogeneity
      + |F_n(theta_0) - F(theta_0)|                                       local_global_init
      + sigma_2 ||theta_Q - theta_0||                                    local_global_drift
      + C (T - delta)                                                               dsm_gap
      + kappa d T  +  kappa^2 d K                          discretisation_T, discretisation_K
      + d e^{-2T}                                                       forward_convergence

    with G = Gamma*, O(.) constants 1 (so init_loss = F0; Benton et al. 2024 Theorem 1 also
    hides universal constants). The first four lines are Corollary 1 times sqrt(G S Q)/6
    (eq. 15); note the variance line then grows with Q. Conditions: T >= 1, gamma_k <=
    kappa min(1, T - t_{k+1}) (checked when the grid `times` of forward times is given;
    kappa defaults to the smallest that holds), and Corollary 1's Q and w conditions.
    Assumption 4 (Cov(q_{n,0}) = I) is assumed, not checked. C is eq. 21's constant; since
    the denoising identity (eq. 20) has C_t = E||grad log q_t||^2 - d/(1-e^{-2t}) <= 0 by
    Jensen, C = 0 is already valid there, though the statement asks for C > 0.
    """
    L, w, s1, s2, N, S, Q, gs, F0, th = common_constants(
        L, w, sigma1, sigma2, N, gamma_star, S, Q, F0, theta0_sq
    )
    gap = abs(check_number("Fn0_minus_F0", Fn0_minus_F0, minimum=-math.inf))
    dist = check_number("theta_dist", theta_dist)
    d = check_number("d", d, minimum=1, integer=True)
    C = check_number("C", C)
    checks = Checks()
    notes: list[str] = []
    derived: dict[str, float] = {}
    if times is not None:
        s, T, delta, K = check_grid(times, T, delta, K)
        ratios = [(a - b) / min(1.0, b) for a, b in zip(s[:-1], s[1:])]
        k_bind = max(range(len(ratios)), key=ratios.__getitem__)
        derived["kappa_min"] = ratios[k_bind]
        if kappa is None:
            kappa = ratios[k_bind]
            notes.append(f"kappa not given: the grid's smallest valid kappa {fmt(kappa)} is used")
    for name, value in (("T", T), ("delta", delta), ("K", K), ("kappa", kappa)):
        if value is None:
            raise FedscoreError(f"{name} is required (or pass the grid `times` to derive it)")
    T = check_number("T", T, strict=True)
    delta = check_number("delta", delta, strict=True)
    K = check_number("K", K, minimum=1, integer=True)
    kappa = check_number("kappa", kappa, strict=True)
    if delta >= T:
        raise FedscoreError(f"delta must be smaller than T (got delta={delta:g}, T={T:g})")
    checks.need(COND_T, T >= 1, f"T={fmt(T)} < 1 (Corollary 2 and Benton et al. need T >= 1)")
    if times is not None:
        # kappa >= max_k gamma_k / min(1, s_{k+1}) is the grid condition for every k at once.
        checks.need(
            COND_GRID,
            kappa >= derived["kappa_min"],
            f"gamma_{k_bind}={fmt(s[k_bind] - s[k_bind + 1])} > kappa min(1, T - t_{k_bind + 1})"
            f"={fmt(kappa * min(1.0, s[k_bind + 1]))} (kappa={fmt(kappa)}; the grid needs "
            f"kappa >= {fmt(derived['kappa_min'])})",
        )
    else:
        notes.append(f"grid not given: `{COND_GRID}` not checked")
    derived["eta"] = math.sqrt(gs / (S * Q))
    derived.update(check_q(checks, Q=Q, gamma_star=gs, S=S, L=L, w=w))
    check_w_gamma(checks, w, gs, N)
    root = math.sqrt(gs * S * Q)
    one_m = 1.0 - 2.0 * w * w
    terms = {
        "init_loss": F0,
        "pruning_init": div_or_inf((1 / 3 + 3) * root * L**2 * w**4 * th, Q * one_m),
        "sgd_noise_coverage": div_or_inf(3 * L * N * s1**2, 2 * gs),
        "sgd_noise": 5 * root / 18 * s1**2,
        "heterogeneity": 5 * root / 18 * s2**2,
        "local_global_init": gap,
        "local_global_drift": s2 * dist,
        "dsm_gap": C * (T - delta),
        "discretisation_T": kappa * d * T,
        "discretisation_K": kappa**2 * d * K,
        "forward_convergence": d * math.exp(-2 * T),
    }
    derived.update({"T": T, "delta": delta, "K": K, "kappa": kappa})
    formulas = {**_KL_FORMULAS, "init_loss": "F(theta_0)   [O(F(theta_0)), constant 1]"}
    return Bound(
        "Corollary 2: KL(q_{n,delta} || p_{n,t_K}) = O(...)", terms, formulas,
        checks.conditions, checks.violations, notes, derived,
    )  # fmt: skip


_KL_FORMULAS = {
    "pruning_init": "(sqrt(Gamma* S Q) L^2 w^4/(3Q(1-2w^2)) "
    "+ 3 sqrt(Gamma* S Q) L^2 w^4/(Q(1-2w^2))) E||theta_0||^2",
    "sgd_noise_coverage": "3 L N sigma_1^2 / (2 Gamma*)",
    "sgd_noise": "5 sqrt(Gamma* S Q)/18 sigma_1^2",
    "heterogeneity": "5 sqrt(Gamma* S Q)/18 sigma_2^2",
    "local_global_init": "|F_n(theta_0) - F(theta_0)|",
    "local_global_drift": "sigma_2 ||theta_Q - theta_0||",
    "dsm_gap": "C (T - delta)",
    "discretisation_T": "kappa d T",
    "discretisation_K": "kappa^2 d K",
    "forward_convergence": "d e^{-2T}",
}


def remark1(
    *, epsilon: float, d: int, delta: float, gamma_star: float, S: int, C: float = 0.0,
    T: float | None = None, L: float | None = None, w: float | None = None,
    theta0_sq: float | None = None, N: int | None = None, sigma1: float = 0.0,
    sigma2: float = 0.0,
) -> Bound:  # fmt: skip
    """Remark 1 (Section 4): Q, T, K, kappa that make Corollary 2's KL bound O(eps^2),

      Q = Gamma* S / eps^4,   T = min{1/2 log(d/eps^2), eps^2/C},
      K = d (T + log(1/delta))^2 / eps^2,   kappa = (T + log(1/delta)) / K,

    with Theta(.) constants 1, Q and K rounded up (`recommended`). `T` may be given to
    override the formula (K and kappa follow it). The terms are Remark 1's rewrite of the
    KL bound at these values: eps^2 (which absorbs O(F(theta_0)) and the local-global
    terms, as the Remark does), pruning_init (when L, w, theta0_sq are given: then <=
    (10/3) eps^2 L^2 w^4 E||theta_0||^2/(1-2w^2)), dsm_gap C (T - delta), discretisation_T
    kappa d T (<= eps^2), discretisation_K kappa^2 d K (<= eps^2), forward_convergence
    d e^{-2T}; and, if sigma1 or sigma2 is not 0, Corollary 2's variance terms, which grow
    as 1/eps^2 at this Q: hence the Remark's sigma_1 = sigma_2 = 0.

    The printed Remark writes sqrt(Gamma* S Q L^2 w^4) where Corollary 2, eq. 15 and eq. 37
    all have sqrt(Gamma* S Q) L^2 w^4; the corollary's form is used and the printed one is
    given in `derived["pruning_init_remark_as_printed"]`.

    d e^{-2T} <= eps^2 needs T >= 1/2 log(d/eps^2) while C (T - delta) <= eps^2 needs
    T <= eps^2/C + delta, so the min makes both hold only when 1/2 log(d/eps^2) <=
    eps^2/C; otherwise `d e^{-2T} <= eps^2` is reported violated, as is `T >= 1` (which
    Corollary 2 needs) when the min falls below 1. C = 0 (valid: see `corollary2`) gives
    T = 1/2 log(d/eps^2).
    """
    eps = check_number("epsilon", epsilon, strict=True)
    d = check_number("d", d, minimum=1, integer=True)
    delta = check_number("delta", delta, strict=True)
    gs = check_number("gamma_star", gamma_star)
    S = check_number("S", S, minimum=1, integer=True)
    C = check_number("C", C)
    s1, s2 = check_number("sigma1", sigma1), check_number("sigma2", sigma2)
    opt = {"L": L, "w": w, "theta0_sq": theta0_sq}
    L, w, th = (None if v is None else check_number(k, v) for k, v in opt.items())
    N = None if N is None else check_number("N", N, minimum=1, integer=True)
    eps2 = eps * eps
    t_forward = 0.5 * math.log(d / eps2)  # d e^{-2T} = eps^2
    t_dsm = eps2 / C if C > 0 else math.inf  # C T = eps^2
    notes = ["Theta(.) constants are 1; Q and K are rounded up"]
    if T is None:
        if eps2 >= d:
            raise FedscoreError(
                f"epsilon^2={eps2:g} >= d={d:g}: T = 1/2 log(d/epsilon^2) would be <= 0; "
                "choose epsilon < sqrt(d) or pass T"
            )
        T = min(t_forward, t_dsm)
        if t_dsm < t_forward:
            notes.append(
                f"the min picks T = eps^2/C={fmt(t_dsm)} < 1/2 log(d/eps^2)={fmt(t_forward)}: "
                "then d e^{-2T} > eps^2 (no T keeps both terms below eps^2)"
            )
    else:
        T = check_number("T", T, strict=True)
        if T <= delta:
            raise FedscoreError(f"T must be larger than delta (got T={T:g}, delta={delta:g})")
    log_d = math.log(1.0 / delta)
    Q = float(ceil_count(gs * S / eps2**2))
    K = float(ceil_count(d * (T + log_d) ** 2 / eps2))
    kappa = (T + log_d) / K
    checks = Checks()
    checks.need(COND_T, T >= 1, f"T={fmt(T)} < 1 (Corollary 2 needs T >= 1)")
    checks.need(COND_DELTA, delta < 1, f"delta={fmt(delta)} >= 1")
    checks.need(COND_T_DELTA, T > delta, f"T={fmt(T)} <= delta={fmt(delta)}")
    checks.need(COND_K, K >= log_d, f"K={fmt(K)} < log(1/delta)={fmt(log_d)}")
    # Compared through T, the form in which the condition is exact at its threshold.
    checks.need(
        COND_FORWARD,
        T >= t_forward,
        f"d e^(-2T)={fmt(d * math.exp(-2 * T))} > eps^2={fmt(eps2)} "
        f"(T={fmt(T)} < 1/2 log(d/eps^2)={fmt(t_forward)})",
    )
    dsm = C * (T - delta)
    checks.need(COND_DSM, dsm <= eps2, f"C (T - delta)={fmt(dsm)} > eps^2={fmt(eps2)}")
    checks.need(
        COND_SIGMA,
        s1 == 0 and s2 == 0,
        f"sigma1={fmt(s1)}, sigma2={fmt(s2)}: Remark 1 assumes both 0; the variance terms "
        "5 sqrt(Gamma* S Q)/18 sigma^2 grow as 1/eps^2 at its Q",
    )
    derived = {"T_forward": t_forward, "T_dsm": t_dsm}
    terms = {"epsilon_sq": eps2}
    formulas = {"epsilon_sq": "eps^2   [absorbs O(F(theta_0)) and the local-global terms]"}
    root = math.sqrt(gs * S * Q)
    if L is not None and w is not None:
        derived.update(check_q(checks, Q=Q, gamma_star=gs, S=S, L=L, w=w))
        check_w_gamma(checks, w, gs, N)
        if th is not None:
            one_m = 1.0 - 2.0 * w * w
            terms["pruning_init"] = div_or_inf((1 / 3 + 3) * root * L**2 * w**4 * th, Q * one_m)
            derived["pruning_init_remark_as_printed"] = div_or_inf(
                (1 / 3 + 3) * math.sqrt(root**2 * L**2 * w**4) * th, Q * one_m
            )
    else:
        checks.need(COND_Q_GS, Q >= gs * S, f"Q={fmt(Q)} < Gamma* S={fmt(gs * S)}")
        check_w_gamma(checks, None, gs, N)
    if "pruning_init" not in terms:
        notes.append("L, w and theta0_sq not all given: the pruning term is not evaluated")
    if s1 > 0:
        if L is None or N is None:
            raise FedscoreError("L and N are needed when sigma1 > 0 (term 3 L N sigma_1^2/(2G))")
        terms["sgd_noise_coverage"] = div_or_inf(3 * L * N * s1**2, 2 * gs)
        terms["sgd_noise"] = 5 * root / 18 * s1**2
    if s2 > 0:
        terms["heterogeneity"] = 5 * root / 18 * s2**2
    terms.update(
        {
            "dsm_gap": dsm,
            "discretisation_T": kappa * d * T,
            "discretisation_K": kappa**2 * d * K,
            "forward_convergence": d * math.exp(-2 * T),
        }
    )
    formulas.update({k: v for k, v in _KL_FORMULAS.items() if k in terms})
    return Bound(
        f"Remark 1: KL(q_{{n,delta}} || p_{{n,t_K}}) = O(eps^2) for eps={fmt(eps)}", terms,
        formulas, checks.conditions, checks.violations, notes, derived,
        {"Q": int(Q), "T": T, "K": int(K), "kappa": kappa},
    )  # fmt: skip
