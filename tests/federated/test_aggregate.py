"""Eq. 8: each coordinate is averaged over the workers that kept it."""

import math

import pytest
import torch
from federated_oracle import oracle_aggregate

from fedscore.errors import FedscoreError
from fedscore.federated import (
    aggregate,
    build_masks,
    finish,
    masked_sums,
    merge_sums,
    round_stats,
)
from fedscore.flower import payload

T, F = True, False


def _hand_example():
    """3 workers, tensors w (4,) and b (2,). Worker values at PRUNED coordinates are not
    zero on purpose: eq. 8 must ignore them."""
    params = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([5.0, 6.0])}
    workers = [
        {"w": torch.tensor([10.0, 20.0, 30.0, 40.0]), "b": torch.tensor([1.0, 1.0])},
        {"w": torch.tensor([2.0, 4.0, 6.0, 8.0]), "b": torch.tensor([3.0, 5.0])},
        {"w": torch.tensor([0.0, 1.0, 0.0, 3.0]), "b": torch.tensor([7.0, 9.0])},
    ]
    masks = [
        {"w": torch.tensor([T, T, F, F]), "b": torch.tensor([T, T])},
        {"w": torch.tensor([T, F, T, F]), "b": torch.tensor([F, T])},
        {"w": torch.tensor([F, T, T, F]), "b": torch.tensor([F, T])},
    ]
    return params, workers, masks


def _stack(dicts):
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}


def test_eq8_on_a_hand_computed_example():
    params, workers, masks = _hand_example()
    new, coverage = aggregate(params, workers, masks, uncovered="keep")
    # w0: (10 + 2) / 2 = 6; w1: (20 + 1) / 2 = 10.5; w2: (6 + 0) / 2 = 3; w3: nobody -> 4
    assert new["w"].tolist() == [6.0, 10.5, 3.0, 4.0]
    # b0: only worker 0 -> 1; b1: (1 + 5 + 9) / 3 = 5
    assert new["b"].tolist() == [1.0, 5.0]
    assert coverage["w"].tolist() == [2, 2, 2, 0] and coverage["b"].tolist() == [1, 3]
    assert coverage["w"].dtype == torch.long
    zero, _ = aggregate(params, workers, masks, uncovered="zero")
    assert zero["w"].tolist() == [6.0, 10.5, 3.0, 0.0]
    with pytest.raises(FedscoreError, match=r"1 coordinate\(s\) were kept by no worker"):
        aggregate(params, workers, masks, uncovered="error")


def test_stacked_and_list_forms_agree():
    params, workers, masks = _hand_example()
    a, ca = aggregate(params, workers, masks)
    b, cb = aggregate(params, _stack(workers), _stack(masks))
    c, _ = aggregate(params, _stack(workers), masks)  # mixed forms are fine too
    for k in params:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])
        assert torch.equal(ca[k], cb[k])


def _random_case(seed, n=5):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(6, 4, generator=g, dtype=torch.float64),
              "b": torch.randn(6, generator=g, dtype=torch.float64)}
    workers = [{k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
               for _ in range(n)]
    gens = [torch.Generator().manual_seed(seed * 100 + i) for i in range(n)]
    masks = build_masks(params, "random", [0.5, 0.5, 0.4, 0.3, 0.6][:n], gens)
    masks["w"][:, 2, 3] = False  # one coordinate covered by nobody
    masks["b"][:, 0] = torch.tensor([T, F, T, F, F])[:n]  # overlapping coverage
    return params, workers, [{k: v[i] for k, v in masks.items()} for i in range(n)]


@pytest.mark.parametrize("uncovered", ["keep", "zero"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eq8_equals_the_coordinatewise_oracle_on_random_overlapping_masks(uncovered, seed):
    params, workers, masks = _random_case(seed)
    new, coverage = aggregate(params, _stack(workers), _stack(masks), uncovered=uncovered)
    want, want_cov = oracle_aggregate(params, workers, masks, uncovered)
    assert int(coverage["w"][2, 3]) == 0
    for k in params:
        torch.testing.assert_close(new[k], want[k], rtol=1e-12, atol=1e-12)
        assert torch.equal(coverage[k], want_cov[k])
    assert new["w"][2, 3] == (params["w"][2, 3] if uncovered == "keep" else 0.0)


def test_error_mode_agrees_with_the_oracle_that_an_uncovered_coordinate_is_fatal():
    params, workers, masks = _random_case(0)
    with pytest.raises(ValueError):
        oracle_aggregate(params, workers, masks, "error")
    with pytest.raises(FedscoreError, match="kept by no worker"):
        aggregate(params, workers, masks, uncovered="error")
    _, counts = masked_sums(workers, masks)
    for k in params:  # worker 0 covers every orphan: now error mode aggregates like the others
        masks[0][k] = masks[0][k] | (counts[k] == 0)
    new, _ = aggregate(params, workers, masks, uncovered="error")
    want, _ = oracle_aggregate(params, workers, masks, "error")
    torch.testing.assert_close(new["w"], want["w"], rtol=1e-12, atol=1e-12)


def test_sums_and_counts_merge_across_any_split_of_the_workers():
    params, workers, masks = _random_case(4)
    whole = masked_sums(workers, masks)
    merged = merge_sums(masked_sums(workers[:2], masks[:2]), masked_sums(workers[2:], masks[2:]))
    for k in params:
        torch.testing.assert_close(merged[0][k], whole[0][k], rtol=1e-14, atol=1e-14)
        assert torch.equal(merged[1][k], whole[1][k])
    a, _ = finish(params, *merged)
    b, _ = aggregate(params, workers, masks)
    for k in params:
        torch.testing.assert_close(a[k], b[k], rtol=1e-14, atol=1e-14)


def test_a_non_finite_value_at_a_pruned_coordinate_is_ignored():
    params, workers, masks = _hand_example()
    workers[0]["w"][2] = float("nan")  # worker 0 pruned w2
    new, _ = aggregate(params, workers, masks)
    assert new["w"].tolist() == [6.0, 10.5, 3.0, 4.0]


def test_mismatched_inputs_are_refused():
    params, workers, masks = _hand_example()
    with pytest.raises(FedscoreError, match="3 worker models but 2 masks"):
        aggregate(params, workers, masks[:2])
    with pytest.raises(FedscoreError, match="masks must be bool"):
        aggregate(params, workers, [{k: v.float() for k, v in m.items()} for m in masks])
    with pytest.raises(FedscoreError, match="unknown uncovered policy"):
        aggregate(params, workers, masks, uncovered="skip")


def test_round_stats_on_the_hand_example():
    params, workers, masks = _hand_example()
    _, coverage = aggregate(params, workers, masks)
    stats = round_stats(params, masks, coverage)
    # coverage w = [2, 2, 2, 0], b = [1, 3]
    assert stats["coverage_hist"] == [1, 1, 3, 1]
    assert stats["min_coverage"] == 0 and stats["uncovered"] == 1
    # ||theta||^2 = 1 + 4 + 9 + 16 + 25 + 36 = 91; pruned mass per worker:
    # 0: w2, w3 -> 25; 1: w1, w3, b0 -> 45; 2: w0, w3, b0 -> 42
    assert math.isclose(stats["w2"], 45 / 91, rel_tol=1e-12)
    # float32: kept values * 4 bytes + 1 byte of packed bits per pruned tensor
    # 0: w 2*4+1, b full 2*4 -> 17; 1 and 2: w 2*4+1, b 1*4+1 -> 14
    assert stats["bytes_sent"] == [17, 14, 14]
    assert stats["bytes_received"] == 24
    assert stats["keep_fraction"] == [4 / 6, 3 / 6, 3 / 6]
    assert stats == round_stats(params, _stack(masks), coverage)


def test_bytes_sent_match_the_sparse_payload_on_the_wire():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(37, 11, generator=g), "b": torch.randn(37, generator=g),
              "c": torch.randn(5, generator=g)}
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    masks = build_masks(params, "random", [1.0, 0.8, 0.75], gens, exclude={"c"})
    _, coverage = aggregate(params, {k: v.expand(3, *v.shape) for k, v in params.items()},
                            masks)
    stats = round_stats(params, masks, coverage)
    for n in range(3):
        arrays, _ = payload.encode(params, {k: v[n] for k, v in masks.items()})
        assert stats["bytes_sent"][n] == payload.nbytes(arrays)
