"""The partition heat-map: which worker holds how many samples of which class."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedscore import plotting
from fedscore.data.partition import class_histogram


def plot_partition(
    labels, parts, path: str | Path, *, n_classes: int | None = None, title: str = ""
) -> Path:
    """Write a PNG heat-map of class_histogram(labels, parts): workers as rows, classes as
    columns, every cell annotated with its count, row totals on the right. Returns path."""
    hist = class_histogram(labels, parts, n_classes)
    n_workers, k = hist.shape
    # at least 4.5 in wide: a two-class heat-map must still fit its title
    fig = plotting.figure(figsize=(max(4.5, 1.0 + 0.55 * k), 0.9 + 0.4 * n_workers))
    ax = fig.add_subplot()
    im = ax.imshow(hist, cmap="Blues", aspect="auto", vmin=0)
    if hist.size <= 900:  # counts stay legible up to ~30 x 30 cells
        high = hist.max() / 2 if hist.max() > 0 else 1
        for (j, c), v in np.ndenumerate(hist):
            ax.text(c, j, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > high else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(n_workers), [f"{j}  (n={s})" for j, s in enumerate(hist.sum(1))])
    ax.set_xlabel("class")
    ax.set_ylabel("worker")
    ax.set_title(title or f"samples per worker and class ({hist.sum()} in all)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
