"""Estimators of Theorem 1's constants against losses whose constants are known exactly:
quadratics 0.5 ||A theta - b||^2 per worker (L = max eigenvalue of A^T A, gradient spreads
by hand) and noise constructions with a known variance."""

from __future__ import annotations

import math

import pytest
import torch

from fedscore import federated
from fedscore.errors import FedscoreError
from fedscore.theory import estimate as E


def quad_loss(params, batch):
    """0.5 ||A theta - b||^2 for one batch (A (k, D), b (k,)): gradient A^T (A theta - b)."""
    A, b = batch
    r = A @ params["theta"] - b
    return 0.5 * (r * r).sum()


def center_loss(params, b):
    """0.5 ||theta - b||^2 for one batch b (D,): gradient theta - b."""
    return 0.5 * (params["theta"] - b).pow(2).sum()


def identity_batches(bs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, b) stacked (N, 1, D, D), (N, 1, D) with A = I: worker n's loss 0.5||theta - b_n||^2."""
    n, d = bs.shape
    eye = torch.eye(d, dtype=bs.dtype).expand(n, 1, d, d)
    return eye, bs[:, None]


def test_gamma_star_is_min_coverage_over_rounds_and_coordinates():
    # 3 workers, tensors a (2,) and b (3,); coverage per coordinate counted by hand
    r1 = [{"a": torch.tensor([1, 1]), "b": torch.tensor([1, 0, 1])},
          {"a": torch.tensor([1, 0]), "b": torch.tensor([1, 1, 0])},
          {"a": torch.tensor([1, 1]), "b": torch.tensor([0, 1, 1])}]  # fmt: skip
    r1 = [{k: v.bool() for k, v in m.items()} for m in r1]
    # coverage a = (3, 2), b = (2, 2, 2): min 2
    assert E.coverage_min(r1) == 2
    r2 = [dict(m) for m in r1]
    r2[1] = {"a": torch.tensor([True, False]), "b": torch.tensor([False, True, False])}
    r2[2] = {"a": torch.tensor([True, True]), "b": torch.tensor([False, True, True])}
    # coverage b[0] = 1 (worker 0 only)
    assert E.coverage_min(r2) == 1
    stacked = {k: torch.stack([m[k] for m in r2]) for k in ("a", "b")}
    assert E.gamma_star([r1, stacked]) == 1
    assert E.gamma_star([r1]) == 2
    r3 = [{"a": torch.tensor([True, False]), "b": torch.ones(3, dtype=torch.bool)}]
    assert E.gamma_star([r1, r3]) == 0  # a[1] kept by nobody


def test_gamma_star_needs_a_round():
    with pytest.raises(FedscoreError, match="at least one round"):
        E.gamma_star([])


def test_w2_is_the_largest_pruned_fraction_of_the_squared_norm():
    params = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}
    masks = {"a": torch.tensor([[True, True], [True, False], [False, True]]),
             "b": torch.tensor([[True], [False], [True]])}  # fmt: skip
    # worker 1 drops 4 -> 16/25; worker 2 drops 3 -> 9/25
    assert E.pruning_w2(params, masks) == pytest.approx(16 / 25, rel=1e-12)
    full = {k: torch.ones_like(v) for k, v in masks.items()}
    assert E.pruning_w2(params, full) == 0.0


def test_sigma2_and_global_gradient_match_a_hand_calculation():
    # F_n = 0.5||theta - b_n||^2 at theta = 0: grad F_n = -b_n, grad F = -mean b = -(1, 1)
    bs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    params = {"theta": torch.zeros(2, dtype=torch.float64)}
    rec = E.estimate_round(quad_loss, params, None, identity_batches(bs), q=0)
    # ||b_n - (1,1)||^2 = 1, 1, 2
    assert rec["sigma2_sq_max"] == pytest.approx(2.0, rel=1e-12)
    assert rec["sigma2_sq_mean"] == pytest.approx(4 / 3, rel=1e-12)
    assert rec["grad_sq"] == pytest.approx(2.0, rel=1e-12)
    assert rec["F"] == pytest.approx((0.5 + 0.5 + 4.0) / 3, rel=1e-12)
    assert rec["F_workers"] == pytest.approx([0.5, 0.5, 4.0], rel=1e-12)
    assert rec["theta_sq"] == 0.0 and rec["N"] == 3 and rec["q"] == 0
    assert "sigma1_sq_max" not in rec and "L_est" not in rec


def test_sigma1_is_exact_for_rademacher_noise_around_an_exact_full_gradient():
    # mini-batch b = mu_n + s_n r with r in {-1, 1}^D: ||g - grad F_n||^2 = D s_n^2 exactly
    g = torch.Generator().manual_seed(0)
    n, m, d = 3, 7, 5
    mu = torch.randn(n, d, generator=g, dtype=torch.float64)
    s = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    r = torch.randint(0, 2, (n, m, d), generator=g).double() * 2 - 1
    worker = mu[:, None] + s[:, None, None] * r  # (N, M, D)
    full = torch.stack([mu + 0.3, mu - 0.3], dim=1)  # 2 chunks whose mean is mu
    params = {"theta": torch.randn(d, generator=g, dtype=torch.float64)}
    rec = E.estimate_round(center_loss, params, worker, full, q=3)
    assert rec["sigma1_sq_workers"] == pytest.approx((d * s**2).tolist(), rel=1e-12)
    assert rec["sigma1_sq_max"] == pytest.approx(d * 4.0, rel=1e-12)
    assert rec["sigma1_sq_mean"] == pytest.approx(d * float((s**2).mean()), rel=1e-12)


def test_sigma1_matches_the_variance_of_a_gaussian_mini_batch_mean():
    # loss 0.5||theta - mean_b x_b||^2 over B samples x ~ N(mu, s^2 I): sigma_1^2 = D s^2 / B
    g = torch.Generator().manual_seed(1)
    n, m, bsz, d, s = 2, 1500, 4, 3, 1.5
    mu = torch.tensor([[1.0, -1.0, 0.0], [3.0, 0.0, 2.0]], dtype=torch.float64)
    x = mu[:, None, None] + s * torch.randn(n, m, bsz, d, generator=g, dtype=torch.float64)

    def loss(params, batch):
        return 0.5 * (params["theta"] - batch.mean(0)).pow(2).sum()

    full = mu[:, None, None]  # one "batch" of one sample at the mean: grad F_n exactly
    rec = E.estimate_round(loss, {"theta": torch.zeros(d, dtype=torch.float64)}, x, full, q=0)
    expected = d * s**2 / bsz
    # each worker's estimate is a mean of 1500 scaled chi^2_3: relative sd ~ 2%
    for value in rec["sigma1_sq_workers"]:
        assert value == pytest.approx(expected, rel=0.08)


def _rotation(d: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def test_l_estimate_is_a_lower_bound_that_approaches_the_top_eigenvalue():
    # A^T A = R diag(lam) R^T shared by 3 workers with different b: L = max(lam) = 10.
    # Gradient descent with eta = 2.2 / L amplifies the top eigen-direction (factor -1.2 per
    # step) and damps the others, so theta_{q+1} - theta_q aligns with it: ratio -> L.
    g = torch.Generator().manual_seed(2)
    d, n = 4, 3
    lam = torch.tensor([10.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    R = _rotation(d, g)
    A = (lam.sqrt()[:, None] * R.T).expand(n, 1, d, d)
    b = torch.randn(n, 1, d, generator=g, dtype=torch.float64)
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    est = E.Estimator(quad_loss, every=1, S=1, eta=2.2 / 10)
    ratios = []
    for q in range(25):
        params = {"theta": theta}
        rec = est.observe(q, params, (A, b))
        if q > 0:
            ratios.append(rec["L_est"])
            assert rec["L_global"] <= 10.0 * (1 + 1e-9)
        M = A[0, 0]  # grad F = (1/N) sum_n M^T (M theta - b_n)
        theta = theta - 2.2 / 10 * (M.T @ (M @ theta - b[:, 0].mean(0)))
    assert max(ratios) <= 10.0 * (1 + 1e-9)
    assert max(ratios) >= 0.99 * 10.0
    assert min(ratios) >= 1.0 * (1 - 1e-9)  # no ratio below the smallest eigenvalue


def test_l_estimate_takes_the_largest_worker_constant():
    # different curvature per worker: L = max_n lambda_max(A_n^T A_n); one step along e_1
    d = 3
    scales = torch.tensor([1.0, 3.0], dtype=torch.float64)  # A_n = diag(scale_n, 1, 1)
    A = torch.stack([torch.diag(torch.tensor([c, 1.0, 1.0], dtype=torch.float64))
                     for c in scales])[:, None]  # fmt: skip
    b = torch.zeros(2, 1, d, dtype=torch.float64)
    a = {"theta": torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)}
    z = {"theta": torch.zeros(d, dtype=torch.float64)}
    rec = E.estimate_round(quad_loss, a, None, (A, b), q=1, previous_params=z)
    assert rec["L_est"] == pytest.approx(9.0, rel=1e-12)  # scale^2 of worker 1
    assert rec["L_global"] == pytest.approx(5.0, rel=1e-12)  # mean of 1 and 9
    assert rec["step_norm"] == pytest.approx(1.0, rel=1e-12)


def test_estimator_observes_every_k_rounds_and_on_force():
    bs = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    est = E.Estimator(quad_loss, every=3)
    params = {"theta": torch.ones(2, dtype=torch.float64)}
    seen = [q for q in range(7) if est.observe(q, params, identity_batches(bs)) is not None]
    assert seen == [0, 3, 6]
    assert est.observe(7, params, identity_batches(bs), force=True)["q"] == 7
    with pytest.raises(FedscoreError, match="every"):
        E.Estimator(quad_loss, every=0)


def _federated_run(rounds: int = 6, every: int = 2):
    """A small federated run of eq. 7-8 on quadratics, logged as the run loop does."""
    g = torch.Generator().manual_seed(3)
    n, d, S, lr = 4, 6, 2, 0.05
    lam = torch.tensor([3.0, 2.0, 2.0, 1.5, 1.0, 0.5], dtype=torch.float64)
    A = (lam.sqrt()[:, None] * _rotation(d, g).T).expand(n, 1, d, d)
    b_full = torch.randn(n, 1, d, generator=g, dtype=torch.float64)
    params = {"theta": torch.randn(d, generator=g, dtype=torch.float64)}
    ratios = [1.0, 1.0, 0.5, 0.5]
    est = E.Estimator(quad_loss, every=every, S=S, eta=lr)
    records, masks_seen = [], []
    for q in range(rounds):
        gens = [torch.Generator().manual_seed(100 * q + i) for i in range(n)]
        masks = federated.build_masks(params, "random", ratios, gens)
        masks_seen.append(masks)
        noise = 0.3 * torch.randn(n, S, d, generator=g, dtype=torch.float64)
        batches = (A.expand(n, S, d, d), b_full.expand(n, S, d) + noise)
        obs = est.observe(q, params, (A, b_full), batches, masks)
        new, _, stats, _, _ = federated.run_round(params, masks, batches, quad_loss,
                                                  federated.SGD(lr=lr), steps=S)
        record = {"round": q + 1, **stats}
        params = new
        if q == rounds - 1:
            final = est.observe(rounds, params, (A, b_full), force=True)
            obs = [o for o in (obs, final) if o is not None]
        if obs:
            record["theory"] = obs
        records.append(record)
    return records, masks_seen, float(lam.max())


def test_constants_from_metrics_of_a_federated_run():
    records, masks_seen, L_true = _federated_run()
    c = E.constants_from_metrics(records)
    assert c["Q"] == 6 and c["N"] == 4 and c["S"] == 2 and c["eta"] == 0.05
    assert c["gamma_star"] == E.gamma_star(masks_seen) == 2  # two full workers, always
    assert c["w"] == pytest.approx(math.sqrt(max(r["w2"] for r in records)), rel=1e-12)
    assert 0.5 ** 2 < c["w"] ** 2 < 1  # half of the coordinates dropped: w^2 near 1/2
    obs = E.theory_records(records)
    assert [o["q"] for o in obs] == [0, 2, 4, 6]
    assert 0 < c["L"] <= L_true * (1 + 1e-9)
    assert c["sigma1"] == pytest.approx(math.sqrt(max(o["sigma1_sq_max"] for o in obs[:-1])))
    assert c["sigma2"] == pytest.approx(math.sqrt(max(o["sigma2_sq_max"] for o in obs)))
    assert c["sigma1_mean"] <= c["sigma1"] and c["sigma2_mean"] <= c["sigma2"]
    assert c["F0"] == obs[0]["F"] and c["theta0_sq"] == obs[0]["theta_sq"]
    assert c["FQ"] == obs[-1]["F"] and c["FQ"] < c["F0"]
    # observed LHS: mean over the observed q < Q = 6 (q = 0, 2, 4)
    assert c["observed_lhs"] == pytest.approx(sum(o["grad_sq"] for o in obs[:3]) / 3)
    assert [q for q, _ in c["lhs_curve"]] == [1, 3, 5]
    assert c["lhs_curve"][-1][1] == pytest.approx(c["observed_lhs"])
    assert c["notes"] == []
    assert E.constants_from_metrics(records, L=99.0)["L"] == 99.0


def test_constants_from_metrics_without_observations_says_how_to_get_them():
    with pytest.raises(FedscoreError, match="theory: \\{estimate: true"):
        E.constants_from_metrics([{"round": 1, "loss": 0.3}])


def test_constants_from_metrics_notes_missing_endpoints():
    records, _, _ = _federated_run(rounds=5, every=2)
    # drop the q = 0 and q = Q observations
    for r in records:
        if "theory" in r:
            obs = r["theory"] if isinstance(r["theory"], list) else [r["theory"]]
            r["theory"] = [o for o in obs if 0 < o["q"] < 5]
    c = E.constants_from_metrics(records)
    assert any("q=0" in n for n in c["notes"]) and any("q=Q=5" in n for n in c["notes"])
