"""Sparse payloads carry exactly the kept coordinates and rebuild eq. 8's sums."""

import numpy as np
import torch

from fedscore.flower import payload


def test_round_trip_of_a_pruned_model():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(7, 5, generator=g), "b": torch.randn(3, generator=g)}
    masks = {"w": torch.rand(7, 5, generator=g) > 0.3, "b": torch.ones(3, dtype=torch.bool)}
    arrays, kinds = payload.encode(params, masks)
    assert kinds == {"w": "bits", "b": "full"}
    values, back = payload.decode(arrays, kinds, params)
    for k in params:
        assert torch.equal(back[k], masks[k])
        assert torch.equal(values[k], params[k] * masks[k])


def test_sparse_payload_is_smaller_than_dense_by_the_pruned_fraction_minus_the_mask_cost():
    w = torch.randn(1000, 100)
    mask = torch.zeros(100_000, dtype=torch.bool)
    mask[torch.randperm(100_000, generator=torch.Generator().manual_seed(1))[:75_000]] = True
    arrays, _ = payload.encode({"w": w}, {"w": mask.reshape(1000, 100)})
    dense = w.numel() * 4
    assert payload.nbytes(arrays) == 75_000 * 4 + 100_000 // 8
    assert payload.nbytes(arrays) <= dense * (0.75 + 1 / 32)
    seeded, kinds = payload.encode({"w": w}, {"w": mask.reshape(1000, 100)}, seeded=True)
    assert kinds["w"] == "seeded" and payload.nbytes(seeded) == 75_000 * 4


def test_replies_add_into_sums_and_counts_like_eq_8():
    like = {"w": torch.zeros(4)}
    sums, counts = {"w": torch.zeros(4)}, {"w": torch.zeros(4, dtype=torch.long)}
    replies = [
        ({"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}, {"w": torch.tensor([1, 1, 0, 0]).bool()}),
        ({"w": torch.tensor([5.0, 6.0, 7.0, 8.0])}, {"w": torch.tensor([0, 1, 1, 0]).bool()}),
    ]
    for params, masks in replies:
        arrays, kinds = payload.encode(params, masks)
        payload.add_to_sums(sums, counts, arrays, kinds)
    assert torch.equal(sums["w"], torch.tensor([1.0, 8.0, 7.0, 0.0]))
    assert torch.equal(counts["w"], torch.tensor([1, 2, 1, 0]))
    assert np.array_equal(like["w"].numpy(), np.zeros(4))


def test_many_tensors_travel_as_two_arrays_and_seeded_masks_are_regenerated():
    g = torch.Generator().manual_seed(2)
    params = {f"t{i}": torch.randn(3, i + 1, generator=g) for i in range(5)}
    masks = {k: torch.rand(v.shape, generator=g) > 0.5 for k, v in params.items()}
    masks["t0"][:] = True
    arrays, kinds = payload.encode(params, masks)
    assert set(arrays) == {"values", "mask"} and kinds["t0"] == "full"
    values, back = payload.decode(arrays, kinds, params)
    for k in params:
        assert torch.equal(back[k], masks[k])
        assert torch.equal(values[k], torch.where(masks[k], params[k], 0))
    seeded, kinds = payload.encode(params, masks, seeded=True)
    assert set(seeded) == {"values"}
    _, again = payload.decode(seeded, kinds, params, regenerate=masks)
    assert all(torch.equal(again[k], masks[k]) for k in params)
