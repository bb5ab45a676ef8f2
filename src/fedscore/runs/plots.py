"""Figures a person would rather look at than read: loss curves, samples beside the truth,
image grids. Matplotlib with the Agg backend (no display needed), imported on first use
(fedscore.plotting)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from fedscore.plotting import pyplot


def scatter_vs_truth(samples: Tensor, truth: Tensor, path: Path, title: str = "") -> Path:
    """Two panels, same axes: the model's samples and exact samples of the data (2-D)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    for ax, x, name in zip(axes, (samples, truth), ("model samples", "exact samples")):
        x = x.detach().cpu()
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
        ax.set_title(name)
        ax.set_aspect("equal")
    lim = float(truth.abs().max()) * 1.3
    axes[0].set_xlim(-lim, lim)
    axes[0].set_ylim(-lim, lim)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def loss_curves(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    xlabel: str = "step",
    ylabel: str = "loss",
    title: str = "",
    logy: bool = True,
) -> Path:
    """One line per named (x, y) series."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if len(curves) > 1:
        ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def image_grid(images: Tensor, path: Path, nrow: int = 10, title: str = "") -> Path:
    """A grid of (N, C, H, W) images in [-1, 1]."""
    # torchvision takes seconds to import; only image runs draw grids
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().cpu().clamp(-1, 1), nrow=nrow, normalize=True,
                     value_range=(-1, 1), padding=1)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(3, nrow * 0.6), max(3, grid.shape[1] / grid.shape[2]
                                                              * nrow * 0.6)))
    ax.imshow(grid.permute(1, 2, 0).numpy() if grid.shape[0] == 3 else grid[0].numpy(),
              cmap="gray")
    ax.axis("off")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)

