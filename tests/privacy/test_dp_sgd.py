"""DP-SGD in eq. 7's local steps: per-sample gradients by torch.func clipped over the kept
coordinates equal a naive per-sample loop; the vectorised engine (vmap over workers of the
per-sample vmap) and the sequential path agree; with z -> 0 and C -> inf it is plain eq. 7."""

import pytest
import torch
from torch import nn

from fedscore.federated import SGD, Adam, make_loss_fn, run_round
from fedscore.federated.flat import FlatLayout
from fedscore.federated.local import local_update
from fedscore.federated.seeding import noise_seed
from fedscore.privacy import DPSGD, per_sample_clipped_sum


def tiny():
    torch.manual_seed(0)  # test-local: the model's initial weights only
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss_fn = make_loss_fn(model, lambda net, b: ((net(b[0]) - b[1]) ** 2).mean())
    return params, loss_fn


def batches(n_workers, steps, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_workers, steps, size, 3, generator=g),
            torch.randn(n_workers, steps, size, 2, generator=g))


def masks_for(params, n_workers, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(n_workers, *v.shape, generator=g) < 0.7 for k, v in params.items()}


def test_per_sample_clipping_equals_a_naive_loop():
    params, loss_fn = tiny()
    layout = FlatLayout(params)
    loss_flat = layout.loss(loss_fn)
    x, y = (t[0, 0] for t in batches(1, 1, 6))
    mask = layout.flatten({k: v[0] for k, v in masks_for(params, 1).items()})
    theta = torch.where(mask, layout.flatten(params), 0)
    total, losses, clipped = per_sample_clipped_sum(loss_flat, 0.05)(theta, (x, y), mask)
    want, want_losses, n_clipped = torch.zeros_like(theta), [], 0
    for i in range(6):  # one sample at a time, plain autograd
        leaf = theta.clone().requires_grad_(True)
        loss = loss_flat(leaf, (x[i:i + 1], y[i:i + 1]))
        (g,) = torch.autograd.grad(loss, leaf)
        g = torch.where(mask, g, 0)
        norm = g.norm()
        n_clipped += int(norm > 0.05)
        want += g * min(1.0, 0.05 / float(norm))
        want_losses.append(float(loss.detach()))
    assert torch.allclose(total, want, atol=1e-6)
    assert torch.allclose(losses, torch.tensor(want_losses), atol=1e-6)
    assert int(clipped) == n_clipped > 0


def test_the_step_gradient_is_the_clipped_sum_plus_seeded_noise_over_b():
    params, loss_fn = tiny()
    layout = FlatLayout(params)
    loss_flat = layout.loss(loss_fn)
    x, y = (t[0, 0] for t in batches(1, 1, 8))
    mask = torch.ones(sum(layout.sizes), dtype=torch.bool)
    theta = layout.flatten(params)
    dp = DPSGD(clip=0.1, noise_multiplier=2.0, noise_key=5, round_=3, workers=(7,))
    grad, _ = dp.grad(loss_flat, theta, (x, y), mask, step=4)
    total, _, _ = per_sample_clipped_sum(loss_flat, 0.1)(theta, (x, y), mask)
    noise = torch.randn(theta.shape, generator=torch.Generator().manual_seed(
        noise_seed(5, 3, 7, 4))) * 0.2
    assert torch.allclose(grad, (total + noise) / 8, atol=1e-6)


@pytest.mark.parametrize("opt", [SGD(lr=0.1), Adam(lr=0.01)])
def test_vectorised_and_sequential_dp_sgd_agree_and_pruned_stay_zero(opt):
    params, loss_fn = tiny()
    b, masks = batches(3, 4, 5), masks_for(params, 3)
    out = {}
    for strategy in ("vmap", "sequential"):
        dp = DPSGD(clip=0.5, noise_multiplier=1.0, noise_key=0, round_=2, workers=(0, 1, 2))
        out[strategy] = run_round(params, masks, b, loss_fn, opt, strategy=strategy, dp=dp)
        assert dp.count.seen == 3 * 4 * 5
    for k in params:
        assert torch.allclose(out["vmap"][0][k], out["sequential"][0][k], atol=1e-5), k
    # one worker's local_update (the Flower path) with its own noise stream, pruned = 0
    w = 1
    dp = DPSGD(clip=0.5, noise_multiplier=1.0, noise_key=0, round_=2, workers=(w,))
    theta, _, _ = local_update(params, {k: v[w] for k, v in masks.items()},
                               tuple(t[w] for t in b), loss_fn, opt, dp=dp)
    for k, v in theta.items():
        assert torch.all(v[~masks[k][w]] == 0), k


def test_dp_sgd_without_clipping_or_noise_is_plain_eq7():
    params, loss_fn = tiny()
    b, masks = batches(2, 3, 4), masks_for(params, 2)
    plain = run_round(params, masks, b, loss_fn, SGD(lr=0.2), strategy="vmap")
    dp = DPSGD(clip=1e4, noise_multiplier=1e-12, noise_key=0, round_=0, workers=(0, 1))
    private = run_round(params, masks, b, loss_fn, SGD(lr=0.2), strategy="vmap", dp=dp)
    assert dp.count.clipped == 0
    for k in params:
        assert torch.allclose(plain[0][k], private[0][k], atol=1e-6), k
    assert torch.allclose(plain[4], private[4], atol=1e-6)  # the losses, too
