"""models.build: the network a config names, from shapes alone, and its weights loaded
whole or refused with one clear error."""

import pytest
import torch

from fedscore.config import ModelConfig
from fedscore.errors import FedscoreError
from fedscore.io import atomic_write
from fedscore.models.build import build_model_for, load_trained, load_weights, save_weights

MLP = ModelConfig(kind="mlp", options={"hidden": 16, "depth": 2})


def test_the_seed_fixes_the_initial_weights_without_touching_the_global_rng():
    before = torch.random.get_rng_state()
    a = build_model_for(MLP, (2,), None, seed=3)
    b = build_model_for(MLP, (2,), None, seed=3)
    c = build_model_for(MLP, (2,), None, seed=4)
    assert torch.equal(torch.random.get_rng_state(), before)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_labels_count_only_for_conditional_models_and_shapes_pick_the_network():
    cond = build_model_for(MLP.model_copy(update={"conditional": True}), (2,), 5)
    plain = build_model_for(MLP, (2,), 5)
    x, t, y = torch.randn(4, 2), torch.rand(4), torch.tensor([0, 1, 2, 4])
    assert cond(x, t, y).shape == (4, 2) and plain(x, t).shape == (4, 2)
    n_cond, n_plain = (sum(p.numel() for p in m.parameters()) for m in (cond, plain))
    assert n_cond > n_plain  # the label embedding
    with pytest.raises(FedscoreError, match="use model.kind: unet"):
        build_model_for(MLP, (1, 8, 8), None)
    unet = build_model_for(ModelConfig(kind="unet", size="tiny"), (1, 8, 8), None)
    assert unet(torch.randn(2, 1, 8, 8), torch.rand(2)).shape == (2, 1, 8, 8)


def test_trained_weights_load_whole_or_not_at_all(tmp_path):
    trained = build_model_for(MLP, (2,), None, seed=1)
    path = tmp_path / "model.safetensors"
    atomic_write(path, lambda tmp: save_weights(dict(trained.named_parameters()), tmp))
    back = load_trained(MLP, path, (2,), None)
    assert not back.training
    for (k, v), (k2, v2) in zip(trained.named_parameters(), back.named_parameters()):
        assert k == k2 and torch.equal(v, v2)

    wider = ModelConfig(kind="mlp", options={"hidden": 32, "depth": 2})
    with pytest.raises(FedscoreError, match="cannot load"):  # same names, other shapes
        load_trained(wider, path, (2,), None)
    deeper = build_model_for(ModelConfig(kind="mlp", options={"hidden": 16, "depth": 3}), (2,),
                             None)
    with pytest.raises(FedscoreError, match="does not match the model of run.yaml"):
        load_weights(deeper, path, config="run.yaml")  # parameters the file lacks
    with pytest.raises(FedscoreError, match="no trained model"):
        load_trained(MLP, tmp_path / "missing" / "model.safetensors", (2,), None)
