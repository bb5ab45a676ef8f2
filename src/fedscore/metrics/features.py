"""Domain feature extractors: a small CNN classifier per image dataset, trained once, cached.

FID and IS need a network that knows the domain. No weights can be downloaded here, so, as
the FI paper did with a ResNet18 on MNIST, we train a classifier on the dataset's training
split and use its penultimate layer as features (FID, KID, precision/recall) and its logits
for IS, class accuracy and the unrecognisable fraction.

The network is LeNet-shaped (two conv + ReLU + 2x2 max-pool stages, one hidden linear layer
of `hidden` units = the features, one linear layer to the logits): a few epochs on one CPU
core reach ~0.98 held-out accuracy on mnist5k in ~20 s.

Cache: `<cache>/features/<dataset>-<split>-<data hash>-<recipe hash>.safetensors` plus a
`.json` beside it holding the recipe, the held-out test accuracy and the weights' SHA-256
and size. `<cache>` is `cache_dir`, else $FEDSCORE_CACHE, else ~/.cache/fedscore. The data
hash covers the training tensors' bytes, the recipe hash the hyper-parameters and
ARCH_VERSION, so a change to either trains a new extractor. An entry whose JSON, size,
hash or tensors do not check out is logged and rebuilt, never trusted.

Accuracy floors (ACCURACY_FLOORS) are the held-out accuracy below which the classifier's
features are not trusted for FID/IS: `features`/`logits` then raise FedscoreError unless
the extractor was made with `allow_below_floor=True` (for inspection only). The floors of
digits and mnist5k are checked in the tests; those of the local torchvision datasets are
conservative guesses for this small CNN.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from fedscore import data
from fedscore.cache import cache_root  # noqa: F401  (public here since the evaluation issue)
from fedscore.config import OWN_DATA
from fedscore.errors import FedscoreError
from fedscore.io import atomic_write, atomic_write_json
from fedscore.metrics.stats import FeatureStats

log = logging.getLogger(__name__)

ARCH_VERSION = "lenet-v1"  # bump when the network's shape or the training loop changes
TRAIN_SPLIT = "train"
TEST_SPLIT = "test"

_BASE: dict[str, Any] = {
    "channels": [16, 32],
    "kernel": 5,
    "hidden": 128,
    "epochs": 8,
    "batch_size": 64,
    "lr": 3e-3,
    "max_shift": 2,
    "seed": 0,
}
RECIPES: dict[str, dict[str, Any]] = {
    "digits": {**_BASE, "kernel": 3, "epochs": 30, "max_shift": 1},
    "mnist5k": dict(_BASE),
    "mnist": {**_BASE, "epochs": 3},
    "fashion-mnist": {**_BASE, "epochs": 6, "max_shift": 1},
    "cifar10": {**_BASE, "channels": [32, 64], "hidden": 256, "epochs": 10},
    "svhn": {**_BASE, "channels": [32, 64], "hidden": 256, "epochs": 5},
}
ACCURACY_FLOORS: dict[str, float] = {
    "digits": 0.90,
    "mnist5k": 0.95,
    "mnist": 0.97,
    "fashion-mnist": 0.85,
    "cifar10": 0.60,
    "svhn": 0.85,
}


class SmallCNN(nn.Module):
    """x (B, C, H, W) -> logits (B, classes); `features` gives the hidden layer (B, hidden)."""

    def __init__(self, shape: tuple[int, int, int], classes: int, channels, kernel, hidden):
        super().__init__()
        c, h, w = shape
        c1, c2 = channels
        self.conv1 = nn.Conv2d(c, c1, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv2d(c1, c2, kernel, padding=kernel // 2)
        self.fc = nn.Linear(c2 * (h // 4) * (w // 4), hidden)
        self.head = nn.Linear(hidden, classes)

    def features(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _build(shape, classes: int, recipe: dict[str, Any]) -> SmallCNN:
    # Initialise under a forked global RNG so the seed is explicit and nothing leaks out.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(recipe["seed"]))
        return SmallCNN(
            tuple(shape), classes, recipe["channels"], recipe["kernel"], recipe["hidden"]
        )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch: int = 1000) -> float:
    model.eval()
    dev = _device(model)
    with torch.no_grad():
        pred = [model(images[i : i + batch].to(dev)).argmax(1).cpu()
                for i in range(0, len(images), batch)]
    return float((torch.cat(pred) == labels).double().mean())


def train_classifier(
    model: SmallCNN,
    images: Tensor,
    labels: Tensor,
    recipe: dict[str, Any],
    *,
    progress: bool = True,
    desc: str = "feature classifier",
) -> SmallCNN:
    """Adam with a one-cycle learning rate, cross-entropy, random shifts of up to
    `max_shift` pixels per batch (background is -1, so rolling the image is a shift). Runs
    where `model` lies (batches drawn on the CPU, moved there)."""
    dev = _device(model)
    g = torch.Generator().manual_seed(int(recipe["seed"]) + 1)
    bs, epochs, shift = int(recipe["batch_size"]), int(recipe["epochs"]), int(recipe["max_shift"])
    n = images.shape[0]
    steps = epochs * -(-n // bs)
    if steps == 0:
        return model.eval()
    opt = torch.optim.Adam(model.parameters(), lr=float(recipe["lr"]))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, float(recipe["lr"]), total_steps=steps)
    model.train()
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            for start in range(0, n, bs):
                idx = perm[start : start + bs]
                xb = images[idx].to(dev)
                if shift > 0:
                    dy, dx = torch.randint(-shift, shift + 1, (2,), generator=g).tolist()
                    xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
                loss = F.cross_entropy(model(xb), labels[idx].to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


class FeatureExtractor:
    """A trained domain classifier: `features(images)` (n, hidden), `logits(images)`
    (n, classes), `stats(images)` (mergeable FeatureStats)."""

    def __init__(
        self,
        model: SmallCNN,
        *,
        dataset: str,
        input_shape,
        test_accuracy: float,
        floor: float,
        allow_below_floor: bool = False,
        path: Path | None = None,
    ):
        self.model = model.eval()
        self.dataset = dataset
        self.input_shape = tuple(input_shape)
        self.test_accuracy = float(test_accuracy)
        self.floor = float(floor)
        self.allow_below_floor = allow_below_floor
        self.path = path

    @property
    def num_features(self) -> int:
        return self.model.fc.out_features

    @property
    def meets_floor(self) -> bool:
        return self.test_accuracy >= self.floor

    def check_floor(self) -> None:
        """Raise FedscoreError when the held-out accuracy is below the floor."""
        if not self.meets_floor and not self.allow_below_floor:
            raise FedscoreError(
                f"the {self.dataset!r} feature classifier has held-out accuracy "
                f"{self.test_accuracy:.3f} < floor {self.floor:.2f}: FID/IS from it would "
                f"mislead. Train a stronger one, e.g. get_extractor({self.dataset!r}, "
                f"recipe={{'epochs': ...}}) with more epochs, or pass allow_below_floor=True "
                f"to inspect this one anyway (weights: {self.path})"
            )

    def _run(self, images: Tensor, head: bool, batch_size: int) -> Tensor:
        self.check_floor()
        images = torch.as_tensor(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise FedscoreError(
                f"images for the {self.dataset!r} feature classifier must have shape "
                f"(n, {', '.join(map(str, self.input_shape))}), got {tuple(images.shape)}"
            )
        if not torch.isfinite(images).all():
            raise FedscoreError("images contain NaN or infinite values")
        fn = self.model if head else self.model.features
        dev = _device(self.model)  # the network on its device, the outputs back on the CPU
        with torch.no_grad():
            chunks = range(0, len(images), batch_size)
            out = [fn(images[i : i + batch_size].to(dev, torch.float32)).cpu() for i in chunks]
        return torch.cat(out) if out else torch.zeros(0, self.num_features)

    def features(self, images: Tensor, batch_size: int = 1000) -> Tensor:
        """Penultimate-layer features (n, hidden) of images (n, C, H, W) in [-1, 1]."""
        return self._run(images, head=False, batch_size=batch_size)

    def logits(self, images: Tensor, batch_size: int = 1000) -> Tensor:
        """Class logits (n, classes) of images (n, C, H, W) in [-1, 1]."""
        return self._run(images, head=True, batch_size=batch_size)

    def stats(self, images: Tensor, batch_size: int = 1000) -> FeatureStats:
        """Mergeable feature statistics of images: what a silo shares for federated FID."""
        return FeatureStats.from_features(self.features(images, batch_size))

    def __repr__(self) -> str:
        return (
            f"FeatureExtractor({self.dataset!r}, features={self.num_features}, "
            f"test_accuracy={self.test_accuracy:.4f}, floor={self.floor})"
        )


def _sha256_tensors(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _recipe_hash(recipe: dict[str, Any]) -> str:
    text = json.dumps({"arch": ARCH_VERSION, **recipe}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _load_entry(weights: Path, meta_path: Path, model: SmallCNN, expect: dict[str, str]):
    """The cached test accuracy after loading weights into model, or the reason it fails."""
    if not weights.exists() and not meta_path.exists():
        return None, None  # no entry: a first use, nothing to log
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        return None, f"unreadable metadata {meta_path.name} ({err})"
    for key, value in expect.items():
        if meta.get(key) != value:
            return None, f"metadata {key} is {meta.get(key)!r}, expected {value!r}"
    if not weights.is_file():
        return None, f"weights file {weights.name} is missing"
    if weights.stat().st_size != meta.get("weights_size"):
        return None, f"size {weights.stat().st_size} != recorded {meta.get('weights_size')}"
    if _sha256_file(weights) != meta.get("weights_sha256"):
        return None, "SHA-256 of the weights does not match the recorded hash"
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
        acc = float(meta["test_accuracy"])
    except Exception as err:  # a hash-valid file of the wrong shape, or a bad JSON field
        return None, f"weights do not fit the network ({type(err).__name__}: {err})"
    return acc, None


def _check_recipe(rec: dict[str, Any]) -> None:
    ok = (
        all(isinstance(rec[k], int) and rec[k] > 0 for k in ("kernel", "hidden", "batch_size"))
        and isinstance(rec["epochs"], int)
        and rec["epochs"] >= 0
        and isinstance(rec["max_shift"], int)
        and rec["max_shift"] >= 0
        and float(rec["lr"]) > 0
        and len(rec["channels"]) == 2
        and all(isinstance(c, int) and c > 0 for c in rec["channels"])
    )
    if not ok:
        raise FedscoreError(
            f"bad feature-classifier recipe {rec}: kernel, hidden, batch_size positive ints; "
            f"epochs, max_shift ints >= 0; lr > 0; channels two positive ints"
        )


def _own_recipe(info) -> dict[str, Any]:
    """The recipe for own images: mnist5k's for grey, cifar10's for colour. The domain
    metrics (FID on these features, IS, class accuracy) need a classifier of the data's
    classes, so unlabelled data are refused."""
    c, h, w = (tuple(info.shape) + (0, 0, 0))[:3]
    if info.classes < 2:
        raise FedscoreError(
            f"{info.description} has no labels (one class): the domain-feature metrics "
            "(FID, IS, class accuracy) come from a classifier trained on the data's classes. "
            "Give the data classes (one subfolder per class, or `y` in the .npz), or score "
            "them with the papers' Inception FID/IS alone: fedscore evaluate RUN "
            "--inception-weights FILE")
    if min(h, w) < 4:
        raise FedscoreError(f"{info.description}: the feature classifier needs images of at "
                            f"least 4x4 pixels, these are {h}x{w}")
    return dict(RECIPES["mnist5k" if c == 1 else "cifar10"])


def get_extractor(
    dataset,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    recipe: dict[str, Any] | None = None,
    floor: float | None = None,
    allow_below_floor: bool = False,
    data_root: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> FeatureExtractor:
    """The feature extractor of an image dataset: loaded from the cache, or trained on the
    dataset's training split on first use (tqdm progress bar), evaluated on its test split
    and cached. dataset: a dataset name or a run's DataConfig (which may name your own
    images). `recipe` overrides entries of RECIPES[dataset]; `floor` overrides
    ACCURACY_FLOORS[dataset]; `data_root` is passed to `fedscore.data.load`. `device`:
    where the classifier trains (on first use) and runs (default the CPU), always in fp32;
    its outputs come back to the CPU.

    Own data (data.name folder / arrays) get a generic recipe, mnist5k's for grey images
    and cifar10's for colour, keyed like every entry by the hash of their training data,
    and a floor of 0 unless `floor` is given: what accuracy is achievable on them is
    unknown, so the classifier's held-out accuracy is logged for the reader to judge."""

    name = dataset if isinstance(dataset, str) else dataset.name
    if name.startswith("gmm:"):
        raise FedscoreError(
            f"feature extractors are for image datasets, not {name!r}: use the exact toy "
            f"metrics (fedscore.metrics.toy) for Gaussian mixtures"
        )
    info = data.info(dataset)  # validates the name
    own = name in OWN_DATA
    if own:
        base = _own_recipe(info)
    else:
        base = RECIPES.get(data.family(name))  # "mnist5k:14x14" trains mnist5k's recipe
    if base is None:
        raise FedscoreError(f"no feature-classifier recipe for dataset {name!r}")
    unknown_keys = set(recipe or {}) - set(base)
    if unknown_keys:
        raise FedscoreError(
            f"unknown recipe keys {sorted(unknown_keys)}; allowed: {', '.join(sorted(base))}"
        )
    rec = {**base, **(recipe or {})}
    _check_recipe(rec)
    if floor is not None:
        floor = float(floor)
    elif own:
        floor = 0.0
        log.info("%s: the feature classifier of your own data has no accuracy floor (what is "
                 "achievable on them is unknown); judge FID/IS by its held-out accuracy, "
                 "recorded in eval.json", info.description)
    else:
        floor = ACCURACY_FLOORS[data.family(name)]

    images, labels = data.load(dataset, split=TRAIN_SPLIT, data_root=data_root)
    data_hash = _sha256_tensors(images, labels)
    rec_hash = _recipe_hash(rec)
    folder = cache_root(cache_dir) / "features"
    stem = f"{name}-{TRAIN_SPLIT}-{data_hash[:16]}-{rec_hash[:16]}"
    weights, meta_path = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    expect = {
        "dataset": name,
        "split": TRAIN_SPLIT,
        "data_hash": data_hash,
        "recipe_hash": rec_hash,
    }

    device = torch.device(device or "cpu")
    model = _build(info.shape, info.classes, rec)
    acc, problem = _load_entry(weights, meta_path, model, expect)
    model.to(device)
    if acc is None:
        if problem is not None:
            log.warning("feature cache %s failed its check (%s); rebuilding", weights, problem)
            model = _build(info.shape, info.classes, rec).to(device)  # nothing half-loaded
        t0 = time.perf_counter()
        desc = f"training {name} feature classifier"
        train_classifier(model, images, labels, rec, progress=progress, desc=desc)
        test_images, test_labels = data.load(dataset, split=TEST_SPLIT, data_root=data_root)
        acc = _accuracy(model, test_images, test_labels)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write(weights, lambda tmp: save_file(state, tmp))
        meta = {
            **expect,
            "recipe": rec,
            "arch": ARCH_VERSION,
            "test_accuracy": acc,
            "test_size": int(test_labels.shape[0]),
            "num_features": int(rec["hidden"]),
            "classes": info.classes,
            "input_shape": list(info.shape),
            "train_seconds": round(time.perf_counter() - t0, 2),
            "trained_on": str(device),
            "weights_size": weights.stat().st_size,
            "weights_sha256": _sha256_file(weights),
        }
        atomic_write_json(meta_path, meta)
        msg = f"{name} feature classifier: held-out accuracy {acc:.4f} (floor {floor:.2f})"
        log.info(msg)
        if progress:
            tqdm.write(msg)
    return FeatureExtractor(
        model,
        dataset=name,
        input_shape=info.shape,
        test_accuracy=acc,
        floor=floor,
        allow_below_floor=allow_below_floor,
        path=weights,
    )
