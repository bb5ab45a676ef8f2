"""The shipped configs/ load, build their model for their data, and say what they claim."""

from pathlib import Path

import pytest
import torch

from fedscore import data as datasets
from fedscore.config import FederationConfig, load_config
from fedscore.models.build import build_model_for

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_the_configs_folder_is_found():
    assert len(CONFIGS) >= 6, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_its_model_fits_its_data(path, monkeypatch):
    monkeypatch.chdir(path.parents[1])  # own-data paths (examples/shapes) are the repo's
    cfg = load_config(path)
    shape, classes = datasets.shape_and_classes(cfg)
    # on the meta device: checks the architecture against the data's shape (e.g. a U-Net's
    # levels against the image size) without allocating a 34 M-parameter network
    with torch.device("meta"):
        model = build_model_for(cfg.model, shape, classes)
    x = torch.empty((2, *shape), device="meta")
    out = model(x, torch.ones(2, device="meta"),
                torch.zeros(2, dtype=torch.long, device="meta") if cfg.model.conditional else None)
    assert out.shape == x.shape


@pytest.mark.parametrize(("dataset", "epochs"),
                         [("cifar10", 5), ("svhn", 2), ("fashion-mnist", 2)])
def test_paper_presets_carry_the_papers_settings(dataset, epochs):
    # Appendix G.1: 10 workers, Q = 300, S = 5 epochs (CIFAR-10) or 2 (SVHN, Fashion-MNIST),
    # eta = 1e-4, the paper-sized U-Net
    cfg = load_config(Path(__file__).parents[2] / "configs" / f"pruning-{dataset}.yaml")
    fed = cfg.federation
    assert isinstance(fed, FederationConfig)
    assert cfg.data.name == dataset and cfg.model.size == "paper"
    assert (fed.workers, fed.rounds, fed.local_epochs, fed.lr) == (10, 300, epochs, 1e-4)
    assert cfg.data.data_root is not None  # a placeholder the user must replace
