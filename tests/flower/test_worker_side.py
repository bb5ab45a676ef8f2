"""The worker's side of a round without Flower's processes: identity from the node config,
a hospital's own data, and worker_round == the engine's worker (same mask, same update)."""

import pytest
import torch

from fedscore import data as datasets
from fedscore import federated
from fedscore.config import load_config
from fedscore.federated.setup import prepare, worker_round
from fedscore.flower.client_app import node_identity


def cfg(**fed):
    return load_config(**{
        "data": {"name": "gmm:ring8"}, "model": {"options": {"hidden": 16, "depth": 1}},
        "diffusion": {"steps": 10},
        "federation": {"workers": 3, "rounds": 1, "local_steps": 2, "batch_size": 8,
                       "policy": "random", "level": "S", **fed},
    })


def test_node_identity_reads_and_checks_the_partition():
    assert node_identity({"partition-id": 2, "num-partitions": 3}, 3) == 2
    with pytest.raises(ValueError, match="partition-id"):
        node_identity({}, 3)
    with pytest.raises(ValueError, match="3 workers"):
        node_identity({"partition-id": 0, "num-partitions": 4}, 3)


def test_worker_round_is_the_engines_worker():
    c = cfg(strategy="sequential")
    f = prepare(c)
    params = f.init_params
    masks = f.masks(params, 0, [0, 1, 2])
    opt = federated.make_optimizer(c.federation.optimizer, lr=c.federation.lr)
    new, *_ = federated.run_round(params, masks, f.batches(0, [0, 1, 2]), f.loss_fn,
                                  opt, strategy="sequential")
    thetas, ms = [], []
    for n in range(3):
        theta, mask, _, losses = worker_round(f, params, 0, n)
        assert losses.shape == (2,)
        thetas.append(theta)
        ms.append(mask)
    again, _ = federated.aggregate(params, thetas, ms)
    for k in params:
        torch.testing.assert_close(again[k], new[k])


def test_own_data_replaces_the_partition():
    """A hospital's SuperNode (node config data-root) trains on all of its own data."""
    images, labels = datasets.load("gmm:ring8", split="train")
    own = (images[:50], labels[:50])
    f = prepare(cfg(), own_data=own)
    assert all(torch.equal(p, torch.arange(50)) for p in f.parts)
    theta, mask, _, losses = worker_round(f, f.init_params, 0, 1)
    assert torch.isfinite(losses).all()
    assert all(torch.isfinite(v).all() for v in theta.values())
