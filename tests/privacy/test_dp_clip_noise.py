"""DP-FedAvg's pieces: a worker's update clipped to C over its kept coordinates (direction
kept, pruned coordinates untouched) in its three forms, and Gaussian noise whose empirical
scale is z*C (central on eq. 8's sums, or split over the workers)."""

import math

import pytest
import torch

from fedscore.config import load_config
from fedscore.federated.flat import FlatLayout
from fedscore.privacy import clip_kept, clip_rows, clip_update, gaussian_noise, plan_for
from fedscore.privacy.plan import RoundPrivacy, client_contribution


def worker(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    theta_q = {"w": torch.randn(5, 4, generator=g), "b": torch.randn(4, generator=g)}
    mask = {"w": torch.rand(5, 4, generator=g) < 0.6, "b": torch.tensor([True, False] * 2)}
    theta = {k: torch.where(mask[k], v + scale * torch.randn(v.shape, generator=g), 0)
             for k, v in theta_q.items()}
    return theta, theta_q, mask


def delta(theta, theta_q, mask):
    return torch.cat([torch.where(mask[k], theta[k] - theta_q[k], 0).reshape(-1)
                      for k in theta])


def test_clip_update_bounds_the_norm_keeps_direction_and_pruned_coordinates():
    theta, theta_q, mask = worker()
    before = delta(theta, theta_q, mask)
    clipped, norm = clip_update(theta, theta_q, mask, clip=1.0)
    after = delta(clipped, theta_q, mask)
    assert norm == pytest.approx(float(before.norm()), rel=1e-6) and norm > 1.0
    assert float(after.norm()) == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(after, before / norm, atol=1e-6)  # same direction, scaled
    for k in theta:
        assert torch.all(clipped[k][~mask[k]] == 0), k  # pruned stay zero (eq. 7)


def test_an_update_within_the_bound_is_unchanged():
    theta, theta_q, mask = worker(scale=0.01)
    clipped, norm = clip_update(theta, theta_q, mask, clip=10.0)
    assert norm < 10.0
    for k in theta:
        assert torch.allclose(clipped[k], theta[k], atol=1e-6), k


def test_the_three_forms_of_clipping_agree():
    pairs = [worker(seed) for seed in range(3)]
    layout = FlatLayout(pairs[0][1])
    theta_q = pairs[0][1]
    ws = [(t, m) for t, _, m in pairs]
    flat, norms = clip_rows(torch.stack([layout.flatten(t) for t, _ in ws]),
                            layout.flatten(theta_q),
                            torch.stack([layout.flatten(m) for _, m in ws]), clip=0.7)
    for n, (theta, mask) in enumerate(ws):
        one, norm = clip_update(theta, theta_q, mask, 0.7)
        assert float(norms[n]) == pytest.approx(norm, rel=1e-6)
        assert torch.allclose(flat[n], layout.flatten(one), atol=1e-6)
        kept = {k: theta[k][mask[k]] for k in theta}
        clipped_kept, norm_k = clip_kept(kept, mask, theta_q, 0.7)
        assert norm_k == pytest.approx(norm, rel=1e-6)
        for k in theta:
            assert torch.allclose(clipped_kept[k], one[k][mask[k]], atol=1e-6), k


def test_gaussian_noise_has_the_asked_standard_deviation_and_is_seeded():
    like = torch.zeros(200_000)
    x = gaussian_noise(like, 0.37, torch.Generator().manual_seed(1))
    # the sample std of n normals has standard error about std / sqrt(2n)
    se = 0.37 / math.sqrt(2 * like.numel())
    assert abs(float(x.std()) - 0.37) < 5 * se
    assert abs(float(x.mean())) < 5 * 0.37 / math.sqrt(like.numel())
    assert torch.equal(x, gaussian_noise(like, 0.37, torch.Generator().manual_seed(1)))


def plan(noise="central", z=1.5, clip=0.4, workers=4):
    cfg = load_config(None, seed=3, data={"name": "gmm:ring8"},
                      federation={"workers": workers, "rounds": 2},
                      privacy={"mode": "client", "clip": clip, "noise_multiplier": z,
                               "noise": noise})
    return plan_for(cfg)


def test_central_noise_on_the_sums_has_scale_z_times_c_where_someone_kept():
    p = plan()
    sums = {"a": torch.zeros(300, 300)}
    counts = {"a": torch.ones(300, 300, dtype=torch.long)}
    counts["a"][:, :10] = 0  # kept by nobody: eq. 8 keeps theta_q there, no noise needed
    noised = p.privatize(0, sums, counts)["a"]
    assert torch.all(noised[:, :10] == 0)
    kept = noised[:, 10:]
    se = p.noise_std / math.sqrt(2 * kept.numel())
    assert p.noise_std == pytest.approx(1.5 * 0.4)
    assert abs(float(kept.std()) - p.noise_std) < 5 * se
    # reproducible from (seed, round), fresh every round
    assert torch.equal(noised, p.privatize(0, sums, counts)["a"])
    assert not torch.equal(noised, p.privatize(1, sums, counts)["a"])


def test_distributed_shares_add_up_to_noise_of_scale_z_times_c_on_every_coordinate():
    p = plan("distributed")
    rp = RoundPrivacy(p, 0, [0, 1, 2, 3])
    noised = rp.add_worker_noise({"a": torch.zeros(400, 250)})["a"]
    se = p.noise_std / math.sqrt(2 * noised.numel())
    assert abs(float(noised.std()) - p.noise_std) < 5 * se
    assert p.privatize(0, {"a": torch.zeros(3)}, {"a": torch.ones(3)})["a"].eq(0).all()
    # a Flower worker's contribution carries exactly its own share (dense, pruned too)
    theta, theta_q, mask = worker()
    zero_update = {k: torch.where(mask[k], theta_q[k], 0) for k in theta_q}
    contrib, clipped = client_contribution(p, 0, 2, zero_update, theta_q, mask)
    assert not clipped
    rows = {k: torch.zeros_like(v) for k, v in theta_q.items()}
    share = RoundPrivacy(p, 0, [2]).add_worker_noise(rows)
    for k in theta_q:
        assert torch.allclose(contrib[k] - zero_update[k], share[k], atol=1e-6), k


def test_the_noise_key_is_a_secret_unless_a_test_pins_it(caplog):
    """Noise anyone can regenerate from the (public) config protects nothing: by default
    every plan draws its key from the OS; `privacy.noise_seed` pins it, with a warning."""
    from fedscore.config import PrivacyConfig
    from fedscore.privacy.plan import noise_key

    p = PrivacyConfig(mode="client", clip=1.0, noise_multiplier=1.0)
    keys = {noise_key(p) for _ in range(8)}
    assert len(keys) == 8 and all(0 <= k < 2**62 for k in keys)
    pinned = PrivacyConfig(mode="client", clip=1.0, noise_multiplier=1.0, noise_seed=42)
    with caplog.at_level("WARNING"):
        assert noise_key(pinned) == noise_key(pinned) == 42
    assert "NOT private" in caplog.text
