"""Domain-feature metrics on the user's own images (issue 18): a generic classifier recipe
(grey: mnist5k's, colour: cifar10's) keyed by the data's hash, no accuracy floor, and a clear
error for unlabelled data."""

import numpy as np
import pytest
from PIL import Image

from fedscore.config import DataConfig
from fedscore.errors import FedscoreError
from fedscore.metrics.features import RECIPES, get_extractor


def write(root, classes, n=20, size=8, rgb=False):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        folder = root / name if name else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size, size, 3) if rgb else (size, size)
            Image.fromarray(rng.integers(100 * c, 100 * c + 50, shape, dtype=np.uint8)).save(
                folder / f"{i}.png")
    return root


@pytest.mark.parametrize(("rgb", "recipe"), [(False, "mnist5k"), (True, "cifar10")])
def test_own_images_get_a_generic_recipe_and_no_floor(tmp_path, rgb, recipe):
    root = write(tmp_path / "d", ["a", "b"], rgb=rgb)
    d = DataConfig(name="folder", path=str(root))
    ex = get_extractor(d, cache_dir=tmp_path / "cache", progress=False,
                       recipe={"epochs": 15, "batch_size": 8})
    assert ex.floor == 0.0 and ex.meets_floor
    assert ex.input_shape == ((3 if rgb else 1), 8, 8)
    assert ex.model.fc.out_features == RECIPES[recipe]["hidden"]
    assert ex.test_accuracy >= 0.75  # two well-separated grey levels
    assert ex.path.name.startswith("folder-train-")
    again = get_extractor(d, cache_dir=tmp_path / "cache", progress=False,
                          recipe={"epochs": 15, "batch_size": 8})
    assert again.path == ex.path  # cached by the data's hash


def test_unlabelled_own_images_cannot_train_a_domain_classifier(tmp_path):
    root = write(tmp_path / "u", [""])
    with pytest.raises(FedscoreError, match="no labels.*need|domain-feature metrics"):
        get_extractor(DataConfig(name="folder", path=str(root)), cache_dir=tmp_path / "c",
                      progress=False)


def test_unlabelled_own_images_are_scored_by_inception_alone(tmp_path, monkeypatch):
    """`fedscore evaluate` of a run on unlabelled images: without Inception weights one
    clear error pointing at them; with them, the Inception FID/IS and no domain scores."""
    import torch

    from fedscore.config import load_config
    from fedscore.metrics import FeatureStats
    from fedscore.runs.evaluate import evaluate_run, sample_run
    from fedscore.runs.train import train_central

    root = write(tmp_path / "u", [""], n=30)
    cfg = load_config(None, name="u", out_dir=str(tmp_path / "runs"),
                      data={"name": "folder", "path": str(root)},
                      model={"kind": "unet", "size": "tiny"},
                      diffusion={"grid": "exponential", "steps": 10},
                      train={"steps": 2, "batch_size": 8, "eval_batch": 4, "log_every": 1},
                      sample={"steps": 2})
    monkeypatch.setenv("FEDSCORE_CACHE", str(tmp_path / "cache"))
    train_central(cfg, progress=False)
    run = tmp_path / "runs" / "u"
    sample_run(run, 20, progress=False)
    with pytest.raises(FedscoreError, match="--inception-weights"):
        evaluate_run(run, progress=False)

    class StandIn:  # a real Inception pass is minutes on a CPU: pool3 = the flat image
        path = tmp_path / "weights.pth"

        def features_and_logits(self, images, progress=False):
            f = images.flatten(1).double()
            return f, f[:, :3]

        def stats(self, images, progress=False):
            return FeatureStats.from_features(self.features_and_logits(images)[0])

    monkeypatch.setattr("fedscore.runs.evaluate.load_inception", lambda path, **kw: StandIn())
    scores = evaluate_run(run, inception_weights="w.pth", progress=False)
    assert torch.isfinite(torch.tensor(scores["inception_fid"]))
    assert scores["inception_fid"] > 0 and "fid" not in scores
