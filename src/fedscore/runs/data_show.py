"""`fedscore data show`: what fedscore reads from a config's data, before a run is started.

Users who bring their own folder or .npz want to see what fedscore made of it — which
folder became which label, how many images each split and each silo holds, at what size —
and look at a few images, rather than find out from a run's samples. Nothing here trains;
it reads the data exactly as a run would (`fedscore.data.load` of the config's DataConfig)
and writes a preview grid and, for a federated config, the partition heat-map a run
would write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedscore import data as datasets
from fedscore.config import FederationConfig, RunConfig
from fedscore.data import own
from fedscore.federated.setup import worker_parts
from fedscore.runs.plots import image_grid

PREVIEW = "preview.png"
PARTITION = "partition.png"
PER_CLASS = 8


def class_names(cfg: RunConfig) -> dict[int, str]:
    """label -> class folder name for folder data (their numbering, `own.numbering`);
    label -> str(label) otherwise."""
    d = cfg.data
    if d.name == "folder" and d.path is not None:
        classes = tuple(d.classes) if d.classes is not None else None
        _, names = own.list_folder(Path(d.path), classes)
        if names:
            return {label: name for name, label in names.items()}
    _, k = datasets.shape_and_classes(cfg)
    return {c: str(c) for c in range(k)}


def silo_names(cfg: RunConfig) -> list[str] | None:
    """The silo folders of a DIR/<silo>/<class>/<image> folder, in worker order."""
    d = cfg.data
    if d.name != "folder" or d.path is None:
        return None
    dirs = sorted(p.name for p in Path(d.path).iterdir() if p.is_dir()
                  and not p.name.startswith("."))
    nested = dirs and all(any(c.is_dir() for c in (Path(d.path) / s).iterdir()) for s in dirs)
    return dirs if nested else None


def show_data(cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    """Describe the config's data (returned as a dict) and write `preview.png` (up to
    PER_CLASS training images per class, one row per class) and, for a federated config,
    `partition.png` (samples per worker and class) into `out`."""
    info = datasets.info(cfg.data)
    images, labels = datasets.load(cfg.data, split="train")
    names = class_names(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in sorted(names):
        idx = torch.nonzero(labels == c).flatten()[:PER_CLASS]
        if len(idx):
            pad = images.new_full((PER_CLASS - len(idx), *images.shape[1:]), -1.0)
            rows.append(torch.cat([images[idx], pad]))
    result: dict[str, Any] = {
        "data": info.description,
        "shape": list(info.shape),
        "classes": {names[c]: c for c in sorted(names)},
        "train": info.n["train"],
        "test": info.n["test"],
        "train_per_class": {names.get(int(c), str(int(c))): int((labels == c).sum())
                            for c in labels.unique()},
        "preview": str(image_grid(torch.cat(rows).clamp(-1, 1), out / PREVIEW,
                                  nrow=PER_CLASS, title="training images, one row per class")),
    }
    if isinstance(cfg.federation, FederationConfig):
        parts = worker_parts(cfg, labels.numpy())
        silos = silo_names(cfg) if cfg.federation.partition.scheme == "natural" else None
        result["workers"] = {(silos[j] if silos else str(j)): int(len(p))
                             for j, p in enumerate(parts)}
        result["partition"] = str(datasets.plot_partition(
            labels.numpy(), parts, out / PARTITION, n_classes=len(names),
            title=f"{cfg.federation.partition.scheme} partition"))
    return result
