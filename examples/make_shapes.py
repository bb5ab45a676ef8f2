"""Write examples/shapes/: a small image folder in the layout `data: {name: folder}` reads.

Three silos (one subfolder each, read by `partition: {scheme: natural}`), each holding one
subfolder per class ("circle", "square") of 16x16 RGB PNGs: a bright shape of random
size, position and colour on a dark background. The silos hold the classes in different
proportions, the non-IID case federated training is for. Deterministic (seeded), so the
committed folder is exactly what this script writes:

    python examples/make_shapes.py            # rewrites examples/shapes/
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 16
SILOS = {"clinic-a": {"circle": 40, "square": 10},
         "clinic-b": {"circle": 10, "square": 40},
         "clinic-c": {"circle": 25, "square": 25}}


def shape_image(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One (SIZE, SIZE, 3) uint8 image: a filled circle or square on a dark background."""
    r = rng.uniform(3.0, 6.0)
    cy, cx = rng.uniform(r, SIZE - r, size=2)
    yy, xx = np.mgrid[:SIZE, :SIZE] + 0.5
    if kind == "circle":
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    else:
        inside = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    colour = rng.uniform(150, 255, size=3)
    background = rng.uniform(0, 40)
    img = np.where(inside[..., None], colour, background)
    return img.round().astype(np.uint8)


def main(out: Path = Path(__file__).parent / "shapes", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    shutil.rmtree(out, ignore_errors=True)
    for silo, counts in SILOS.items():
        for kind, n in counts.items():
            folder = out / silo / kind
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(shape_image(kind, rng)).save(folder / f"{i:03d}.png")


if __name__ == "__main__":
    main()
