"""Mask policies (SPEC §2): exact per-tensor keep counts, top-k by |theta|, fresh random."""

import pytest
import torch

from fedscore.errors import FedscoreError
from fedscore.federated import POLICIES, build_masks, kept_count, make_mask


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(7, 5, generator=g),
        "b1": torch.randn(7, generator=g),
        "w2": torch.randn(3, 7, generator=g),
        "b2": torch.randn(3, generator=g),
        "scalar": torch.randn(1, generator=g),
    }


def test_kept_count_rounds_half_up_and_keeps_at_least_one():
    assert kept_count(10, 0.75) == 8  # 7.5 -> 8
    assert kept_count(4, 0.75) == 3
    assert kept_count(5, 0.5) == 3  # 2.5 -> 3 (half up, not banker's 2)
    assert kept_count(7, 0.8) == 6  # 5.6 -> 6
    assert kept_count(3, 0.1) == 1  # 0.3 -> 0, but at least one is kept
    assert kept_count(1, 0.75) == 1
    assert kept_count(9, 1.0) == 9


@pytest.mark.parametrize("policy", ["topk", "random"])
@pytest.mark.parametrize("ratio", [0.75, 0.8, 0.3, 1.0])
def test_every_tensor_keeps_exactly_its_rounded_count(policy, ratio):
    params = _params()
    mask = make_mask(params, policy, ratio, torch.Generator().manual_seed(1))
    assert set(mask) == set(params)
    for name, theta in params.items():
        assert mask[name].dtype == torch.bool and mask[name].shape == theta.shape
        assert int(mask[name].sum()) == kept_count(theta.numel(), ratio), name


def test_overall_kept_fraction_is_exact_up_to_per_tensor_rounding():
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(100, 40, generator=g), "b": torch.randn(1000, generator=g)}
    mask = make_mask(params, "random", 0.75, torch.Generator().manual_seed(2))
    kept = sum(int(m.sum()) for m in mask.values())
    assert kept == 3000 + 750


def test_topk_keeps_the_largest_magnitudes_and_breaks_ties_by_lower_index():
    theta = {"w": torch.tensor([[0.1, -5.0, 2.0], [-0.3, 4.0, 1.0]])}
    mask = make_mask(theta, "topk", 0.5)  # k = 3: |-5|, |4|, |2|
    assert mask["w"].tolist() == [[False, True, True], [False, True, False]]
    ties = {"w": torch.tensor([1.0, -2.0, 2.0, 1.0, -1.0])}
    mask = make_mask(ties, "topk", 0.6)  # k = 3: both 2s, then the first of the three 1s
    assert mask["w"].tolist() == [True, True, True, False, False]


def test_topk_agrees_with_a_threshold_on_random_tensors():
    params = _params(3)
    mask = make_mask(params, "topk", 0.75)
    for name, theta in params.items():
        kept, pruned = theta.abs()[mask[name]], theta.abs()[~mask[name]]
        if pruned.numel():
            assert float(kept.min()) >= float(pruned.max())


def test_random_is_fresh_per_generator_state_and_reproducible_from_a_seed():
    params = _params()
    g = torch.Generator().manual_seed(5)
    first = make_mask(params, "random", 0.5, g)
    second = make_mask(params, "random", 0.5, g)  # same generator, advanced state
    assert not torch.equal(first["w1"], second["w1"])
    again = make_mask(params, "random", 0.5, torch.Generator().manual_seed(5))
    assert all(torch.equal(first[k], again[k]) for k in params)


def test_random_masks_include_every_coordinate_with_probability_k_over_n():
    theta = {"w": torch.zeros(10)}
    g = torch.Generator().manual_seed(0)
    freq = torch.stack([make_mask(theta, "random", 0.3, g)["w"] for _ in range(4000)]).double()
    # each coordinate is kept with probability 3/10; 4000 draws give a std of ~0.007
    assert torch.allclose(freq.mean(0), torch.full((10,), 0.3, dtype=torch.float64), atol=0.03)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_keep_ratio_one_and_the_full_policy_keep_everything(policy):
    params = _params()
    for ratio in (1.0, 0.5) if policy == "full" else (1.0,):
        mask = make_mask(params, policy, ratio, torch.Generator().manual_seed(0))
        assert all(bool(m.all()) for m in mask.values())


def test_excluded_tensors_are_never_pruned():
    params = _params()
    by_name = make_mask(params, "topk", 0.5, exclude={"b1", "b2"})
    by_rule = make_mask(params, "topk", 0.5, exclude=lambda name: name.startswith("b"))
    for mask in (by_name, by_rule):
        assert bool(mask["b1"].all()) and bool(mask["b2"].all())
        assert int(mask["w1"].sum()) == kept_count(35, 0.5)


def test_a_custom_policy_is_a_plain_callable():
    def keep_first(theta, ratio, generator):
        flat = torch.zeros(theta.numel(), dtype=torch.bool)
        flat[: kept_count(theta.numel(), ratio)] = True
        return flat.reshape(theta.shape)

    mask = make_mask({"w": torch.randn(2, 2)}, keep_first, 0.5)
    assert mask["w"].tolist() == [[True, True], [False, False]]
    with pytest.raises(FedscoreError, match="must be bool"):
        make_mask({"w": torch.randn(2, 2)}, lambda t, r, g: torch.ones(4), 0.5)


def test_bad_inputs_raise_clear_errors():
    params = _params()
    with pytest.raises(FedscoreError, match="unknown mask policy 'magnitude'"):
        make_mask(params, "magnitude", 0.5)
    for ratio in (0.0, -0.1, 1.5):
        with pytest.raises(FedscoreError, match="keep_ratio must be in"):
            make_mask(params, "topk", ratio)
    with pytest.raises(FedscoreError, match="needs a torch.Generator"):
        make_mask(params, "random", 0.5)
    with pytest.raises(FedscoreError, match="one torch.Generator per worker"):
        build_masks(params, "random", [1.0, 0.5], [torch.Generator()])


def test_build_masks_stacks_one_mask_per_worker_from_its_own_generator():
    params = _params()
    ratios = [1.0, 0.8, 0.75]
    gens = [torch.Generator().manual_seed(100 + n) for n in range(3)]
    masks = build_masks(params, "random", ratios, gens)
    for name, theta in params.items():
        assert masks[name].shape == (3, *theta.shape)
        for n, r in enumerate(ratios):
            assert int(masks[name][n].sum()) == kept_count(theta.numel(), r)
    # a client (or server) regenerates worker 2's mask from its seed alone
    regen = make_mask(params, "random", 0.75, torch.Generator().manual_seed(102))
    assert all(torch.equal(regen[k], masks[k][2]) for k in params)


def test_a_random_mask_does_not_depend_on_the_order_of_the_params_dict():
    params = _params()
    backwards = dict(reversed(list(params.items())))
    a = make_mask(params, "random", 0.5, torch.Generator().manual_seed(9))
    b = make_mask(backwards, "random", 0.5, torch.Generator().manual_seed(9))
    assert list(b) == list(backwards)  # the caller's order is kept
    assert all(torch.equal(a[k], b[k]) for k in params)
