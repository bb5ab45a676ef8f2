"""Domain feature extractors: trained once, cached with a hash check, floored by accuracy."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from fedscore import data
from fedscore.errors import FedscoreError
from fedscore.metrics import (
    FeatureStats,
    class_accuracy,
    fid_from_features,
    fid_from_stats,
    get_extractor,
    inception_score,
)
from fedscore.metrics import features as feat

QUICK = {"epochs": 1}  # a cheap recipe for cache mechanics (its accuracy is beside the point)


def _counting_trainer(monkeypatch):
    """Wrap the real trainer; return the list of calls it records."""
    calls, real = [], feat.train_classifier

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(feat, "train_classifier", counted)
    return calls


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    extractor = get_extractor("digits", cache_dir=root, progress=False)
    return root, extractor


def test_digits_extractor_trains_beats_its_floor_and_records_its_accuracy(digits_cache):
    root, ex = digits_cache
    assert ex.meets_floor and ex.test_accuracy >= feat.ACCURACY_FLOORS["digits"]
    (meta_file,) = (root / "features").glob("digits-train-*.json")
    meta = json.loads(meta_file.read_text())
    assert meta["test_accuracy"] == pytest.approx(ex.test_accuracy)
    images, labels = data.load("digits", split="test")
    logits = ex.logits(images)
    assert logits.shape == (len(images), 10)
    assert class_accuracy(logits, labels) == pytest.approx(ex.test_accuracy)
    assert ex.features(images[:7]).shape == (7, ex.num_features)


def test_second_use_loads_from_the_cache_without_training(digits_cache, monkeypatch):
    root, first = digits_cache
    calls = _counting_trainer(monkeypatch)
    again = get_extractor("digits", cache_dir=root, progress=False)
    assert calls == []
    images, _ = data.load("digits", split="test")
    assert torch.equal(again.features(images), first.features(images))


@pytest.mark.parametrize("damage", ["flip-a-byte", "truncate", "bad-json", "missing-weights"])
def test_a_cache_entry_that_fails_its_check_is_rebuilt_and_logged(
    tmp_path, monkeypatch, caplog, damage
):
    get_extractor("digits", cache_dir=tmp_path, progress=False, recipe=QUICK)
    (weights,) = (tmp_path / "features").glob("*.safetensors")
    meta = weights.with_suffix(".json")
    if damage == "flip-a-byte":
        raw = bytearray(weights.read_bytes())
        raw[-5] ^= 0xFF  # inside the tensor data: same size, different hash
        weights.write_bytes(bytes(raw))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "bad-json":
        meta.write_text("{not json")
    else:
        weights.unlink()
    calls = _counting_trainer(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="fedscore.metrics.features"):
        rebuilt = get_extractor("digits", cache_dir=tmp_path, progress=False, recipe=QUICK)
    assert calls == [1]
    assert "failed its check" in caplog.text and "rebuilding" in caplog.text
    assert rebuilt.model.fc.weight.isfinite().all()
    # the rebuilt entry is valid: the next use trusts it
    get_extractor("digits", cache_dir=tmp_path, progress=False, recipe=QUICK)
    assert calls == [1]


def test_an_extractor_below_its_accuracy_floor_refuses_to_report(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSCORE_CACHE", str(tmp_path))  # also: the env var picks the cache
    untrained = get_extractor("digits", progress=False, recipe={"epochs": 0})
    assert list((tmp_path / "features").glob("digits-train-*.safetensors"))
    assert untrained.test_accuracy < 0.5
    images, _ = data.load("digits", split="test")
    with pytest.raises(FedscoreError, match="below|< floor"):
        untrained.features(images)
    with pytest.raises(FedscoreError, match="< floor"):
        untrained.logits(images)
    inspect = get_extractor("digits", progress=False, recipe={"epochs": 0}, allow_below_floor=True)
    assert inspect.features(images).shape[0] == len(images)


def test_the_cache_key_changes_with_the_recipe_and_with_the_data(tmp_path, monkeypatch):
    get_extractor("digits", cache_dir=tmp_path, progress=False, recipe={"epochs": 0})
    get_extractor("digits", cache_dir=tmp_path, progress=False, recipe={"epochs": 0, "seed": 1})
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 2
    real_load = data.load

    def altered(name, split="train", **kw):
        x, y = real_load(name, split, **kw)
        x = x.clone()
        x[0, 0, 0, 0] += 0.5
        return x, y

    monkeypatch.setattr(data, "load", altered)
    get_extractor("digits", cache_dir=tmp_path, progress=False, recipe={"epochs": 0})
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 3


def test_extractor_rejects_bad_input(digits_cache, tmp_path):
    _, ex = digits_cache
    with pytest.raises(FedscoreError, match=r"\(n, 1, 8, 8\)"):
        ex.features(torch.zeros(3, 1, 28, 28))
    with pytest.raises(FedscoreError, match="image datasets"):
        get_extractor("gmm:ring8", cache_dir=tmp_path)
    with pytest.raises(FedscoreError, match="unknown recipe keys"):
        get_extractor("digits", cache_dir=tmp_path, recipe={"epochs": 1, "lr_typo": 3})
    with pytest.raises(FedscoreError, match="bad feature-classifier recipe"):
        get_extractor("digits", cache_dir=tmp_path, recipe={"epochs": -1})
    with pytest.raises(FedscoreError, match="unknown dataset"):
        get_extractor("imagenet", cache_dir=tmp_path)


def _blur(x, sigma):
    r = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), value=-1.0), k.view(1, 1, 1, 7))
    return F.conv2d(F.pad(x, (0, 0, 3, 3), value=-1.0), k.view(1, 1, 7, 1))


@pytest.fixture(scope="module")
def mnist5k(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist-cache")
    return get_extractor("mnist5k", cache_dir=root, progress=False)


@pytest.mark.slow
def test_mnist5k_extractor_reaches_its_floor(mnist5k):
    assert mnist5k.test_accuracy >= feat.ACCURACY_FLOORS["mnist5k"] == 0.95


@pytest.mark.slow
def test_mnist5k_fid_orders_held_out_below_blurred_below_noise(mnist5k):
    train, _ = data.load("mnist5k", split="train")
    test, _ = data.load("mnist5k", split="test")
    noise = torch.randn(test.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    ref = mnist5k.features(train)
    held_out = fid_from_features(ref, mnist5k.features(test))
    blurred = fid_from_features(ref, mnist5k.features(_blur(test, 1.0)))
    noisy = fid_from_features(ref, mnist5k.features(noise))
    assert held_out < 0.1 * blurred
    assert blurred < noisy


@pytest.mark.slow
def test_mnist5k_fid_from_merged_silo_statistics_equals_the_centralised_fid(mnist5k):
    train, labels = data.load("mnist5k", split="train")
    test, _ = data.load("mnist5k", split="test")
    # silos of the FI paper's heterogeneous regime; each shares only (n, sum f, sum f f^T)
    parts = [torch.as_tensor(p) for p in data.partition(labels, "dominant", n_workers=10)]
    merged = sum((mnist5k.stats(train[p]) for p in parts), FeatureStats.empty(128))
    union = train[torch.cat(parts)]
    central = fid_from_features(mnist5k.features(union), mnist5k.features(test))
    assert fid_from_stats(merged, mnist5k.stats(test)) == pytest.approx(central, rel=1e-8)


@pytest.mark.slow
def test_inception_score_of_real_test_digits_is_near_ten(mnist5k):
    test, _ = data.load("mnist5k", split="test")
    logits = mnist5k.logits(test)
    assert inception_score(logits, splits=10)[0] > 8.5  # splits of 100 bias IS downwards
    assert inception_score(logits, splits=1)[0] > 9.0
