"""Top-k masks give every pruned worker the same blind spot (issue 15 item 7; the mechanism
behind top-k's bad score on the split ring, benchmarks/topk_ring.py):

- pruned workers' top-k masks are nested by keep ratio (identical for equal ratios), so
  the coordinates outside the largest pruned mask are pruned by EVERY pruned worker;
- after one round (eq. 7 then eq. 8) those coordinates are exactly the mean of the full
  workers' trained values: no pruned worker's data ever moves them;
- a pruned worker's trained model does not depend on the values of those coordinates at
  all (eq. 7 starts it from theta ⊙ m), so nothing in its update or its reported loss sees
  what they contribute to the assembled model on its data.
"""

import torch
from federated_oracle import TinyScoreNet, tiny_loss

from fedscore.federated import (
    build_masks,
    level_ratios,
    make_loss_fn,
    make_optimizer,
    run_round,
    train_workers,
)

DIM, B, S = 3, 5, 3


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = TinyScoreNet(DIM).to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return model, params


def _batches(n_workers):
    xs, ts, es = [], [], []
    for n in range(n_workers):
        g = torch.Generator().manual_seed(100 + n)
        xs.append(torch.randn(S, B, DIM, generator=g, dtype=torch.float64) + n)
        ts.append(torch.rand(S, B, generator=g, dtype=torch.float64) * 0.9 + 0.05)
        es.append(torch.randn(S, B, DIM, generator=g, dtype=torch.float64))
    return torch.stack(xs), torch.stack(ts), torch.stack(es)


def test_topk_masks_of_pruned_workers_are_nested_and_equal_for_equal_ratios():
    _, params = _setup()
    for level in ("M", "S"):
        ratios = level_ratios(level, 10)
        masks = build_masks(params, "topk", ratios, None)
        for name, m in masks.items():
            for i, ri in enumerate(ratios):
                for j, rj in enumerate(ratios):
                    if ri == rj:
                        assert torch.equal(m[i], m[j]), (level, name, i, j)
                    elif ri > rj:  # a larger top-k set contains the smaller one
                        assert bool((m[j] <= m[i]).all()), (level, name, i, j)


def test_coordinates_no_pruned_worker_keeps_are_the_full_workers_mean_and_unseen_by_pruned():
    model, params = _setup()
    ratios = [1.0, 1.0, 0.75, 0.75]  # level S with 4 workers
    full, pruned = [0, 1], [2, 3]
    masks = build_masks(params, "topk", ratios, None)
    loss_fn = make_loss_fn(model, tiny_loss)
    batches = _batches(len(ratios))

    def trained(p):
        return train_workers(p, masks, batches, loss_fn, make_optimizer("sgd", lr=0.1),
                             steps=S, strategy="sequential")[0]

    workers = trained(params)
    new, coverage, *_ = run_round(params, masks, batches, loss_fn,
                                  make_optimizer("sgd", lr=0.1), steps=S,
                                  strategy="sequential")
    blind_total = 0
    for name in params:
        blind = ~masks[name][pruned].any(0)  # pruned by every pruned worker
        blind_total += int(blind.sum())
        assert bool((coverage[name][blind] == len(full)).all())
        torch.testing.assert_close(new[name][blind], workers[name][full].mean(0)[blind],
                                   rtol=1e-12, atol=1e-12)
        # the coordinates every worker keeps are the mean over all four
        shared = masks[name].all(0)
        torch.testing.assert_close(new[name][shared], workers[name].mean(0)[shared],
                                   rtol=1e-12, atol=1e-12)
    assert blind_total > 0

    # halving the blind coordinates keeps the top-k mask (they stay the smallest) and leaves
    # every pruned worker's trained model bit-identical: they never see those values
    shrunk = {k: torch.where(masks[k][pruned].any(0), v, 0.5 * v) for k, v in params.items()}
    assert all(torch.equal(a, b) for a, b in zip(
        build_masks(shrunk, "topk", ratios, None).values(), masks.values()))
    again = trained(shrunk)
    for name in params:
        assert torch.equal(again[name][pruned], workers[name][pruned]), name
    # ... while the full workers, who do see them, train differently
    assert not all(torch.equal(again[k][full], workers[k][full]) for k in params)
