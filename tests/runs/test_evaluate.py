"""`fedscore sample` / `fedscore evaluate` on tiny real runs: samples are written and
reproducible, the scores are finite and rank real data above an untrained model, federated
evaluation (per-silo statistics merged by addition) gives the centralised FID, and bad input
is one clear error."""

import json
import shutil

import numpy as np
import pytest
import torch

from fedscore import data, toy
from fedscore.config import FederationConfig, PartitionConfig, dump_config, load_config
from fedscore.errors import FedscoreError
from fedscore.metrics import (
    FeatureStats,
    fid_from_features,
    fid_from_stats,
    get_extractor,
    inception_score,
)
from fedscore.metrics import features as feat
from fedscore.runs import evaluate as ev
from fedscore.runs.evaluate import evaluate_run, load_samples, real_statistics, sample_run
from fedscore.runs.train import train_central


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    # the digits feature classifier (a few seconds) is trained once, into a private cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDSCORE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        None, name="ring", out_dir=str(out), data={"name": "gmm:ring8"},
        model={"kind": "mlp", "options": {"hidden": 64, "depth": 2}},
        diffusion={"grid": "exponential", "steps": 50, "T": 5.0, "delta": 1e-3},
        train={"steps": 50, "batch_size": 128, "log_every": 10, "checkpoint_every": 50,
               "eval_batch": 64},
        sample={"steps": 30},
    )
    train_central(cfg, progress=False)
    return out / "ring"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        None, name="digits", out_dir=str(out), data={"name": "digits"},
        model={"kind": "unet", "size": "tiny", "conditional": True},
        diffusion={"grid": "exponential", "steps": 50, "T": 5.0, "delta": 1e-3},
        train={"steps": 5, "batch_size": 32, "log_every": 5, "checkpoint_every": 5,
               "eval_batch": 32},
        sample={"method": "ancestral", "steps": 5},
    )
    train_central(cfg, progress=False)
    run = out / "digits"
    sample_run(run, 100, seed=0, progress=False)
    return run


def _write_npz(path, **arrays):
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


# ---------------------------------------------------------------- sampling


def test_sample_run_writes_reproducible_samples_and_a_scatter_for_a_mixture(toy_run, tmp_path):
    paths = sample_run(toy_run, 300, seed=3, out=tmp_path / "a", progress=False)
    assert paths["samples"] == tmp_path / "a" / "samples.npz"
    assert paths["figure"].read_bytes()[:4] == b"\x89PNG"
    with np.load(paths["samples"]) as npz:
        x = npz["samples"]
        assert "labels" not in npz.files  # an unconditional model has no labels
    assert x.shape == (300, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    again = sample_run(toy_run, 300, seed=3, out=tmp_path / "b", progress=False)
    other = sample_run(toy_run, 300, seed=4, out=tmp_path / "c", progress=False)
    assert np.array_equal(np.load(again["samples"])["samples"], x)
    assert not np.allclose(np.load(other["samples"])["samples"], x)


def test_conditional_samples_cycle_through_the_classes(digits_run):
    x, labels = load_samples(digits_run / "samples.npz", (1, 8, 8))
    assert x.shape == (100, 1, 8, 8)
    assert torch.equal(labels, torch.arange(100) % 10)  # 10 per class
    assert (digits_run / "samples.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- Gaussian mixtures


def test_mixture_metrics_rank_exact_samples_above_an_undertrained_model(toy_run, tmp_path):
    model_scores = evaluate_run(toy_run, n=500, seed=0, progress=False)
    assert json.loads((toy_run / "eval.json").read_text()) == model_scores
    assert model_scores["n_samples"] == 500
    gm = toy.preset("ring8")
    exact = gm.sample(500, generator=torch.Generator().manual_seed(99)).numpy()
    npz = _write_npz(tmp_path / "exact.npz", samples=exact)
    exact_scores = evaluate_run(toy_run, samples=npz, seed=0, progress=False)
    for key in ("mmd2", "sliced_w2", "kl", "component_tv"):
        assert np.isfinite(model_scores[key]) and np.isfinite(exact_scores[key]), key
        assert exact_scores[key] < model_scores[key], key
    assert abs(exact_scores["mmd2"]) < 0.01 and exact_scores["sliced_w2"] < 0.3
    assert sum(model_scores["component_freqs"]) == pytest.approx(1.0)
    # epsilon_score^2 is a property of the model, not of the samples: same value both times;
    # 50 steps leave it far from 0 (a trained model reaches < 1.5, tests/runs/test_train_central)
    assert model_scores["score_error"] == exact_scores["score_error"] > 1.0


# ---------------------------------------------------------------- images


def test_image_metrics_are_finite_and_real_digits_beat_an_untrained_model(digits_run, tmp_path):
    model = evaluate_run(digits_run, progress=False)
    assert json.loads((digits_run / "eval.json").read_text()) == model
    assert model["extractor"]["test_accuracy"] >= model["extractor"]["floor"]
    assert model["real_statistics"] == {"split": "train", "n": 1438, "silos": 1,
                                        "merged": False}
    for key in ("fid", "kid_mean", "is_mean", "precision", "recall"):
        assert np.isfinite(model[key]), key
    assert 1.0 <= model["is_mean"] <= 10.0 and model["is_splits"] == 5  # 100 samples
    for key in ("precision", "recall", "class_accuracy", "unrecognisable"):
        assert 0.0 <= model[key] <= 1.0, key

    images, labels = data.load("digits", split="test")  # held-out real digits as "samples"
    npz = _write_npz(tmp_path / "real.npz", samples=images.numpy(), labels=labels.numpy())
    real = evaluate_run(digits_run, samples=npz, progress=False)
    assert real["fid"] < model["fid"] / 5
    assert real["class_accuracy"] > 0.9 and real["is_mean"] > max(7.0, 1.5 * model["is_mean"])
    assert real["precision"] > model["precision"]
    assert real["unrecognisable"] < model["unrecognisable"]


@pytest.mark.parametrize(("n", "splits"), [(100, 5), (30, 1), (10, 1), (39, 1), (40, 2),
                                            (200, 10), (5000, 10)])
def test_is_splits_are_the_papers_ten_but_never_fewer_than_20_samples_each(n, splits):
    assert ev.is_splits(n) == splits


def test_evaluate_samples_states_its_splits_and_reference(cache):
    extractor = get_extractor("digits", progress=False)
    test_images, test_labels = data.load("digits", split="test")
    reference = extractor.stats(data.load("digits", split="train")[0])
    for n, splits in ((100, 5), (30, 1)):
        x, y = test_images[:n], test_labels[:n]
        out = ev.evaluate_samples(x, y, extractor=extractor, reference_stats=reference,
                                  reference_name="train")
        assert (out["n_samples"], out["is_splits"], out["reference"]) == (n, splits, "train")
        logits = extractor.logits(x)
        # the classifier's CPU convolutions agree to float32 rounding between calls
        assert (out["is_mean"], out["is_std"]) == pytest.approx(
            inception_score(logits, splits=splits), rel=1e-5, abs=1e-6)
        assert out["fid"] == pytest.approx(
            fid_from_stats(reference, extractor.stats(x)), rel=1e-5)
        assert out["class_accuracy"] > 0.9 and out["non_finite"] == 0
    # non-finite samples are counted, zeroed and clamped, not allowed to crash the table
    bad = test_images[:30].clone()
    bad[0, 0, 0, 0] = float("nan")
    bad[1] = 5.0
    out = ev.evaluate_samples(bad, None, extractor=extractor, reference_stats=reference,
                              reference_name="test")
    assert out["non_finite"] == 1 and out["class_accuracy"] is None
    assert out["reference"] == "test" and np.isfinite(out["fid"])


def test_merged_silo_statistics_give_the_centralised_fid(cache):
    extractor = get_extractor("digits", progress=False)
    images, labels = data.load("digits", split="train")
    fake = extractor.features(data.load("digits", split="test")[0][:200])
    cfg = load_config(None, data={"name": "digits"}, federation={
        "workers": 7, "level": "F", "partition": {"scheme": "dirichlet", "alpha": 0.3}})
    stats, how = real_statistics(extractor.stats, cfg, images, labels)
    assert how["merged"] and how["silos"] == 7 and len(set(how["silo_sizes"])) > 1
    assert stats.n == sum(how["silo_sizes"]) == len(images)  # the silos cover the split
    central = fid_from_features(extractor.features(images), fake)
    merged = fid_from_stats(stats, FeatureStats.from_features(fake))
    assert merged == pytest.approx(central, rel=1e-9)


def test_a_federated_run_is_evaluated_with_merged_statistics(digits_run, tmp_path):
    central = evaluate_run(digits_run, progress=False)
    fed_run = tmp_path / "fed"
    shutil.copytree(digits_run, fed_run)
    cfg = load_config(fed_run / "config.yaml")
    fed = FederationConfig(workers=4, level="F", partition=PartitionConfig(scheme="iid"))
    (fed_run / "config.yaml").write_text(dump_config(cfg.model_copy(update={"federation": fed})))
    scores = evaluate_run(fed_run, progress=False)
    how = scores["real_statistics"]
    assert how["merged"] and how["silos"] == 4 and sum(how["silo_sizes"]) == 1438
    assert scores["fid"] == pytest.approx(central["fid"], rel=1e-8)


def test_inception_scores_are_added_when_weights_are_given(digits_run, monkeypatch, tmp_path):
    # Plumbing only (a real Inception pass over 1,438 images takes minutes on a CPU core):
    # a stand-in network whose "pool3" is the flattened image and whose logits are 3 pixels.
    class StandIn:
        path = tmp_path / "weights.pth"

        def features_and_logits(self, images, progress=False):
            f = images.flatten(1).double()
            return f, f[:, :3]

        def stats(self, images, progress=False):
            return FeatureStats.from_features(self.features_and_logits(images)[0])

    loaded = []
    monkeypatch.setattr("fedscore.runs.evaluate.load_inception",
                        lambda path, **kw: loaded.append(path) or StandIn())
    scores = evaluate_run(digits_run, inception_weights="w.pth", progress=False)
    assert loaded == ["w.pth"]
    x, _ = load_samples(digits_run / "samples.npz", (1, 8, 8))
    real, _ = data.load("digits", split="train")
    expect = fid_from_features(real.flatten(1), x.clamp(-1, 1).flatten(1))
    assert scores["inception_fid"] == pytest.approx(expect, rel=1e-8)
    assert scores["inception_is_mean"] >= 1.0 and scores["inception_weights"].endswith(".pth")
    assert "fid" in scores  # the domain scores are still there


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "arrays, match",
    [
        (None, "not a readable .npz"),  # an empty file
        ({"x": np.zeros((5, 2), np.float32)}, "has no array 'samples'"),
        ({"samples": np.zeros((5, 3), np.float32)}, r"shape \(5, 3\), expected \(n, 2\)"),
        ({"samples": np.zeros((0, 2), np.float32)}, "holds 0 samples"),
        ({"samples": np.full((5, 2), np.nan, np.float32)}, "finite floats"),
        ({"samples": np.zeros((5, 2), np.float32), "labels": np.zeros(4, np.int64)},
         r"labels .* shape \(5,\)"),
    ],
)
def test_a_bad_samples_file_is_one_clear_error(toy_run, tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"") if arrays is None else _write_npz(path, **arrays)
    with pytest.raises(FedscoreError, match=match):
        evaluate_run(toy_run, samples=path, progress=False)


def test_a_run_folder_without_a_model_or_config_is_a_clear_error(toy_run, tmp_path):
    with pytest.raises(FedscoreError, match="not a run folder"):
        evaluate_run(tmp_path, progress=False)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(toy_run / "config.yaml", bare / "config.yaml")
    with pytest.raises(FedscoreError, match="no trained model"):
        evaluate_run(bare, progress=False)  # no samples either: it must sample first
    with pytest.raises(FedscoreError, match="no trained model"):
        sample_run(bare, 10, progress=False)
    with pytest.raises(FedscoreError, match="does not exist"):
        evaluate_run(toy_run, samples=tmp_path / "nope.npz", progress=False)


def test_an_extractor_below_its_floor_refuses_to_score(digits_run, monkeypatch):
    monkeypatch.setitem(feat.ACCURACY_FLOORS, "digits", 0.9999)
    before = (digits_run / "eval.json").read_text() if (digits_run / "eval.json").exists() else None
    with pytest.raises(FedscoreError, match="below|< floor"):
        evaluate_run(digits_run, progress=False)
    after = (digits_run / "eval.json").read_text() if (digits_run / "eval.json").exists() else None
    assert after == before  # nothing half-written


def test_a_missing_inception_file_fails_before_any_work(digits_run, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "image_metrics", lambda *a, **k: pytest.fail("scored anyway"))
    with pytest.raises(FedscoreError, match="does not exist.*Nothing is downloaded"):
        evaluate_run(digits_run, inception_weights=tmp_path / "none.pth", progress=False)
