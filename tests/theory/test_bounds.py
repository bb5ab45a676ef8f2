"""The pruning paper's bounds term by term: hand calculations, thresholds, Remark 1's scaling.

Fixed constants throughout (unless a test varies one): L = 2, w = 0.3, sigma1 = 0.5,
sigma2 = 0.4, N = 10, Gamma* = 6, S = 2, F(theta_0) = 3, F(theta_Q) = 1,
E||theta_0||^2 = 50. So 1 - 2w^2 = 0.82, w^4 = 0.0081, sigma1^2 = 0.25, sigma2^2 = 0.16.
"""

import math
import re

import pytest
import torch

from fedscore import diffusion, theory
from fedscore.errors import FedscoreError
from fedscore.theory import bounds as B

BASE = dict(
    L=2.0, w=0.3, sigma1=0.5, sigma2=0.4, N=10, gamma_star=6, S=2, F0=3.0, theta0_sq=50.0
)  # fmt: skip
REL = 1e-12


def t1(**kw):
    return theory.theorem1(**{**BASE, "FQ": 1.0, "Q": 300, "eta": 1e-3, **kw})


def c1(**kw):
    return theory.corollary1(**{**BASE, "FQ": 1.0, "Q": 40000, **kw})


def c2(**kw):
    extra = dict(Q=40000, d=2, T=5.0, delta=1e-3, K=100, kappa=0.1, C=0.2)
    return theory.corollary2(**{**BASE, **extra, "Fn0_minus_F0": -0.3, "theta_dist": 4.0, **kw})


def r1(**kw):
    base = {"epsilon": 0.5, "d": 100, "delta": 1e-3, "gamma_star": 6, "S": 2}
    return theory.remark1(**{**base, **kw})


# ---------------------------------------------------------------- Theorem 1


def test_theorem1_each_term_matches_hand_calculation():
    b = t1()
    # 6 (F0 - FQ)/(eta S Q) = 6 * 2 / (0.001 * 2 * 300) = 12 / 0.6
    assert b.terms["optimisation"] == pytest.approx(20.0, rel=REL)
    # (54 eta S L^3 + 18 L^2) w^4 theta0 / (Q (1-2w^2)) = (0.864 + 72) * 0.0081 * 50 / 246
    assert b.terms["pruning_init"] == pytest.approx(72.864 * 0.405 / 246, rel=REL)
    # 9 eta L N sigma1^2 / Gamma*^2 = 9 * 0.001 * 2 * 10 * 0.25 / 36
    assert b.terms["sgd_noise_coverage"] == pytest.approx(0.045 / 36, rel=REL)
    # (9 eta S L / 2 + 3/2) sigma^2 = (0.018 + 1.5) * 0.25 and * 0.16
    assert b.terms["sgd_noise"] == pytest.approx(1.518 * 0.25, rel=REL)
    assert b.terms["heterogeneity"] == pytest.approx(1.518 * 0.16, rel=REL)
    assert b.total == pytest.approx(20 + 72.864 * 0.405 / 246 + 0.045 / 36 + 1.518 * 0.41)
    assert b.dominant == "optimisation"
    assert b.eta == 1e-3
    assert b.violations == [] and all(b.conditions.values())
    assert set(b.terms) == set(b.formulas)


def test_theorem1_eta_step_condition_flips_at_1_over_27SL():
    thr = 1 / (27 * 2 * 2)  # = 1/108
    assert t1(eta=thr).conditions[B.COND_ETA_STEP]
    assert t1(eta=thr * (1 - 1e-12)).conditions[B.COND_ETA_STEP]
    above = t1(eta=thr * (1 + 1e-12))
    assert not above.conditions[B.COND_ETA_STEP]
    assert any("1/(27 S L)" in v for v in above.violations)
    assert above.derived["eta_max_step"] == pytest.approx(thr, rel=REL)


def test_theorem1_eta_drift_condition_flips_at_its_threshold():
    # 8 L^2 S^2 + 16 S^2 L^2 w^2/(1-2w^2) = 128 + 23.04 / 0.82
    thr = 1 / math.sqrt(3 * (128 + 23.04 / 0.82))  # = 0.0462; each condition has its own key
    assert t1(eta=thr * (1 - 1e-12)).conditions[B.COND_ETA_DRIFT]
    above = t1(eta=thr * (1 + 1e-12))
    assert not above.conditions[B.COND_ETA_DRIFT]
    assert above.derived["eta_max_drift"] == pytest.approx(thr, rel=1e-12)
    assert above.derived["eta_max"] == pytest.approx(1 / 108, rel=1e-12)  # the smaller one


def test_theorem1_violation_is_named_with_its_numbers():
    b = t1(eta=0.01)
    assert b.violations == ["eta=0.01 > 1/(27 S L)=0.009259"]
    assert b.conditions[B.COND_ETA_STEP] is False
    assert b.total == pytest.approx(sum(b.terms.values()))  # reported, not raised


def test_w_condition_flips_at_sqrt2_over_2_and_voids_the_bound():
    below = t1(w=B.SQRT2_2 * (1 - 1e-12))
    assert below.conditions[B.COND_W] and math.isfinite(below.total)
    at = t1(w=B.SQRT2_2)
    assert not at.conditions[B.COND_W]
    assert at.terms["pruning_init"] == math.inf and at.total == math.inf
    above = t1(w=0.8)
    assert above.total == math.inf and above.dominant == "pruning_init"
    assert any(v.startswith("w=0.8 >= sqrt(2)/2") for v in above.violations)
    # no eta satisfies the H_0 condition once 1 - 2w^2 <= 0
    assert not above.conditions[B.COND_ETA_DRIFT]


def test_gamma_star_conditions():
    assert t1(gamma_star=1).conditions[B.COND_GAMMA_MIN]
    zero = t1(gamma_star=0)
    assert not zero.conditions[B.COND_GAMMA_MIN]
    assert zero.terms["sgd_noise_coverage"] == math.inf and zero.total == math.inf
    assert "Gamma*=0 < 1" in zero.violations[0]
    assert t1(gamma_star=10).conditions[B.COND_GAMMA_N]
    over = t1(gamma_star=11)
    assert not over.conditions[B.COND_GAMMA_N]
    assert any("Gamma*=11 > N=10" in v for v in over.violations)


def test_dominant_follows_the_largest_term():
    assert t1(sigma1=10.0).dominant == "sgd_noise"
    assert t1(sigma2=10.0).dominant == "heterogeneity"


def test_loss_increase_is_noted_not_hidden():
    b = t1(FQ=4.0)
    assert b.terms["optimisation"] == pytest.approx(6 * -1 / 0.6)
    assert any("negative" in n for n in b.notes)


@pytest.mark.parametrize(
    "field,value",
    [
        ("L", -1.0),
        ("w", -0.1),
        ("sigma1", math.nan),
        ("sigma2", math.inf),
        ("N", 0),
        ("N", 2.5),
        ("S", 0),
        ("Q", 0),
        ("eta", 0.0),
        ("eta", -1e-3),
        ("gamma_star", -1),
        ("theta0_sq", -1.0),
        ("F0", math.nan),
        ("L", "two"),
    ],
)
def test_theorem1_meaningless_input_raises_naming_the_field(field, value):
    with pytest.raises(FedscoreError, match=field):
        t1(**{field: value})


# ---------------------------------------------------------------- Corollary 1


def test_corollary1_each_term_matches_hand_calculation():
    b = c1()
    root = math.sqrt(6 * 2 * 40000)  # sqrt(Gamma* S Q) = sqrt(480000)
    assert b.eta == pytest.approx(math.sqrt(6 / 80000), rel=REL)
    assert b.terms["optimisation"] == pytest.approx(12 / root, rel=REL)
    # (2 L^2 + 18 L^2) w^4 theta0 / (Q (1-2w^2)) = 80 * 0.405 / 32800
    assert b.terms["pruning_init"] == pytest.approx(32.4 / 32800, rel=REL)
    # 9 L N sigma1^2 / (Gamma* sqrt(Gamma* S Q)) = 45 / (6 root)
    assert b.terms["sgd_noise_coverage"] == pytest.approx(45 / (6 * root), rel=REL)
    assert b.terms["sgd_noise"] == pytest.approx(5 / 3 * 0.25, rel=REL)
    assert b.terms["heterogeneity"] == pytest.approx(5 / 3 * 0.16, rel=REL)
    assert b.violations == []
    # Q_min = max{729 * 6 * 2 * 4, 12, 18 (64 + 11.52/0.82)} = 34992
    assert b.derived["Q_min"] == pytest.approx(34992, rel=REL)


@pytest.mark.parametrize(
    "key,threshold",
    [
        (B.COND_Q_STEP, 729 * 6 * 2 * 4),  # 729 Gamma* S L^2 = 34992
        (B.COND_Q_GS, 6 * 2),  # Gamma* S = 12
    ],
)
def test_corollary1_integer_q_conditions_flip_exactly_at_threshold(key, threshold):
    assert c1(Q=threshold).conditions[key]
    below = c1(Q=threshold - 1)
    assert not below.conditions[key]
    assert any(v.startswith(f"Q={threshold - 1} < ") for v in below.violations)


def test_corollary1_drift_q_condition_flips_at_its_threshold():
    thr = 3 * 6 * (8 * 2 * 4 + 16 * 2 * 4 * 0.09 / 0.82)  # = 1404.878...
    assert math.floor(thr) == 1404
    assert c1(Q=1405).conditions[B.COND_Q_DRIFT]
    assert not c1(Q=1404).conditions[B.COND_Q_DRIFT]


def test_corollary1_q_conditions_are_theorem1_eta_conditions_at_its_eta():
    # Appendix E: eta = sqrt(G/(S Q)) <= 1/(27 S L) <=> Q >= 729 G S L^2, and likewise H_0.
    for Q in (100, 1000, 20000, 34000, 36000, 10**6):
        cor = c1(Q=Q)
        thm = t1(Q=Q, eta=cor.eta)
        assert cor.conditions[B.COND_Q_STEP] == thm.conditions[B.COND_ETA_STEP]
        assert cor.conditions[B.COND_Q_DRIFT] == thm.conditions[B.COND_ETA_DRIFT]


def test_corollary1_as_printed_dominates_theorem1_with_eta_substituted():
    # The optimisation and coverage terms are substitutions; the 2 L^2 and 5/3 coefficients
    # use eta <= 1/(27 S L), so the printed bound is >= Theorem 1 at that eta when Q is
    # large enough.
    for Q in (34992, 40000, 10**6):
        cor = c1(Q=Q)
        thm = t1(Q=Q, eta=cor.eta)
        assert cor.terms["optimisation"] == pytest.approx(thm.terms["optimisation"], rel=1e-12)
        cov = thm.terms["sgd_noise_coverage"]
        assert cor.terms["sgd_noise_coverage"] == pytest.approx(cov, rel=1e-12)
        assert cor.terms["pruning_init"] >= thm.terms["pruning_init"]
        assert cor.terms["sgd_noise"] >= thm.terms["sgd_noise"]
        assert cor.total >= thm.total
        assert cor.derived["theorem1_at_eta"] == pytest.approx(thm.total, rel=1e-12)
    # exactly at Q = 729 G S L^2, eta = 1/(27 S L): the printed bound is Theorem 1 itself
    cor = c1(Q=34992)
    assert cor.total == pytest.approx(cor.derived["theorem1_at_eta"], rel=1e-9)


# ---------------------------------------------------------------- Corollary 2


def test_corollary2_each_term_matches_hand_calculation():
    b = c2()
    root = math.sqrt(480000)
    expected = {
        "init_loss": 3.0,
        # (1/3 + 3) sqrt(G S Q) L^2 w^4 theta0 / (Q (1-2w^2)) = (10/3) root * 1.62 / 32800
        "pruning_init": 10 / 3 * root * 1.62 / 32800,
        "sgd_noise_coverage": 15 / 12,  # 3 L N sigma1^2 / (2 G) = 3*2*10*0.25 / 12
        "sgd_noise": 5 * root / 18 * 0.25,
        "heterogeneity": 5 * root / 18 * 0.16,
        "local_global_init": 0.3,  # |F_n(theta_0) - F(theta_0)|
        "local_global_drift": 1.6,  # sigma2 ||theta_Q - theta_0|| = 0.4 * 4
        "dsm_gap": 0.2 * 4.999,  # C (T - delta)
        "discretisation_T": 1.0,  # kappa d T = 0.1 * 2 * 5
        "discretisation_K": 2.0,  # kappa^2 d K = 0.01 * 2 * 100
        "forward_convergence": 2 * math.exp(-10),  # d e^{-2T}
    }
    assert b.terms.keys() == expected.keys()
    for name, value in expected.items():
        assert b.terms[name] == pytest.approx(value, rel=REL), name
    assert b.total == pytest.approx(sum(expected.values()), rel=REL)
    assert b.dominant == "sgd_noise"
    assert any("not checked" in n for n in b.notes)  # no grid given


def test_corollary2_training_terms_are_corollary1_times_sqrt_GSQ_over_6():
    # eq. 15: F(theta_Q) <= F(theta_0) + sqrt(G S Q)/6 * (Corollary 1's other terms)
    k, c = c2(), c1()
    scale = math.sqrt(480000) / 6
    for name in ("pruning_init", "sgd_noise_coverage", "sgd_noise", "heterogeneity"):
        assert k.terms[name] == pytest.approx(c.terms[name] * scale, rel=1e-12), name


def test_corollary2_T_condition_flips_at_1():
    assert c2(T=1.0).conditions[B.COND_T]
    below = c2(T=1.0 - 1e-12)
    assert not below.conditions[B.COND_T]
    assert any(v.startswith("T=1 < 1") for v in below.violations)


def test_corollary2_grid_condition_flips_at_smallest_kappa():
    times = [3.0, 2.0, 1.0, 0.5, 0.1]
    # gamma = (1, 1, 0.5, 0.4), min(1, s_{k+1}) = (1, 1, 0.5, 0.1): ratios 1, 1, 1, 4
    grid = dict(times=times, T=None, delta=None, K=None)
    ok = c2(kappa=4.0, **grid)
    assert ok.conditions[B.COND_GRID] and ok.derived["kappa_min"] == pytest.approx(4.0)
    assert (ok.derived["T"], ok.derived["delta"], ok.derived["K"]) == (3.0, 0.1, 4.0)
    bad = c2(kappa=4.0 * (1 - 1e-12), **grid)
    assert not bad.conditions[B.COND_GRID]
    assert any("gamma_3=0.4" in v and "kappa >= 4" in v for v in bad.violations)


def test_corollary2_reads_a_tensor_grid_and_agrees_with_diffusion_kappa():
    times = diffusion.time_grid("exponential", steps=50, T=5.0, delta=1e-3)
    b = c2(times=times, T=5.0, delta=1e-3, K=50, kappa=None)
    assert b.derived["kappa"] == pytest.approx(diffusion.kappa(times), rel=1e-12)
    assert b.conditions[B.COND_GRID]


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(d=0), "d"),
        (dict(C=-1.0), "C"),
        (dict(kappa=0.0), "kappa"),
        (dict(delta=0.0), "delta"),
        (dict(delta=6.0), "delta"),
        (dict(T=None), "T"),
        (dict(theta_dist=-1.0), "theta_dist"),
        (dict(times=[3.0, 2.0, 1.0], T=None, delta=None, K=5), "K"),
        (dict(times=[3.0, 1.0, 2.0], T=None, delta=None, K=None), "times"),
    ],
)
def test_corollary2_meaningless_input_raises(kw, field):
    with pytest.raises(FedscoreError, match=field):
        c2(**kw)


# ---------------------------------------------------------------- Remark 1


def test_remark1_recommendations_match_hand_calculation():
    b = r1()
    T = 0.5 * math.log(100 / 0.25)  # 1/2 log(d/eps^2), C = 0
    l = math.log(1000)  # noqa: E741  log(1/delta)
    K = math.ceil(100 * (T + l) ** 2 / 0.25)
    assert b.recommended["Q"] == 192  # Gamma* S / eps^4 = 12 / 0.0625
    assert b.recommended["T"] == pytest.approx(T, rel=REL)
    assert b.recommended["K"] == K
    assert b.recommended["kappa"] == pytest.approx((T + l) / K, rel=REL)
    assert b.violations == []
    eps2 = 0.25
    assert b.terms["epsilon_sq"] == eps2
    assert b.terms["forward_convergence"] == pytest.approx(eps2, rel=1e-12)  # d e^{-2T}
    assert eps2 * (1 - 1 / K) <= b.terms["discretisation_K"] <= eps2  # kappa^2 d K
    assert b.terms["discretisation_T"] <= eps2 * T / (T + l) * (1 + 1e-12)  # kappa d T
    assert b.terms["dsm_gap"] == 0.0


def test_remark1_Q_scales_as_eps_to_minus_4():
    assert r1(epsilon=0.25).recommended["Q"] / r1(epsilon=0.5).recommended["Q"] == 16
    big = r1(epsilon=0.02, gamma_star=3, S=5)  # 15 / 1.6e-7
    assert big.recommended["Q"] / r1(epsilon=0.04, gamma_star=3, S=5).recommended["Q"] == (
        pytest.approx(16, rel=1e-6)
    )


def test_remark1_K_scales_as_d_over_eps_squared():
    K = lambda **kw: r1(T=2.0, **kw).recommended["K"]  # noqa: E731  fixed T isolates d/eps^2
    assert K(d=200) / K(d=100) == pytest.approx(2, rel=1e-4)
    assert K(epsilon=0.25) / K(epsilon=0.5) == pytest.approx(4, rel=1e-4)
    # with T from the formula, K = d (T + log(1/delta))^2 / eps^2 with T = 1/2 log(d/eps^2)
    a, b = r1(d=100), r1(d=200)
    l = math.log(1000)  # noqa: E741
    ratio = 2 * ((b.recommended["T"] + l) / (a.recommended["T"] + l)) ** 2
    assert b.recommended["K"] / a.recommended["K"] == pytest.approx(ratio, rel=1e-4)


def test_remark1_min_below_1_is_reported():
    b = r1(epsilon=0.1, C=1.0)  # eps^2/C = 0.01 < 1/2 log(d/eps^2)
    assert b.recommended["T"] == pytest.approx(0.01)
    assert not b.conditions[B.COND_T] and not b.conditions[B.COND_FORWARD]
    assert any(v.startswith("T=0.01 < 1") for v in b.violations)
    assert b.dominant == "forward_convergence"
    assert any("min picks" in n for n in b.notes)


def test_remark1_conditions_flip_at_their_thresholds():
    t_fwd = 0.5 * math.log(100 / 0.25)
    assert r1(T=1.0).conditions[B.COND_T] and not r1(T=1 - 1e-12).conditions[B.COND_T]
    assert r1(T=t_fwd).conditions[B.COND_FORWARD]
    assert not r1(T=t_fwd * (1 - 1e-12)).conditions[B.COND_FORWARD]
    t_dsm = 0.25 / 0.01 + 1e-3  # C (T - delta) = eps^2 with C = 0.01
    assert r1(C=0.01, T=t_dsm * (1 - 1e-9)).conditions[B.COND_DSM]
    assert not r1(C=0.01, T=t_dsm * (1 + 1e-9)).conditions[B.COND_DSM]
    assert r1(delta=1 - 1e-12, T=5.0).conditions[B.COND_DELTA]
    assert not r1(delta=1.0, T=5.0).conditions[B.COND_DELTA]
    assert r1(sigma2=0.0).conditions[B.COND_SIGMA]
    assert not r1(sigma2=1e-3).conditions[B.COND_SIGMA]
    # K >= log(1/delta): met for eps = 1, not for a coarse eps = 10 (d = 1, T = 1)
    tiny = dict(d=1, T=1.0, delta=1e-20)
    assert r1(epsilon=1.0, **tiny).conditions[B.COND_K]
    assert not r1(epsilon=10.0, **tiny).conditions[B.COND_K]
    # Q = Gamma* S / eps^4 >= Gamma* S iff eps <= 1
    assert r1(epsilon=1.0, T=5.0).conditions[B.COND_Q_GS]
    assert not r1(epsilon=1.1, T=5.0).conditions[B.COND_Q_GS]


def test_remark1_pruning_term_is_order_eps_squared():
    kw = dict(L=2.0, w=0.3, theta0_sq=50.0, N=10)
    for eps in (0.5, 0.1):
        b = r1(epsilon=eps, **kw)
        Q = b.recommended["Q"]
        # (10/3) sqrt(G S Q) L^2 w^4 theta0 / (Q (1-2w^2)), sqrt(G S/Q) <= eps^2
        expected = 10 / 3 * math.sqrt(12 / Q) * 4 * 0.0081 * 50 / 0.82
        assert b.terms["pruning_init"] == pytest.approx(expected, rel=1e-12)
        assert b.terms["pruning_init"] <= 10 / 3 * eps**2 * 4 * 0.0081 * 50 / 0.82 * (1 + 1e-12)
        # the Remark's printed sqrt(G S Q L^2 w^4) is L w^2 where Corollary 2 has L^2 w^4
        printed = b.derived["pruning_init_remark_as_printed"]
        assert printed == pytest.approx(b.terms["pruning_init"] / (2.0 * 0.09), rel=1e-12)
    # Remark 1's Q violates Corollary 1's Q >= 729 G S L^2 unless eps^4 <= 1/(729 L^2)
    assert not r1(epsilon=0.5, **kw).conditions[B.COND_Q_STEP]


def test_remark1_nonzero_sigma_adds_terms_growing_as_one_over_eps_squared():
    kw = dict(L=2.0, N=10, sigma1=0.5, sigma2=0.4, T=3.0)
    a, b = r1(epsilon=0.5, **kw), r1(epsilon=0.25, **kw)
    assert b.terms["heterogeneity"] / a.terms["heterogeneity"] == pytest.approx(4, rel=1e-12)
    assert a.terms["sgd_noise_coverage"] == pytest.approx(3 * 2 * 10 * 0.25 / 12)
    with pytest.raises(FedscoreError, match="L and N"):
        r1(sigma1=0.5)


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=11.0), "epsilon"),  # eps^2 >= d with T from the formula
        (dict(d=0), "d"),
        (dict(C=-1.0), "C"),
        (dict(T=1e-3), "T"),
        (dict(delta=-1.0), "delta"),
    ],
)
def test_remark1_meaningless_input_raises(kw, field):
    with pytest.raises(FedscoreError, match=field):
        r1(**kw)


# ---------------------------------------------------------------- the report


def test_markdown_table_lists_every_term_with_consistent_columns():
    for b in (t1(eta=0.01), c1(), c2(times=torch.tensor([3.0, 2.0, 1.0, 0.1]), T=None,
                                      delta=None, K=None, kappa=None), r1(C=1.0)):  # fmt: skip
        md = b.to_markdown()
        rows = [line for line in md.splitlines() if line.startswith("| ")]
        assert len(rows) == len(b.terms) + 2  # header, terms, total
        for row in rows:
            assert len(re.findall(r"(?<!\\)\|", row)) == 5, row
        for name in b.terms:
            assert f"| {name} |" in md
        assert f"Dominant term: `{b.dominant}`" in md
        for v in b.violations:
            assert v in md
