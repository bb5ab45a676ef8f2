"""Eq. 8 through SecAgg+'s mean (flower/secure.py): the worker's vectors, the server's
conversion back to (sums, counts), quantisation within the stated bound, and the settings
refused before anything runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedscore.config import SecAggConfig, load_config
from fedscore.errors import FedscoreError
from fedscore.federated.aggregate import finish, masked_sums, round_stats
from fedscore.flower import secure

SHAPES = {"w": (7, 5), "b": (5,), "s": ()}


def random_round(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    thetas = [{k: torch.randn(s, generator=g) for k, s in SHAPES.items()} for _ in range(n)]
    masks = [{k: torch.rand(s, generator=g) < 0.6 for k, s in SHAPES.items()} for _ in range(n)]
    losses = [float(torch.rand((), generator=g)) for _ in range(n)]
    return thetas, masks, losses


def secagg_mean(vectors: list[list[np.ndarray]], sa: SecAggConfig) -> list[np.ndarray]:
    """What Flower's SecAgg+ hands the strategy for weight-1 workers: each vector clipped
    and stochastically quantised (Flower's `quantize`), summed, dequantised with the
    workflow's offset for N summands, divided by N (`SecAggPlusWorkflow.unmask_stage`;
    the masks cancel exactly and are left out)."""
    n, c, t = len(vectors), float(sa.clipping_range), int(sa.quantization_range)
    total = None
    for v in vectors:
        qv = quantize(v, c, t)
        total = qv if total is None else [a + b for a, b in zip(total, qv)]
    out = dequantize(total, c, t)
    return [(a - (n - 1) * c) / n for a in out]


@pytest.mark.parametrize("sa", [SecAggConfig(), SecAggConfig(clipping_range=4.0, scale=0.5,
                                                             quantization_range=2**16)])
def test_eq8_through_the_secagg_mean_equals_plain_eq8_within_the_quantisation_bound(sa):
    """Counts are recovered exactly and every sum within N_q·2c/(T·s); eq. 8's result
    within that over the count."""
    n = 3
    thetas, masks, losses = random_round(n)
    vectors = [secure.secure_vectors(t, m, loss, sa) for t, m, loss in zip(thetas, masks, losses)]
    like = thetas[0]
    got = secure.outcome_sums(secagg_mean(vectors, sa), n, like, sa)
    sums, counts = masked_sums(thetas, masks)
    bound = secure.quantization_bound(sa, n)
    for k in SHAPES:
        assert torch.equal(got.counts[k], counts[k])
        assert got.sums[k].dtype == like[k].dtype
        assert (got.sums[k] - sums[k]).abs().max() <= bound
    assert got.count_residual < 0.5
    assert got.loss == pytest.approx(sum(losses) / n, abs=bound)
    new, _ = finish(like, got.sums, got.counts)
    want, _ = finish(like, sums, counts)
    for k in SHAPES:
        assert (new[k] - want[k]).abs().max() <= bound


def test_the_conversion_is_exact_without_quantisation():
    """mean·N_q / s gives back the sums, round(mean(m)·N_q) the counts."""
    sa = SecAggConfig(scale=0.25)
    thetas, masks, losses = random_round(4, seed=1)
    vectors = [secure.secure_vectors(t, m, loss, sa) for t, m, loss in zip(thetas, masks, losses)]
    mean = [np.mean([v[i] for v in vectors], axis=0) for i in range(3)]
    got = secure.outcome_sums(mean, 4, thetas[0], sa)
    sums, counts = masked_sums(thetas, masks)
    for k in SHAPES:
        assert torch.equal(got.counts[k], counts[k])
        torch.testing.assert_close(got.sums[k], sums[k], rtol=1e-6, atol=1e-6)


def test_a_worker_vector_is_its_kept_values_and_its_mask_in_model_order():
    sa = SecAggConfig(scale=2.0)
    theta = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([3.0])}
    mask = {"a": torch.tensor([True, False]), "b": torch.tensor([True])}
    values, m, loss = secure.secure_vectors(theta, mask, 0.5, sa)
    np.testing.assert_array_equal(values, [2.0, 0.0, 6.0])
    np.testing.assert_array_equal(m, [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(loss, [1.0])


def test_values_beyond_the_clipping_range_fail_the_reply_with_the_fix():
    """Flower would clip them silently and bias eq. 8; the worker refuses instead."""
    sa = SecAggConfig(clipping_range=2.0, scale=1.0)
    theta = {"a": torch.tensor([1.0, 3.0])}
    with pytest.raises(FedscoreError, match=r"reach 3.*scale <= 0.667"):
        secure.secure_vectors(theta, {"a": torch.tensor([True, True])}, 0.1, sa)
    # a pruned coordinate does not travel, so it need not fit
    secure.secure_vectors(theta, {"a": torch.tensor([True, False])}, 0.1, sa)
    with pytest.raises(FedscoreError, match="loss"):
        secure.secure_vectors(theta, {"a": torch.tensor([True, False])}, 5.0, sa)
    with pytest.raises(FedscoreError, match="theta_q reaches"):
        secure.check_fits({"a": torch.tensor([-2.5])}, sa, 0)


def test_staircase_masks_reproduce_the_coverage_statistics():
    """The server's stand-in masks give round_stats the true coverage histogram and min."""
    thetas, masks, _ = random_round(3, seed=2)
    _, counts = masked_sums(thetas, masks)
    real = round_stats(thetas[0], masks, counts)
    stand_in = round_stats(thetas[0], secure.staircase_masks(counts, 3), counts)
    for key in ("coverage_hist", "min_coverage", "uncovered"):
        assert stand_in[key] == real[key]


@pytest.mark.parametrize("shares,threshold,nodes,want", [
    (1.0, 0.67, 3, (3, 2)),   # every worker holds shares; 2 of 3 unmask
    (1.0, 0.67, 10, (10, 7)),
    (0.5, 0.5, 10, (5, 2)),   # round(0.5·10) = 5; max(round(2.5), 2)
    (0.4, 1.0, 10, (5, 5)),   # round(4.0) = 4 is even and < 10 -> 5 shares, all needed
    (5, 3, 10, (5, 3)),
])
def test_shares_and_threshold_follow_flower(shares, threshold, nodes, want):
    p = secure.flower_shares(SecAggConfig(num_shares=shares,
                                          reconstruction_threshold=threshold), nodes)
    assert (p.shares, p.threshold) == want


def fed_cfg(workers=3, fed=None, **secagg):
    return load_config(name="s", data={"name": "gmm:ring8"},
                       model={"kind": "mlp", "options": {"hidden": 8, "depth": 1}},
                       federation={"workers": workers, "secure_aggregation": True,
                                   "secagg": secagg, **(fed or {})})


@pytest.mark.parametrize("workers,secagg,match", [
    (1, {}, "at least 2 workers"),
    (3, {"num_shares": 3, "reconstruction_threshold": 3}, "Flower's SecAgg\\+ refuses"),
    (3, {"num_shares": 5, "reconstruction_threshold": 2}, "only 3 workers"),
    (2, {"reconstruction_threshold": 3}, "fewer than the SecAgg\\+ reconstruction threshold"),
    (3, {"clipping_range": 0.5}, "c >= 1"),
    (5, {"quantization_range": 2**30, "clipping_range": 1.0}, "overflow"),
    (3, {"quantization_range": 64}, "counts could not be recovered"),
])
def test_settings_secagg_cannot_run_are_refused_with_one_clear_error(workers, secagg, match):
    with pytest.raises(FedscoreError, match=match):
        secure.plan(fed_cfg(workers, **secagg))


def test_an_update_norm_bound_is_refused_under_secure_aggregation():
    """The server cannot check one reply's norm when it never sees one reply."""
    with pytest.raises(FedscoreError, match="max_update_norm"):
        secure.plan(fed_cfg(3, fed={"max_update_norm": 10.0}))


def test_the_default_settings_plan_for_the_toy_federation():
    p = secure.plan(fed_cfg(3))
    assert (p.shares, p.threshold, p.neighbours, p.tolerated_dropouts) == (3, 2, 3, 1)
