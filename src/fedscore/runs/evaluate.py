"""Sampling and evaluating a run folder: `fedscore sample` and `fedscore evaluate`.

`sample_run` draws n samples from the run's trained model with the run's sampler settings
and writes `samples.npz` (and a picture) into the folder. `evaluate_run` measures those
samples and writes `eval.json`:

- image data: FID against the training split, KID, IS +- std, precision/recall, and, from
  the domain classifier's logits, the class accuracy of class-conditional samples and the
  unrecognisable fraction (FI paper, Table 1); optionally Inception-v3 FID/IS from a local
  weights file;
- Gaussian mixtures: MMD^2, sliced W_2 and component-frequency error against exact samples,
  the KL estimate against the exact density, and the model's exact score error
  epsilon_score^2 on its training grid (the quantity Corollary 2 assumes small).

Federated evaluation (DESIGN principle 5): for a run whose config has a `federation`
section, the real-data statistics are computed per silo — the run's own partition of the
training split — as sums (n, sum f, sum f f^T) and merged by addition, so FID against the
union of the silos' data needs no silo to share an image or a feature vector. KID and
precision/recall need real features themselves (not mergeable sums) and use the pooled
training split; eval.json says so.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedscore import data as datasets
from fedscore import diffusion, toy
from fedscore.config import FederationConfig, RunConfig, load_config
from fedscore.errors import FedscoreError
from fedscore.federated.setup import worker_parts
from fedscore.io import atomic_write, atomic_write_text
from fedscore.metrics import (
    class_accuracy,
    component_frequency_error,
    fid_from_stats,
    get_extractor,
    inception_score,
    kid,
    kl_estimate,
    mmd2_rbf,
    precision_recall,
    score_error,
    sliced_wasserstein,
    unrecognisable_fraction,
)
from fedscore.metrics.inception_net import load_inception
from fedscore.metrics.stats import FeatureStats
from fedscore.runs.plots import image_grid, scatter_vs_truth
from fedscore.runs.sampling import model_score_fn, on_device, sample_model
from fedscore.runs.train import load_model
from fedscore.runtime import Runtime, for_run

SAMPLES = "samples.npz"
FIGURE = "samples.png"
EVAL = "eval.json"
GRID_ROWS = 10  # samples per class shown in a grid
SCORE_ERROR_N = 1000  # Monte-Carlo draws per grid time for epsilon_score^2


def _is_toy(cfg: RunConfig) -> bool:
    return cfg.data.name.startswith("gmm:")


def _mixture(cfg: RunConfig):

    return toy.preset(cfg.data.name.partition(":")[2])


def read_config(run_dir: str | os.PathLike) -> RunConfig:
    """The resolved config of a run folder; a folder without one is a FedscoreError."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FedscoreError(
            f"{str(run_dir)!r} is not a run folder (no config.yaml); pass the folder that "
            "`fedscore train` wrote"
        )
    return load_config(path)


# ---------------------------------------------------------------- sampling


def sample_run(
    run_dir: str | os.PathLike,
    n: int = 1000,
    *,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | None = None,
    precision: str | None = None,
) -> dict[str, Path]:
    """Draw n samples from a run's trained model (EMA weights when kept) and write
    `samples.npz` (`samples` (n, *shape) float32; `labels` (n,) int64 for class-conditional
    models, whose labels cycle 0..C-1, so each class gets n // C or n // C + 1) and
    `samples.png` (an image grid, one column per class when conditional; for Gaussian
    mixtures a scatter beside n exact samples) into `out` (default: the run folder).

    device, precision: where the network runs and in what precision (`runtime.for_run`:
    default this machine's device, the run's precision; the sampler's state stays fp32).

    Returns {"samples": npz path, "figure": png path}."""

    if not isinstance(n, int) or n < 1:
        raise FedscoreError(f"n (number of samples) must be a positive integer, got {n!r}")
    model, cfg = load_model(Path(run_dir))
    runtime = for_run(cfg, device, precision)
    shape, classes = datasets.shape_and_classes(cfg)
    labels = torch.arange(n) % classes if cfg.model.conditional else None
    samples = sample_model(model.to(runtime.device), cfg, n, seed=seed, labels=labels,
                           sample_shape=shape, progress=progress, runtime=runtime)
    folder = Path(out) if out is not None else Path(run_dir)
    npz = write_samples(folder / SAMPLES, samples, labels, seed)
    figure = folder / FIGURE
    if _is_toy(cfg):
        exact = _mixture(cfg).sample(n, generator=torch.Generator().manual_seed(seed + 1))
        scatter_vs_truth(samples, exact, figure, title=f"{cfg.name}: {n} samples")
    else:
        ncol = classes if labels is not None else 10
        shown = samples[: min(n, GRID_ROWS * ncol)]
        title = f"{cfg.name}: samples" + (" (one column per class)" if labels is not None else "")
        image_grid(shown, figure, nrow=ncol, title=title)
    return {"samples": npz, "figure": figure}


def write_samples(path: str | os.PathLike, samples: Tensor, labels: Tensor | None,
                  seed: int) -> Path:
    """Atomically write a samples.npz as `load_samples` reads it: `samples` float32,
    `labels` int64 (class-conditional only), `seed`."""
    arrays = {"samples": samples.detach().cpu().numpy().astype(np.float32),
              "seed": np.int64(seed)}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy().astype(np.int64)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file handle: np.savez would append ".npz" to a name
            np.savez(fh, **arrays)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return path


def load_samples(path: str | os.PathLike, sample_shape: tuple[int, ...]
                 ) -> tuple[Tensor, Tensor | None]:
    """(samples (n, *sample_shape) float32, labels (n,) int64 or None) from a samples.npz;
    a missing, empty, unreadable or mis-shaped file is a FedscoreError."""
    path = Path(path)
    want = f"(n, {', '.join(map(str, sample_shape))})"
    if not path.is_file():
        raise FedscoreError(f"samples file {str(path)!r} does not exist; run `fedscore sample`")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as err:  # empty or truncated zip, pickled objects, not an npz at all
        raise FedscoreError(
            f"samples file {str(path)!r} is not a readable .npz ({type(err).__name__}: {err}); "
            "write it again with `fedscore sample`"
        ) from None
    if "samples" not in arrays:
        raise FedscoreError(
            f"samples file {str(path)!r} has no array 'samples' (it has {sorted(arrays)}); "
            f"expected 'samples' of shape {want} and optionally 'labels' (n,)"
        )
    x = arrays["samples"]
    if x.ndim != 1 + len(sample_shape) or tuple(x.shape[1:]) != tuple(sample_shape):
        raise FedscoreError(
            f"samples in {str(path)!r} have shape {x.shape}, expected {want} for this run's data"
        )
    if x.shape[0] < 2:
        raise FedscoreError(
            f"samples file {str(path)!r} holds {x.shape[0]} samples; evaluation needs at least "
            "2 (use `fedscore sample --n 1000`)"
        )
    if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
        raise FedscoreError(f"samples in {str(path)!r} must be finite floats (dtype {x.dtype})")
    labels = arrays.get("labels")
    if labels is not None:
        if labels.shape != (x.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise FedscoreError(
                f"labels in {str(path)!r} must be integers of shape ({x.shape[0]},), got "
                f"{labels.dtype} {labels.shape}"
            )
        labels = torch.from_numpy(labels.astype(np.int64))
    return torch.from_numpy(x.astype(np.float32)), labels


# ---------------------------------------------------------------- federated real statistics


def silo_parts(cfg: RunConfig, labels: Tensor) -> list[np.ndarray] | None:
    """The run's worker partition of the training split (the silos), or None when the run
    is centralised. The same call as federated training makes, so the silos are the same."""
    if not isinstance(cfg.federation, FederationConfig):
        return None
    return worker_parts(cfg, labels.numpy())


def merged_stats(stats_of, images: Tensor, parts: list[np.ndarray]) -> FeatureStats:
    """Sum over silos of stats_of(images[silo]): the statistics of the union of the silos'
    data, each silo sending only its (n, sum f, sum f f^T). stats_of: images -> FeatureStats."""
    total = None
    for idx in parts:
        if len(idx) == 0:
            continue
        s = stats_of(images[torch.as_tensor(idx, dtype=torch.long)])
        total = s if total is None else total.merge(s)
    if total is None:
        raise FedscoreError("every silo of the partition is empty: no real statistics")
    return total


def real_statistics(stats_of, cfg: RunConfig, images: Tensor, labels: Tensor
                    ) -> tuple[FeatureStats, dict[str, Any]]:
    """Real-data statistics of the training split and how they were made: per silo and
    merged for a federated run, in one pass for a centralised one."""
    parts = silo_parts(cfg, labels)
    if parts is None:
        return stats_of(images), {"split": "train", "n": int(images.shape[0]), "silos": 1,
                                  "merged": False}
    stats = merged_stats(stats_of, images, parts)
    return stats, {
        "split": "train",
        "n": stats.n,
        "silos": len(parts),
        "silo_sizes": [len(p) for p in parts],
        "partition": cfg.federation.partition.scheme,
        "merged": True,
        "how": "FID's real statistics (n, sum f, sum f f^T) computed per silo and merged by "
               "addition; no silo shares images or features. KID and precision/recall need "
               "the real features themselves and use the pooled training split.",
    }


# ---------------------------------------------------------------- evaluation


def eval_path(run_dir: str | os.PathLike, samples: str | os.PathLike | None = None,
              out: str | os.PathLike | None = None) -> Path:
    """Where `evaluate_run` writes eval.json: `out/eval.json` when out is given, else next to
    the samples file scored (the run folder's own samples.npz by default).

    Samples in ANOTHER run's folder (one holding a config.yaml) without `out` are refused:
    their eval.json is that run's own scores, and scoring them against this run would
    overwrite it (issue 18: the README's own `evaluate agent-00 --samples ...` example did
    that to agent-00)."""
    if out is not None:
        return Path(out) / EVAL
    if samples is None:
        return Path(run_dir) / EVAL
    folder = Path(samples).parent
    if (folder / "config.yaml").is_file() and folder.resolve() != Path(run_dir).resolve():
        raise FedscoreError(
            f"the samples {str(samples)!r} lie in another run's folder ({str(folder)!r}), "
            f"whose own {EVAL} would be overwritten by this evaluation of "
            f"{str(run_dir)!r}; pass --out DIR (evaluate_run(out=...)) for its {EVAL}"
        )
    return folder / EVAL


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    samples: str | os.PathLike | None = None,
    n: int = 1000,
    seed: int = 0,
    inception_weights: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | None = None,
    precision: str | None = None,
    out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Measure a run's samples and write `eval.json` (where `eval_path` says: `out`, else
    next to the samples, by default in the run folder); returns its dict.

    samples: a samples.npz (default: the run folder's; drawn first with `sample_run(n,
    seed)` when absent). seed also drives the metrics' own randomness (KID subsets, IS
    shuffling, exact reference samples, projections). inception_weights: a local
    Inception-v3 weights file for the papers' FID/IS (fedscore.metrics.inception_net).
    device, precision: as `sample_run`; the feature networks run on the device in fp32,
    their outputs and every metric come back to the CPU (FID's sums in fp64)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    runtime = for_run(cfg, device, precision)
    destination = eval_path(run_dir, samples, out)  # refused before any work
    path = Path(samples) if samples is not None else run_dir / SAMPLES
    if samples is None and not path.is_file():
        sample_run(run_dir, n, seed=seed, progress=progress, device=str(runtime.device),
                   precision=runtime.precision)
    x, labels = load_samples(path, datasets.shape_and_classes(cfg)[0])
    result: dict[str, Any] = {"run": cfg.name, "dataset": cfg.data.name,
                              "samples": str(path), "n_samples": int(x.shape[0]), "seed": seed,
                              "conditional": cfg.model.conditional}
    if _is_toy(cfg):
        result |= toy_metrics(run_dir, cfg, x, labels, seed=seed, runtime=runtime)
    else:
        if inception_weights is not None:  # fail on a bad file before the long work

            inception = load_inception(inception_weights, device=runtime.device)
        # unlabelled own images have no domain classifier (it learns the data's classes):
        # with Inception weights they get the papers' Inception FID/IS alone
        unlabelled = cfg.data.path is not None and datasets.info(cfg.data).classes < 2
        if not (unlabelled and inception_weights is not None):
            result |= image_metrics(cfg, x, labels, seed=seed, progress=progress,
                                    device=runtime.device)
        if inception_weights is not None:
            result |= inception_metrics(inception, cfg, x, seed=seed, progress=progress)
    result["runtime"] = runtime.describe()
    result = json_safe(result)
    destination.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(destination, json.dumps(result, indent=2))
    return result


def is_splits(n: int) -> int:
    """How many splits the Inception Score of n samples is averaged over: the papers' 10,
    but never fewer than 20 samples per split (one split below 40 samples), because the
    marginal p(y) of 10 classes estimated from a handful of samples biases IS towards 1."""
    return min(10, max(1, n // 20))


def evaluate_samples(
    images: Tensor,
    labels: Tensor | None,
    *,
    extractor,
    reference_stats: FeatureStats,
    reference_name: str,
    generator: torch.Generator | None = None,
    features: Tensor | None = None,
) -> dict[str, Any]:
    """The numbers every table of fedscore reports for one sample set, from the dataset's
    domain classifier (fedscore.metrics.features; the FI paper's ResNet18-on-MNIST role):

    - `fid` of the samples' features against `reference_stats` (mergeable sums of the real
      split named `reference_name`, e.g. "train" or "test"; said in `reference`);
    - `is_mean`, `is_std` over `is_splits` splits (`is_splits(n)`; IS shuffles with
      `generator`, a fresh one seeded 0 when None);
    - `class_accuracy` (fraction read as the requested label; None without labels) and
      `unrecognisable` (max class probability < 0.5: the FI paper's "noise" samples).

    images (n, C, H, W): non-finite samples are counted in `non_finite` and set to 0, and
    every image is clamped to [-1, 1], what an image file of the samples would hold.
    features: the clamped images' features when the caller already has them (KID, P/R)."""

    bad = ~torch.isfinite(images.flatten(1)).all(1)
    x = torch.nan_to_num(images, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1, 1)
    feats = extractor.features(x) if features is None else features
    logits = extractor.logits(x)
    splits = is_splits(x.shape[0])
    is_mean, is_std = inception_score(logits, splits=splits, generator=generator)
    return {
        "n_samples": int(x.shape[0]),
        "fid": fid_from_stats(reference_stats, FeatureStats.from_features(feats)),
        "reference": reference_name,
        "is_mean": is_mean,
        "is_std": is_std,
        "is_splits": splits,
        "class_accuracy": class_accuracy(logits, labels) if labels is not None else None,
        "unrecognisable": unrecognisable_fraction(logits),
        "non_finite": int(bad.sum()),
    }


def image_metrics(cfg: RunConfig, x: Tensor, labels: Tensor | None, *, seed: int = 0,
                  progress: bool = True, device=None) -> dict[str, Any]:
    """FID, KID, IS, precision/recall, class accuracy and the unrecognisable fraction of
    images x (n, C, H, W) from the dataset's domain classifier (fedscore.metrics.features,
    run on `device` in fp32, default the CPU); the numbers shared with every experiment
    table come from `evaluate_samples`."""

    extractor = get_extractor(cfg.data, progress=progress, device=device)
    extractor.check_floor()  # one clear error before any number is computed
    x = x.clamp(-1, 1)  # what an image file of the samples would hold
    real, real_labels = datasets.load(cfg.data, split="train")
    real_stats, how = real_statistics(extractor.stats, cfg, real, real_labels)
    fake_feats = extractor.features(x)
    real_feats = extractor.features(real)
    g = torch.Generator().manual_seed(seed)
    # the generator's order (KID, then IS, then the P/R subset) keeps eval.json's numbers
    kid_mean, kid_std = kid(real_feats, fake_feats, subsets=100, subset_size=1000, generator=g)
    shared = evaluate_samples(x, labels, extractor=extractor, reference_stats=real_stats,
                              reference_name="train", generator=g, features=fake_feats)
    # k-NN manifolds compare sets of equal size (Kynkäänniemi et al.): a larger real set
    # would inflate precision and deflate recall, so draw as many real features as fakes
    pick = torch.randperm(real_feats.shape[0], generator=g)[: fake_feats.shape[0]]
    precision, recall = precision_recall(real_feats[pick], fake_feats, k=3)
    return {
        "fid": shared["fid"],
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "is_mean": shared["is_mean"],
        "is_std": shared["is_std"],
        "is_splits": shared["is_splits"],
        "precision": precision,
        "recall": recall,
        "pr_real_samples": int(pick.shape[0]),
        "class_accuracy": shared["class_accuracy"],
        "unrecognisable": shared["unrecognisable"],
        "real_statistics": how,
        "extractor": {"dataset": extractor.dataset, "test_accuracy": extractor.test_accuracy,
                      "floor": extractor.floor, "features": extractor.num_features,
                      "weights": str(extractor.path)},
    }


def inception_metrics(inception, cfg: RunConfig, x: Tensor, *, seed: int = 0,
                      progress: bool = True) -> dict[str, Any]:
    """The papers' FID and IS +- std on Inception-v3 pool3 features and logits (the real
    statistics per silo and merged, as for the domain features)."""

    x = x.clamp(-1, 1)
    real, real_labels = datasets.load(cfg.data, split="train")

    def stats_of(images: Tensor) -> FeatureStats:
        return inception.stats(images, progress=progress)

    real_stats, _ = real_statistics(stats_of, cfg, real, real_labels)
    feats, logits = inception.features_and_logits(x, progress=progress)
    splits = is_splits(x.shape[0])
    g = torch.Generator().manual_seed(seed)
    is_mean, is_std = inception_score(logits, splits=splits, generator=g)
    return {
        "inception_fid": fid_from_stats(real_stats, FeatureStats.from_features(feats)),
        "inception_is_mean": is_mean,
        "inception_is_std": is_std,
        "inception_weights": str(inception.path),
    }


def toy_metrics(run_dir: Path, cfg: RunConfig, x: Tensor, labels: Tensor | None, *,
                seed: int = 0, runtime: Runtime | None = None) -> dict[str, Any]:
    """Exact metrics of samples x (n, d) of a Gaussian-mixture run (fedscore.metrics.toy),
    and the trained model's epsilon_score^2 on its training grid (the network on
    `runtime`, the error in fp32 on the CPU)."""

    gm = _mixture(cfg)
    g = torch.Generator().manual_seed(seed + 1)  # seed + 1: the exact samples of the scatter
    exact = gm.sample(x.shape[0], generator=g)
    tv, freqs = component_frequency_error(x, gm)
    out: dict[str, Any] = {
        "mmd2": mmd2_rbf(x, exact),
        "sliced_w2": sliced_wasserstein(x, exact, generator=torch.Generator().manual_seed(seed)),
        "kl": kl_estimate(x, gm),
        "component_tv": tv,
        "component_freqs": freqs.tolist(),
        "mixture_weights": gm.weights.tolist(),
    }
    if labels is not None:  # conditional: does each sample land in the component it asked for
        comp = gm.responsibilities(x, 0.0).argmax(1)
        out["class_accuracy"] = float((comp == labels).double().mean())
    if cfg.model.conditional:
        out["score_error"] = None
        out["score_error_note"] = ("the exact score is the mixture's; a class-conditional "
                                   "model's score is a component's, so it is not compared")
    else:
        model, _ = load_model(run_dir)
        runtime = runtime or for_run(cfg, "cpu")
        times = diffusion.time_grid(**cfg.diffusion.grid_kwargs())
        out["score_error"] = score_error(
            on_device(model_score_fn(model.to(runtime.device), cfg), runtime), gm, times,
            n=SCORE_ERROR_N,
            generator=torch.Generator().manual_seed(seed + 2),
        )
    return out


def json_safe(obj: Any) -> Any:
    """JSON-safe: NaN and infinities become None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
